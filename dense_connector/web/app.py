"""The Gradio app of `dense-connector web` (and of the root `app.py`, which runs it as a Hugging Face Space).

`create_app` builds a two-tab `gr.Blocks`: **Chat** (upload or paste one or more images with a question, multi-turn,
answers streamed token by token, temperature / top-p / max new tokens, Stop and Clear) and **Layer attention** (the
`attention` module's grid for one image). Answers come from a `backends` backend: the checkpoint loaded in this
process (no model named = the bundled demo checkpoint), or an OpenAI-compatible server with `openai_base_url` (then
the attention tab, which needs the tower's weights here, says so instead). Bad input (a file that is not an image,
an image over `max_image_pixels`, an empty message, a server that cannot be reached) raises `gr.Error`, which the
page shows as a notice and `gradio_client` as an `AppError`; the app keeps serving.
"""

import threading
from pathlib import Path

import gradio as gr
from PIL import Image, UnidentifiedImageError

from dense_connector.checkpoints import DEFAULT_MAX_NEW_TOKENS, bundled_demo, load_checkpoint
from dense_connector.evaluation.generator import GenerationSettings
from dense_connector.web.attention import draw_attention_grid, layer_attention
from dense_connector.web.backends import BackendError, LocalBackend, OpenAIBackend


MAX_IMAGE_PIXELS = 4096 * 4096
MAX_FILE_SIZE = "25mb"  # uploads over this are refused by Gradio before they reach the handlers


def open_image(path: str, max_pixels: int) -> Image.Image:
    """The RGB image at `path`, or a `gr.Error` naming the file and what is wrong with it."""
    name = Path(path).name
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise gr.Error(
                    f"{name} is {width}x{height} pixels, over the limit of {max_pixels:,} pixels; "
                    "resize it (or start the app with a larger --max-image-pixels)."
                )
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise gr.Error(f"{name} is too large to open safely ({error}); resize it.") from error
    except (UnidentifiedImageError, OSError) as error:
        raise gr.Error(
            f"{name} is not an image that Pillow can read (PNG, JPEG, WebP, ...); upload an image."
        ) from error


class Sessions:
    """One Stop event per browser session, so Stop ends that session's generation only."""

    def __init__(self):
        self.events: dict[str, threading.Event] = {}

    def start(self, session: str) -> threading.Event:
        self.events[session] = threading.Event()
        return self.events[session]

    def stop(self, session: str) -> None:
        if session in self.events:
            self.events.pop(session).set()


def make_backend(
    model: str | None,
    device: str = "auto",
    openai_base_url: str | None = None,
    openai_model: str | None = None,
    openai_api_key: str | None = None,
):
    """An `OpenAIBackend` for `openai_base_url`, else a `LocalBackend` of `model` (None = the bundled demo)."""
    if openai_base_url:
        return OpenAIBackend(openai_base_url, openai_model, openai_api_key)
    name = model
    if model is None:
        with bundled_demo() as (checkpoint, _):
            model, name = str(checkpoint), "the bundled demo checkpoint"
    loaded, processor = load_checkpoint(model, device)
    return LocalBackend(loaded, processor, name)


def create_app(backend, max_image_pixels: int = MAX_IMAGE_PIXELS) -> gr.Blocks:
    """The Blocks app serving `backend` (see the module docstring)."""
    sessions = Sessions()
    local = isinstance(backend, LocalBackend)
    default_tokens = (local and backend.model.generation_config.max_new_tokens) or DEFAULT_MAX_NEW_TOKENS

    def respond(message, history, conversation, temperature, top_p, max_new_tokens, request: gr.Request):
        text = ((message or {}).get("text") or "").strip()
        files = (message or {}).get("files") or []
        if not text:
            raise gr.Error("Type a question about the images first (the message was empty).")
        images = [open_image(path, max_image_pixels) for path in files]
        user = {"role": "user", "content": [{"type": "image", "image": image} for image in images]}
        user["content"].append({"type": "text", "text": text})
        shown = [*history, *({"role": "user", "content": {"path": path}} for path in files)]
        shown += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=temperature, top_p=top_p)
        stop = sessions.start(request.session_hash)
        answer = ""
        yield shown, shown, conversation, gr.MultimodalTextbox(value=None)
        try:
            for answer in backend.stream([*conversation, user], settings, stop):
                shown[-1]["content"] = answer
                yield shown, shown, conversation, gr.MultimodalTextbox()
        except BackendError as error:
            raise gr.Error(str(error)) from error
        finally:
            stop.set()
        reply = {"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]}
        shown[-1]["content"] = answer.strip()
        yield shown, shown, [*conversation, user, reply], gr.MultimodalTextbox()

    def stop(request: gr.Request):
        sessions.stop(request.session_hash)

    def clear(request: gr.Request):
        sessions.stop(request.session_hash)
        return [], [], [], gr.MultimodalTextbox(value=None)

    def attention_maps(path):
        if not path:
            raise gr.Error("Upload an image first.")
        image = open_image(path, max_image_pixels)
        try:
            return draw_attention_grid(layer_attention(backend.model, backend.processor, image))
        except ValueError as error:
            raise gr.Error(str(error)) from error

    with gr.Blocks(title="Dense Connector") as app:
        gr.Markdown(f"## Dense Connector\nAnswers from **{backend.name}**.")
        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot")
            # The conversation lives in the session (what the model saw, and what the chat shows), not in the
            # Chatbot's value, so API clients keep a multi-turn conversation by reusing their session.
            conversation, history = gr.State([]), gr.State([])
            box = gr.MultimodalTextbox(
                placeholder="Upload or paste images, then ask about them",
                file_types=["image"],
                file_count="multiple",
                sources=["upload"],
                show_label=False,
                elem_id="message",
            )
            with gr.Row():
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                clear_button = gr.Button("Clear", elem_id="clear")
            with gr.Accordion("Generation", open=False):
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(1, 2048, value=default_tokens, step=1, label="Max new tokens")
            answering = box.submit(
                respond,
                [box, history, conversation, temperature, top_p, max_new_tokens],
                [chatbot, history, conversation, box],
                api_name="chat",
            )
            stop_button.click(stop, None, None, cancels=[answering], api_name="stop")
            cleared = [chatbot, history, conversation, box]
            clear_button.click(clear, None, cleared, cancels=[answering], api_name="clear")
            chatbot.clear(clear, None, cleared, cancels=[answering], api_name=False)
        with gr.Tab("Layer attention"):
            if local:
                gr.Markdown(
                    "Where each layer of the vision tower looks (CLS-to-patch attention for CLIP, mean attention "
                    "received per patch for towers without CLS, mean over heads). Layers the connector reads are "
                    "framed in red: `F` the final feature, `STI`/`SCI` layers, DCI groups `G1`, `G2`, ..."
                )
                with gr.Row():
                    picture = gr.Image(type="filepath", label="Image", height=240, elem_id="attention-image")
                    draw = gr.Button("Show attention", variant="primary", scale=0, elem_id="draw")
                grid = gr.Image(type="pil", format="png", show_label=False, elem_id="attention-maps")
                draw.click(attention_maps, picture, grid, api_name="attention_maps")
            else:
                gr.Markdown("Layer attention needs the model's weights here; start the app without --openai-base-url.")
    return app


def launch(app: gr.Blocks, host: str | None = None, port: int | None = None) -> None:
    """Serve `app` (host and port None: Gradio's defaults and environment, as on a Space), until interrupted."""
    app.queue().launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, show_error=True)
