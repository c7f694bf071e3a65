"""Where the web demo's answers come from: a checkpoint loaded in this process, or an OpenAI-compatible server.

Both backends take a conversation in transformers' chat format (user turns hold `{"type": "image", "image": PIL}`
and `{"type": "text", "text": ...}` items) and yield the answer so far, one token (or one streamed chunk) at a time.
`LocalBackend` renders the conversation with the checkpoint's own chat template, generates in a thread with a
token-level `TextIteratorStreamer`, and stops at the checkpoint's stop tokens (its generation config's
`eos_token_id`, set from `chat_templates.stop_token_ids` when the checkpoint was converted) or when the caller's
`threading.Event` is set (the Stop button). `OpenAIBackend` sends the same conversation, images as data URLs, to
`/v1/chat/completions` with `stream=true` (a vLLM server of the serving docs, so one UI fronts many GPUs) and reads
its server-sent events.
"""

import base64
import io
import json
import threading
from collections.abc import Iterator

import httpx
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from dense_connector.evaluation.generator import GenerationSettings


class BackendError(Exception):
    """The backend cannot answer (a server that cannot be reached, a model that refuses the input); shown in the UI."""


class StopWhenSet(StoppingCriteria):
    """Ends generation once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TokenStreamer(TextIteratorStreamer):
    """`TextIteratorStreamer` that hands on each token's text as soon as it decodes to whole characters.

    transformers' streamer holds text back until a space ends the word, so answers would arrive a word at a time
    (and an answer without spaces only at its end); here only an incomplete UTF-8 sequence waits for its next token.
    """

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.reshape(-1).tolist())  # one sequence: generation here is never batched
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if not text.endswith("\ufffd"):
            self.on_finalized_text(text[self.print_len :])
            self.print_len = len(text)


class LocalBackend:
    """Streams answers of a model and processor loaded in this process (one generation at a time)."""

    def __init__(self, model, processor, name: str):
        if processor.chat_template is None:
            raise ValueError(f"{name} has no chat template; save one with the processor.")
        self.model = model
        self.processor = processor
        self.name = name

    def stream(self, messages: list[dict], settings: GenerationSettings, stop: threading.Event) -> Iterator[str]:
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device, dtype=self.model.dtype)
        streamer = TokenStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {
            **inputs,
            **settings.generate_kwargs(),
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([StopWhenSet(stop)]),
        }
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as error:  # re-raised in the caller's thread below
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text
        finally:
            stop.set()  # the caller went away (Stop, a closed tab): end the generation thread too
            thread.join()
        if errors:
            raise BackendError(f"generation failed: {type(errors[0]).__name__}: {errors[0]}")


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(messages: list[dict]) -> list[dict]:
    """transformers-style chat messages as OpenAI chat-completions messages (images become data URLs)."""
    converted = []
    for message in messages:
        content = []
        for item in message["content"]:
            if item["type"] == "image":
                content.append({"type": "image_url", "image_url": {"url": data_url(item["image"])}})
            else:
                content.append({"type": "text", "text": item["text"]})
        converted.append({"role": message["role"], "content": content})
    return converted


class OpenAIBackend:
    """Streams answers from an OpenAI-compatible server (`vllm serve`, ...) at `base_url` (ending in `/v1`)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.model = model
        self.name = f"{model or 'the served model'} at {self.base_url}"

    def served_model(self) -> str:
        """The model to ask: the one given, else the first one the server lists."""
        if self.model is None:
            try:
                response = self.client.get("/models")
                response.raise_for_status()
                self.model = response.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
                raise BackendError(f"cannot list the models of {self.base_url}: {error}") from error
            self.name = f"{self.model} at {self.base_url}"
        return self.model

    def stream(self, messages: list[dict], settings: GenerationSettings, stop: threading.Event) -> Iterator[str]:
        body = {
            "model": self.served_model(),
            "messages": openai_messages(messages),
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "stream": True,
        }
        if settings.temperature > 0 and settings.top_p is not None:
            body["top_p"] = settings.top_p
        text = ""
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise BackendError(f"{self.base_url} answered {response.status_code}: {response.read().decode()}")
                for line in response.iter_lines():
                    if stop.is_set():
                        return
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    choices = json.loads(line[len("data:") :]).get("choices") or [{}]
                    text += choices[0].get("delta", {}).get("content") or ""
                    yield text
        except httpx.HTTPError as error:
            raise BackendError(f"cannot reach {self.base_url}: {error}") from error
