"""Arguments and entry points of `dense-connector web` (the Gradio demo) and `dense-connector attention-maps`.

`cli.py` only registers the two subcommands with `add_web_arguments` / `add_attention_arguments` and calls `web` /
`attention_maps`. Gradio is imported only when the web app starts, so `attention-maps` (and the rest of the
command line) works without the `web` extra; without it, `web` says which extra to install.
"""

import argparse
from pathlib import Path

from dense_connector.checkpoints import (
    MODEL_HELP,
    UsageError,
    bundled_demo,
    check_checkpoint,
    install_hint,
    load_checkpoint,
    status,
)


def add_web_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=MODEL_HELP + " (default: the bundled demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--openai-base-url",
        help="answer through this OpenAI-compatible server (e.g. http://gpu-host:8000/v1 of `vllm serve`) instead "
        "of loading a model here",
    )
    parser.add_argument("--openai-model", help="the served model's name (default: the first one the server lists)")
    parser.add_argument("--openai-api-key", help="API key the server expects, if any")
    parser.add_argument(
        "--max-image-pixels", type=int, default=None, help="largest upload accepted, in pixels (default 4096x4096)"
    )


def add_attention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=MODEL_HELP + " (default: the bundled demo)")
    parser.add_argument("--image", required=True, help="the image to look at: a path or an http(s) URL")
    parser.add_argument("--output", required=True, help="PNG file to write the grid of maps to")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda (default: cuda if available)")


def default_model(model: str | None) -> str:
    if model is not None:
        return model
    with bundled_demo() as (checkpoint, _):
        return str(checkpoint)


def web(args: argparse.Namespace) -> int:
    if args.model and args.openai_base_url:
        raise UsageError("give --model (a checkpoint to load here) or --openai-base-url (a server to ask), not both")
    if args.model:
        check_checkpoint(args.model)  # before the slow Gradio import, so a wrong folder fails at once
    try:
        from dense_connector.web import app
    except ImportError as error:
        raise UsageError(
            f"the web demo needs Gradio ({error}); install the web extra: {install_hint('web')}"
        ) from error
    if args.port < 0 or args.port > 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {args.port}")
    backend = app.make_backend(args.model, args.device, args.openai_base_url, args.openai_model, args.openai_api_key)
    limits = {"max_image_pixels": args.max_image_pixels} if args.max_image_pixels else {}
    status(f"serving {backend.name} on http://{args.host}:{args.port} (Ctrl+C stops)")
    app.launch(app.create_app(backend, **limits), args.host, args.port)
    return 0


def attention_maps(args: argparse.Namespace) -> int:
    from dense_connector.chat_command import load_image
    from dense_connector.web.attention import draw_attention_grid, grid_shape, layer_attention

    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise UsageError(f"--output must be a .png file, not {args.output}")
    if not output.parent.is_dir():
        raise UsageError(f"the folder of --output does not exist: {output.parent}")
    image = load_image(args.image)  # a path or an http(s) URL, as for `chat`
    model, processor = load_checkpoint(default_model(args.model), args.device)
    result = layer_attention(model, processor, image)
    picture = draw_attention_grid(result)
    picture.save(output)
    rows, columns = grid_shape(len(result.maps))
    status(
        f"wrote {output}: {len(result.maps)} layers ({result.reduction}) in {rows}x{columns} panels, "
        f"{picture.width}x{picture.height} px; {result.connector}"
    )
    return 0
