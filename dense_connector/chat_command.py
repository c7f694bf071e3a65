"""Arguments and entry points of `dense-connector chat` and `dense-connector demo`.

`cli.py` registers the two subcommands with `add_chat_arguments` / `add_demo_arguments` and calls `chat` / `demo`.
Inputs are checked before the model loads (an image path that is a folder or missing, a blank question), so a
mistake costs no loading time.
"""

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from dense_connector.checkpoints import (
    DEFAULT_MAX_NEW_TOKENS,
    MODEL_HELP,
    UsageError,
    bundled_demo,
    load_checkpoint,
    one_line,
    status,
)


DEMO_QUESTION = "How many shapes are there?"
EXIT_WORDS = ("exit", "quit")


def load_image(source: str):
    """An RGB image from a local path or an http(s) URL."""
    from PIL import Image, UnidentifiedImageError
    from transformers.image_utils import load_image as fetch_image

    if source.startswith(("http://", "https://")):
        try:
            return fetch_image(source, timeout=30).convert("RGB")
        except Exception as error:
            raise UsageError(f"could not download the image {source}: {one_line(error)}") from error
    path = Path(source).expanduser()
    if path.is_dir():
        raise UsageError(f"{source} is a folder; give one image file per --image")
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
    import torch
    from transformers import TextStreamer

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


def user_message(text: str, images: list) -> dict:
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
    if args.question is not None and not args.question.strip():
        raise UsageError("the question is blank; give a question with words in it")
    if not args.interactive and not args.question:
        raise UsageError("give a question (or use --interactive)")
    images = [load_image(source) for source in args.image]
    model, processor = load_checkpoint(args.model, args.device)
    if processor.chat_template is None:
        raise UsageError(f"{args.model} has no chat template; save one with the processor")
    first = args.question.strip() if args.question else None
    questions = read_questions(first) if args.interactive else [first]
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
        args.question = DEMO_QUESTION if args.question is None else args.question
        args.interactive = False
        status(f"asking {args.question!r} about {', '.join(args.image)}")
        return chat(args)


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


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--image", action="append", default=[], help="image file or http(s) URL; repeat for several images, in order"
    )
    parser.add_argument("--interactive", action="store_true", help="keep chatting: read questions from stdin")
    parser.add_argument("question", nargs="?", help="the question (in --interactive mode, the first one)")
    add_generation_options(parser)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="use this checkpoint instead of the bundled one: " + MODEL_HELP)
    parser.add_argument("--image", action="append", help="use this image instead of the bundled one")
    parser.add_argument("question", nargs="?", help=f"the question (default {DEMO_QUESTION!r})")
    add_generation_options(parser)
