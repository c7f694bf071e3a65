"""The `dense-connector` command: one subcommand per task, each in its own command module.

    dense-connector chat --model DIR_OR_HUB_ID --image PATH_OR_URL [--image ...] "question"
    dense-connector demo ["question"]      (the bundled demo checkpoint and sample image)
    dense-connector convert --original DIR_OR_HUB_ID --output DIR   (an authors' checkpoint to this format)
    dense-connector build --vision-tower ID_OR_DIR --language-model ID_OR_DIR --output DIR   (a new, untrained model)
    dense-connector train --config stage1 --model_name_or_path DIR --data_path DATA --output_dir OUT   (training)
    dense-connector check-data --model_name_or_path DIR --data_path DATA   (the records checked, nothing trained)
    dense-connector export --model DIR --to llava|gguf --output DIR   (a stock LLaVA folder, or llama.cpp GGUF files)
    dense-connector eval --model DIR ...   (benchmarks through lmms-eval, or LLaVA question files)
    dense-connector web [--model DIR_OR_HUB_ID]   (the Gradio web demo; `web` extra)
    dense-connector attention-maps --image PATH --output maps.png   (each tower layer's attention)

This module imports nothing from the package at load time: the package's `__init__` imports torch and transformers
(to register the classes with the Auto classes), which `--help` and `--version` do not need. The console script
loads it through `dense_connector_cli` without importing the package; a subcommand's module is imported only when
that subcommand is named. Problems with the input are one line on stderr (`dense-connector: error: ...`) and exit
status 1; `--debug` shows the traceback instead.
"""

import argparse
import importlib
import sys
from dataclasses import dataclass
from importlib import metadata


PROG = "dense-connector"


@dataclass(frozen=True)
class Command:
    """A subcommand: `module` (imported only when the subcommand is named) has `add_arguments(parser)` and
    `run(args) -> exit status`, under the names given here."""

    module: str
    help: str
    description: str = ""
    add_arguments: str = "add_arguments"
    run: str = "run"
    own_parser: bool = False  # the module parses its own options: `main(argv, name, debug, description)`


COMMANDS = {
    "chat": Command(
        "dense_connector.chat_command",
        "answer a question about one or more images",
        "Answer a question about images with a Dense Connector checkpoint (a converted, built or trained folder, or "
        "a Hub id), streaming the answer to stdout; --interactive keeps the conversation going.",
        "add_chat_arguments",
        "chat",
    ),
    "demo": Command(
        "dense_connector.chat_command",
        "ask the bundled demo checkpoint about the bundled sample image",
        "Ask the bundled demo checkpoint (a tiny model trained on synthetic shapes, docs/demo-checkpoint.md) a "
        "question about the bundled sample image, or about --image. It answers how many shapes a picture holds, "
        "their colour, kind and place, or a short caption.",
        "add_demo_arguments",
        "demo",
    ),
    "convert": Command(
        "dense_connector.conversion.cli",
        "convert an authors' (LLaVA-layout) checkpoint to a transformers folder",
        "Convert an original Dense Connector (LLaVA-layout) checkpoint to a transformers folder, checking that the "
        "written folder loads completely.",
    ),
    "build": Command(
        "dense_connector.building.command",
        "build a new Dense Connector checkpoint from a vision tower and a causal language model",
        "Build a new, untrained Dense Connector checkpoint from a vision tower and a causal language model, to "
        "train with the paper's two stages (docs/training.md).",
    ),
    "train": Command(
        "dense_connector.training.command",
        "train a checkpoint: a bundled recipe (stage1, stage2) or your own options",
        "Train a Dense Connector checkpoint (built, converted or trained) on instruction records: a bundled recipe "
        "(--config stage1 or stage2, the paper's two stages) or your own options, every TrainingArguments option "
        "included. Every record is checked before the first step; --list_recipes lists the recipes.",
        own_parser=True,
    ),
    "check-data": Command(
        "dense_connector.training.command",
        "check training records before training, train nothing",
        "Check training records as dense-connector train does before its first step (keys, roles, an assistant "
        "turn, images against placeholders, image files, lengths), one line per bad record; nothing is trained.",
        own_parser=True,
    ),
    "export": Command(
        "dense_connector.export.command",
        "export a checkpoint as a stock transformers LLaVA folder or llama.cpp GGUF files",
        "Export a Dense Connector checkpoint (connector none, SCI or DCI) as a folder stock transformers loads "
        "without remote code (--to llava), or as the GGUF files llama.cpp runs (--to gguf); docs/export.md.",
    ),
    "eval": Command(
        "dense_connector.evaluation.command",
        "the paper's benchmarks through lmms-eval, or LLaVA question files to answer files",
        "Evaluate a checkpoint on the paper's benchmarks through lmms-eval (the eval extra), or answer the authors' "
        "LLaVA question files (.jsonl) into answer files; --write-demo-data writes synthetic data in both formats "
        "to try it offline. --gpus 0,1,... spreads the work over GPUs as the original scripts do.",
    ),
    "web": Command(
        "dense_connector.web.command",
        "the Gradio web demo (needs the `web` extra)",
        "Serve the Gradio web demo: chat about uploaded images, and see where each vision-tower layer looks. "
        "Without --model, the bundled demo checkpoint; --openai-base-url answers through a vLLM server instead.",
        "add_web_arguments",
        "web",
    ),
    "attention-maps": Command(
        "dense_connector.web.command",
        "draw each vision-tower layer's attention on an image, as a PNG",
        "Draw where each vision-tower layer attends (eager attention, head mean) over an image, as a grid of maps "
        "in one PNG. Without --model, the bundled demo checkpoint.",
        "add_attention_arguments",
        "attention_maps",
    ),
}


def version() -> str:
    try:
        return metadata.version("dense-connector")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def top_parser() -> argparse.ArgumentParser:
    """The command names and their one-line help, without importing any command module."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Dense Connector vision-language models. Run `dense-connector COMMAND --help` for a command's "
        "options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help, add_help=False)
    return parser


def command_parser(name: str, command: Command, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {name}",
        description=command.description or command.help,
        conflict_handler="resolve",  # a module may add its own --debug
    )
    getattr(module, command.add_arguments)(parser)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        known, rest = top_parser().parse_known_args(argv)
        command = COMMANDS[known.command]
        module = importlib.import_module(command.module)
        if command.own_parser:  # the training options, whose `--debug` is TrainingArguments' own
            return module.main(rest, known.command, known.debug, command.description)
        args = command_parser(known.command, command, module).parse_args(rest)
        args.command, args.debug = known.command, args.debug or known.debug
        return getattr(module, command.run)(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        from dense_connector.checkpoints import UsageError, one_line

        if isinstance(error, UsageError):
            print(f"{PROG}: error: {error}", file=sys.stderr)
        else:
            detail = f"{type(error).__name__}: {one_line(error)}"
            print(f"{PROG}: error: {detail} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
