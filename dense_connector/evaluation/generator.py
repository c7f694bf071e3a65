"""Batched answers of a Dense Connector checkpoint to questions about images: what every evaluation path runs.

Both evaluation formats (lmms-eval tasks and the authors' LLaVA question files) go through `Answerer.answer`, so they
build the same prompts (the checkpoint's chat template, images before the text, as the authors' scripts do), pad on
the left, decode greedily unless a temperature is given, and stop at the checkpoint's own stop tokens (its generation
config: `</s>` for Vicuna, `<|eot_id|>` for Llama-3) as well as at the task's `until` strings.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..checkpoints import DEFAULT_MAX_NEW_TOKENS
from ..writing.verify import loading_problems


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. `until` holds strings that end an answer (cut off, as lmms-eval expects)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    until: tuple[str, ...] = field(default_factory=tuple)

    def generate_kwargs(self) -> dict:
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        else:
            sampling = {"do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, **sampling}


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_pretrained(
    path: str,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """Model (eval mode) and processor of a checkpoint; a local folder is read without asking the Hub.

    A checkpoint with missing, unexpected or resized tensors is refused (ValueError naming them): transformers only
    warns and initialises missing tensors at random, and scores of such a model would be meaningless.
    """
    local = {"local_files_only": True} if Path(path).is_dir() else {}
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **local)
    model, info = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=torch_dtype,
        device_map=device_map,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        **local,
    )
    problems = loading_problems(info)
    if problems:
        raise ValueError(
            f"{path} is incomplete or does not match its config ({'; '.join(problems)}); evaluating it would score "
            "randomly initialised weights. Convert or save the checkpoint again."
        )
    if device_map is None:
        model = model.to(resolve_device(device))
    return model.eval(), processor


class Answerer:
    """Answers batches of (images, question) pairs with one model and its processor."""

    def __init__(self, model, processor):
        if getattr(processor, "chat_template", None) is None:
            raise ValueError("The processor has no chat template; save the checkpoint's template with the processor.")
        self.model = model
        self.processor = processor
        self.image_token = getattr(processor, "image_token", "<image>")

    def prompt(self, question: str, num_images: int) -> str:
        """The chat-formatted prompt; images go first unless the question already places its own `<image>`s."""
        images = [] if self.image_token in question else [{"type": "image"}] * num_images
        messages = [{"role": "user", "content": [*images, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def answer(self, images: list[list[Image.Image]], questions: list[str], settings: GenerationSettings) -> list[str]:
        """One answer per question, generated as one left-padded batch; `images[i]` belongs to `questions[i]`."""
        if len(images) != len(questions):
            raise ValueError(f"Got {len(questions)} questions but {len(images)} image lists; give one list each.")
        prompts = [self.prompt(question, len(own)) for question, own in zip(questions, images)]
        flat = [image for own in images for image in own]
        # An empty image list is not "no images" for every processor version: leave the argument out instead.
        image_args = {"images": flat} if flat else {}
        inputs = self.processor(text=prompts, padding=True, padding_side="left", return_tensors="pt", **image_args)
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        stops = {"stop_strings": list(settings.until), "tokenizer": self.processor.tokenizer} if settings.until else {}
        output = self.model.generate(**inputs, **settings.generate_kwargs(), **stops)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stops(text, settings.until).strip() for text in texts]


def cut_at_stops(text: str, until: tuple[str, ...]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
