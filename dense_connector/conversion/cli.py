"""The conversion's command line, shared by `python -m dense_connector.conversion`,
`conversion_scripts/convert_dense_connector_to_hf.py` and `dense-connector convert`.

This module owns the arguments, their parsing (sizes like `5GB`), and running a parsed command line: a refused
checkpoint exits with status 2 and its message (`error: ...`) from the script, and as a `UsageError` from
`dense-connector convert` (one line, `dense-connector: error: ...`, status 1, as its other subcommands); a
termination signal cleans up as Ctrl-C does.
"""

import argparse
import logging
import sys

from ..chat_templates import STOP_TOKENS
from ..writing.sources import CheckpointError
from ..writing.staging import DTYPES, parse_size, sigterm_as_exit
from .convert import convert_checkpoint


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The conversion's command-line arguments, added to `parser` when given (e.g. a `dense-connector convert` one)."""
    parser = parser or argparse.ArgumentParser(
        prog="convert_dense_connector_to_hf",
        description="Convert an original Dense Connector (LLaVA-layout) checkpoint to a transformers folder.",
    )
    parser.add_argument("--original", required=True, help="folder or Hub id of the original checkpoint")
    parser.add_argument(
        "--vision-tower", help="folder or Hub id of the vision tower (default: the checkpoint's mm_vision_tower)"
    )
    parser.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weights dtype (default: the checkpoint's torch_dtype)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the converted folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument(
        "--verify-against", metavar="FIXTURE_DIR", help="compare with recorded original outputs (golden.safetensors)"
    )
    parser.add_argument(
        "--conv-mode", choices=sorted(STOP_TOKENS), help="conversation format (default: from the tokenizer)"
    )
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=5 * 10**9, help="largest output shard (default: 5GB)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`dense-connector convert`'s arguments."""
    build_parser(parser)


def run(args: argparse.Namespace) -> int:
    """`dense-connector convert`: a refused checkpoint is a `UsageError`, reported as the other subcommands' are."""
    from ..checkpoints import UsageError

    try:
        return run_from_args(args, refuse=True)
    except CheckpointError as error:
        raise UsageError(str(error)) from error


def run_from_args(args: argparse.Namespace, refuse: bool = False) -> int:
    """Run a parsed command line; returns the exit status (2 with a message when the checkpoint is refused, or the
    `CheckpointError` raised with `refuse=True`).

    A termination signal (`kill`) is turned into an exit that cleans up like Ctrl-C does.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with sigterm_as_exit():
            folder = convert_checkpoint(
                original=args.original,
                output=args.output,
                vision_tower=args.vision_tower,
                dtype=args.dtype,
                overwrite=args.overwrite,
                verify_against=args.verify_against,
                conv_mode=args.conv_mode,
                push_to_hub=args.push_to_hub,
                private=args.private,
                max_shard_size=args.max_shard_size,
                progress=not args.no_progress,
            )
    except CheckpointError as error:
        if refuse:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Converted model written to {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))
