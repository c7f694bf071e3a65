"""The `dense-connector` command: chat about images with a checkpoint, convert original checkpoints, run the demo.

    dense-connector chat --model DIR_OR_HUB_ID --image PATH_OR_URL [--image ...] "question"
    dense-connector chat --model DIR_OR_HUB_ID --image PATH_OR_URL --interactive
    dense-connector convert ...            (see `dense-connector convert --help`)
    dense-connector build --vision-tower ID_OR_DIR --language-model ID_OR_DIR --output DIR   (a new, untrained model)
    dense-connector train --config stage1 --model_name_or_path DIR --data_path DATA --output_dir OUT   (training)
    dense-connector check-data --model_name_or_path DIR --data_path DATA   (the records checked, nothing trained)
    dense-connector export --model DIR --to llava|gguf --output DIR   (a stock LLaVA folder, or llama.cpp GGUF files)
    dense-connector demo ["question"]      (the bundled demo checkpoint and sample image)
    dense-connector eval --model DIR ...   (benchmarks through lmms-eval, or LLaVA question files; see `eval --help`)
    dense-connector web [--model DIR_OR_HUB_ID] [--host H] [--port P]   (the Gradio web demo; `web` extra)
    dense-connector attention-maps --model DIR --image PATH --output maps.png   (each tower layer's attention)

Problems with the input (a missing file, something that is not an image, a folder that is not a Dense Connector
checkpoint, a Hub id that cannot be reached) are reported as one line on stderr with a non-zero exit code; `--debug`
shows the full traceback instead.
"""

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import TextStreamer
from transformers.image_utils import load_image as fetch_image

from dense_connector.building import command as build_command
from dense_connector.checkpoints import PROG, UsageError, bundled_demo, load_checkpoint, one_line, status
from dense_connector.evaluation import command as evaluation_command
from dense_connector.export import command as export_command
from dense_connector.web import command as web_command


DEMO_QUESTION = "How many shapes are there?"
DEFAULT_MAX_NEW_TOKENS = 512
EXIT_WORDS = ("exit", "quit")
CONVERT_HELP = "convert an original Dense Connector checkpoint to a transformers folder"


def load_image(source: str) -> Image.Image:
    """An RGB image from a local path or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        try:
            return fetch_image(source, timeout=30).convert("RGB")
        except Exception as error:
            raise UsageError(f"could not download the image {source}: {one_line(error)}") from error
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"image not found: {source}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"{source} is not an image that Pillow can read ({one_line(error)})") from error


def respond(model, processor, messages: list[dict], max_new_tokens: int | None, temperature: float) -> str:
    """Generate the assistant's reply to `messages`, streaming it to stdout as it comes; return it.

    Without `max_new_tokens`, the checkpoint's generation config decides, or `DEFAULT_MAX_NEW_TOKENS` if it does not.
    """
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device, dtype=model.dtype)
    max_new_tokens = max_new_tokens or model.generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return processor.decode(new_tokens, skip_special_tokens=True).strip()


def user_message(text: str, images: list[Image.Image]) -> dict:
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def read_questions(first: str | None) -> Iterator[str]:
    """`first` (when given), then lines from stdin until EOF, an empty line, or `exit`/`quit`."""
    if first:
        yield first
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip() or line.strip().lower() in EXIT_WORDS:
            return
        yield line.strip()


def chat(args: argparse.Namespace) -> int:
    if not args.interactive and not args.question:
        raise UsageError("give a question (or use --interactive)")
    images = [load_image(source) for source in args.image]
    model, processor = load_checkpoint(args.model, args.device)
    if processor.chat_template is None:
        raise UsageError(f"{args.model} has no chat template; save one with the processor")
    questions = read_questions(args.question) if args.interactive else [args.question]
    messages: list[dict] = []
    for question in questions:
        # The images belong to the first user message, where the original conversations put them.
        messages.append(user_message(question, [] if messages else images))
        reply = respond(model, processor, messages, args.max_new_tokens, args.temperature)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return 0


def demo(args: argparse.Namespace) -> int:
    with bundled_demo() as (checkpoint, sample):
        if args.model is None and not (checkpoint / "config.json").is_file():
            raise UsageError(f"the demo checkpoint is not bundled with this install (expected {checkpoint})")
        args.model = args.model or str(checkpoint)
        args.image = args.image or [str(sample)]
        args.question = args.question or DEMO_QUESTION
        args.interactive = False
        status(f"asking {args.question!r} about {', '.join(args.image)}")
        return chat(args)


def convert(argv: list[str]) -> int:
    """Run the conversion script's own command line (imported only when asked for) under `dense-connector convert`."""
    from dense_connector import conversion

    parser = argparse.ArgumentParser(prog=f"{PROG} convert", description=CONVERT_HELP)
    return conversion.run_from_args(conversion.build_parser(parser).parse_args(argv))


def training(command: str, argv: list[str], debug: bool) -> int:
    """`train` and `check-data` with their own parser (the training options, imported only when asked for)."""
    from dense_connector.training import command as training_command

    return training_command.main(argv, command, debug)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help=f"longest answer, in tokens (default: the checkpoint's generation config, else {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 (the default) answers greedily"
    )
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda (default: cuda if available)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Dense Connector vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{chat,convert,build,export,train,check-data,demo,eval,web,attention-maps}",
    )

    chat_parser = commands.add_parser("chat", help="answer a question about one or more images")
    chat_parser.add_argument("--model", required=True, help="converted checkpoint: a local folder or a Hub id")
    chat_parser.add_argument(
        "--image", action="append", default=[], help="image file or http(s) URL; repeat for several images, in order"
    )
    chat_parser.add_argument("--interactive", action="store_true", help="keep chatting: read questions from stdin")
    chat_parser.add_argument("question", nargs="?", help="the question (in --interactive mode, the first one)")
    add_generation_options(chat_parser)

    commands.add_parser("convert", help=f"{CONVERT_HELP} (see `convert --help`)", add_help=False)
    build_command.add_arguments(commands.add_parser("build", help=build_command.HELP, description=build_command.HELP))
    export_command.add_arguments(
        commands.add_parser("export", help=export_command.HELP, description=export_command.HELP)
    )
    train_help = "train a checkpoint: a bundled recipe (stage1, stage2) or your own options (see `train --help`)"
    commands.add_parser("train", help=train_help, add_help=False)
    check_help = "check training records, train nothing (see `check-data --help`)"
    commands.add_parser("check-data", help=check_help, add_help=False)

    demo_parser = commands.add_parser("demo", help="ask the bundled demo checkpoint about the bundled sample image")
    demo_parser.add_argument("--model", help="use this checkpoint instead of the bundled one")
    demo_parser.add_argument("--image", action="append", help="use this image instead of the bundled one")
    demo_parser.add_argument("question", nargs="?", help=f"the question (default {DEMO_QUESTION!r})")
    add_generation_options(demo_parser)

    eval_parser = commands.add_parser(
        "eval",
        help="the paper's benchmarks through lmms-eval, or LLaVA question files to answer files",
        description=evaluation_command.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluation_command.add_arguments(eval_parser)
    eval_parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    web_command.add_web_arguments(commands.add_parser("web", help="the Gradio web demo (needs the `web` extra)"))
    web_command.add_attention_arguments(
        commands.add_parser("attention-maps", help="draw each vision-tower layer's attention on an image, as a PNG")
    )
    return parser


def evaluate(args: argparse.Namespace) -> int:
    return evaluation_command.run(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        if "convert" in argv[:2] and argv[: argv.index("convert")] in ([], ["--debug"]):
            return convert(argv[argv.index("convert") + 1 :])
        for command in ("train", "check-data"):
            if command in argv[:2] and argv[: argv.index(command)] in ([], ["--debug"]):
                before = argv[: argv.index(command)]  # `train --debug X` is TrainingArguments' own option
                return training(command, argv[argv.index(command) + 1 :], before == ["--debug"])
        args = build_parser().parse_args(argv)
        commands = {
            "chat": chat,
            "build": build_command.run,
            "export": export_command.run,
            "demo": demo,
            "eval": evaluate,
            "web": web_command.web,
        }
        return {**commands, "attention-maps": web_command.attention_maps}[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        if isinstance(error, UsageError):
            print(f"{PROG}: error: {error}", file=sys.stderr)
        else:
            detail = f"{type(error).__name__}: {one_line(error)}"
            print(f"{PROG}: error: {detail} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
