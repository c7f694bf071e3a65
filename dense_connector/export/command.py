"""Arguments and entry point of `dense-connector export`: a checkpoint as a stock LLaVA folder or llama.cpp GGUF files.

`cli.py` registers the subcommand (`add_arguments`) and calls `run`; torch, transformers and gguf are imported
inside `run`, so that `dense-connector --help` stays fast. A refused checkpoint is reported as a `UsageError` (one
line, nothing written).
"""

import argparse

from dense_connector.checkpoints import UsageError, status


HELP = "export a checkpoint as a stock transformers LLaVA folder (--to llava) or llama.cpp GGUF files (--to gguf)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Dense Connector checkpoint folder (none, SCI or DCI)")
    parser.add_argument("--to", required=True, choices=["llava", "gguf"], help="llava: transformers; gguf: llama.cpp")
    parser.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument(
        "--llama-cpp",
        metavar="DIR",
        help="--to gguf: llama.cpp source folder whose convert_hf_to_gguf.py converts the language model (without "
        "it, the language model is written as a transformers folder and the command that converts it is printed)",
    )
    parser.add_argument(
        "--outtype", choices=["f16", "f32"], default="f16", help="--to gguf: tensor type (default f16)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dense_connector.writing.sources import CheckpointError
    from dense_connector.writing.staging import sigterm_as_exit

    try:
        with sigterm_as_exit():
            if args.to == "llava":
                from .llava import export_llava

                folder = export_llava(args.model, args.output, overwrite=args.overwrite, progress=not args.no_progress)
                status(f"stock LLaVA folder written to {folder}")
            else:
                from .gguf import export_gguf

                folder = export_gguf(
                    args.model,
                    args.output,
                    llama_cpp=args.llama_cpp,
                    outtype=args.outtype,
                    overwrite=args.overwrite,
                    progress=not args.no_progress,
                )
    except CheckpointError as error:
        raise UsageError(str(error)) from error
    print(folder)
    return 0
