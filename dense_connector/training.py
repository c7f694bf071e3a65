"""Fine-tuning helpers: a collator for image-text instruction data, and the training regimes of the original.

The collator takes raw records (LLaVA conversation JSON or chat messages), renders them with the processor's chat
template, expands image placeholders through the processor, and masks with -100 every label that is not part of an
assistant reply. The regimes are the original two stages (projector only, then projector + language model) and
LoRA on the language model, all with the vision tower frozen by default.
"""

import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature

from .chat_templates import CHAT_TEMPLATES


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TUNE_REGIMES = ("projector", "projector+lm", "lora")
WHITESPACE = re.compile(r"\s*")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class InstructionRecords(Sequence):
    """Instruction records kept as one UTF-8 buffer of their JSON texts, each parsed again when it is read.

    A 665K-record LLaVA mix held as Python dicts takes ~4.6x its file size in every process, and a forked dataloader
    worker that reads them all copies a third of that again (reference counts dirty the shared pages). Held as bytes
    it takes the file's size once per process and nothing per worker; reading a record costs one small `json.loads`.
    """

    def __init__(self, texts: Iterable[str], source: str):
        buffer, offsets = bytearray(), [0]
        for text in texts:
            buffer += text.encode("utf-8")
            offsets.append(len(buffer))
        self.buffer = np.frombuffer(bytes(buffer), dtype=np.uint8)
        self.offsets = np.array(offsets, dtype=np.int64)
        self.source = source

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} is out of range: {self.source} has {len(self)} records.")
        index %= len(self)
        return json.loads(self.buffer[self.offsets[index] : self.offsets[index + 1]].tobytes())


def load_instruction_data(path: str | Path) -> InstructionRecords:
    """Records from a JSON list (the LLaVA format) or a JSON-lines file, each record a JSON object."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    items = jsonl_items(text, path) if path.suffix == ".jsonl" else json_list_items(text, path)
    return InstructionRecords(items, str(path))


def checked_record(item: Any, number: int, path: Path) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"Record {number} of {path} is not a JSON object (it is {type(item).__name__}).")


def jsonl_items(text: str, path: Path) -> Iterator[str]:
    """The non-empty lines of a JSON-lines file, each checked to be one JSON object."""
    for number, line in enumerate(line for line in text.splitlines() if line.strip()):
        try:
            checked_record(json.loads(line), number, path)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON in record {number}: {error}") from None
        yield line


def json_list_items(text: str, path: Path) -> Iterator[str]:
    """The JSON texts of a JSON list's items, found without building the whole list of Python objects at once."""
    decoder = json.JSONDecoder()
    position = skip_whitespace(text, 0)
    if not text.startswith("[", position):
        raise ValueError(f"{path} must hold a JSON list of records (or be a .jsonl file with one record per line).")
    position, number = skip_whitespace(text, position + 1), 0
    while not text.startswith("]", position):
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON in record {number}: {error}") from None
        checked_record(item, number, path)
        yield text[position:end]
        position = skip_whitespace(text, end)
        if text.startswith(",", position):
            position = skip_whitespace(text, position + 1)
            if text.startswith("]", position):
                raise ValueError(f"{path} is not a valid JSON list: a `,` after its last record.")
        elif not text.startswith("]", position):
            raise ValueError(f"{path} is not a valid JSON list: expected `,` or `]` after record {number}.")
        number += 1
    if text[position + 1 :].strip():
        raise ValueError(f"{path} has text after the end of its JSON list of records.")


def skip_whitespace(text: str, position: int) -> int:
    return WHITESPACE.match(text, position).end()


def llava_to_messages(conversations: list[dict], image_token: str = "<image>") -> list[dict]:
    """LLaVA `conversations` as chat messages; an image placeholder is moved to the start of its turn, as the original
    preprocessing does (`"<image>\\n" + rest of the text`)."""
    messages = []
    for turn in conversations:
        if turn.get("from") not in LLAVA_ROLES:
            raise ValueError(
                f"Unknown speaker {turn.get('from')!r} in a conversation; use one of {list(LLAVA_ROLES)}."
            )
        value = turn["value"]
        if image_token in value:
            value = (f"{image_token}\n" + value.replace(image_token, "").strip()).strip()
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": value})
    return messages


def record_to_messages(record: dict, image_token: str = "<image>") -> tuple[list[dict], list]:
    """Chat messages and image references (paths or PIL images) of one record in either supported format.

    Chat records list their images under `images`, or in the messages' `{"type": "image", "image" (or "path"): ...}`
    content items.
    """
    if "video" in record or "videos" in record:
        raise ValueError("Video records are not supported by the training collator; pass image or text records.")
    if "conversations" in record:
        images = record.get("image")
        images = [] if images is None else images if isinstance(images, list) else [images]
        return llava_to_messages(record["conversations"], image_token), images
    if "messages" in record:
        if "images" in record:
            return record["messages"], list(record["images"] or [])
        # transformers-style content items may carry the image themselves
        items = [
            item
            for message in record["messages"]
            if isinstance(message["content"], list)
            for item in message["content"]
        ]
        return record["messages"], [
            item.get("image", item.get("path")) for item in items if item.get("type") == "image"
        ]
    raise ValueError(
        f"A record needs `conversations` (LLaVA format) or `messages` (chat format); got keys {sorted(record)}."
    )


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies in it.

    A reply's span runs from the end of the prompt that asks for it (`add_generation_prompt=True`) to the end of the
    conversation rendered through it, so it includes the end-of-turn marker (`</s>` for `vicuna_v1`) that the
    model must learn to emit, and nothing of the role markers.
    """
    text = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = processor.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ValueError(
                "The chat template does not render conversations incrementally (a prefix of the messages must render "
                "to a prefix of the text), so the assistant replies cannot be located for the label mask."
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def token_char_starts(processor, text: str, input_ids: list[int]) -> list[int | None]:
    """Character offset in `text` where each of the processor's tokens starts (`None` for an added BOS and for
    placeholders).

    The processor tokenises the text chunk by chunk between placeholders; the chunks are tokenised again here with
    offsets and checked token for token against `input_ids`, so a mismatch raises instead of mislabelling.
    """
    tokenizer = processor.tokenizer
    placeholders = [token for token in (processor.image_token, processor.video_token) if token]
    placeholder_ids = {processor.image_token_id, processor.video_token_id} - {None}
    pattern = re.compile("|".join(re.escape(token) for token in placeholders))
    bounds = [0, *(pos for match in pattern.finditer(text) for pos in match.span()), len(text)]
    starts: list[int | None] = []
    position = 0
    if input_ids[:1] == [tokenizer.bos_token_id]:
        starts.append(None)
        position = 1
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token):  # the template's BOS: the text starts after
            bounds[0] = len(tokenizer.bos_token)
    for chunk_start, chunk_end in zip(bounds[0::2], bounds[1::2]):
        encoded = tokenizer(text[chunk_start:chunk_end], add_special_tokens=False, return_offsets_mapping=True)
        chunk_ids = encoded["input_ids"]
        if input_ids[position : position + len(chunk_ids)] != chunk_ids:
            raise ValueError(
                "The processor's token ids differ from the text's chunk-by-chunk tokenisation, so the label mask "
                f"cannot be aligned (chunk {text[chunk_start:chunk_end]!r})."
            )
        starts.extend(chunk_start + start for start, _ in encoded["offset_mapping"])
        position += len(chunk_ids)
        while position < len(input_ids) and input_ids[position] in placeholder_ids:
            starts.append(None)
            position += 1
    if position != len(input_ids):
        raise ValueError("The processor's token ids have tokens past the end of the text; cannot align the labels.")
    return starts


def mask_labels(input_ids: list[int], starts: list[int | None], spans: list[tuple[int, int]]) -> list[int]:
    """`input_ids` where a token starts inside an assistant span, `IGNORE_INDEX` everywhere else."""
    return [
        token if start is not None and any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for token, start in zip(input_ids, starts)
    ]


@dataclass
class DenseConnectorDataCollator:
    """Batches raw instruction records for causal-LM training of a Dense Connector model.

    Records are either LLaVA conversations (`{"image": "a.png", "conversations": [{"from": "human", "value":
    "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`) or chat messages (`{"messages": [{"role": ..., "content":
    ...}], "images": [...]}`); images are paths (relative to `image_folder`) or PIL images. `labels` keep only the
    assistant replies with their end-of-turn token; system prompt, user turns, role markers, image placeholders and
    padding are `IGNORE_INDEX`. Sequences are padded on the right. The processor's tokenizer is set to pad on the left,
    for batched generation with what is saved with it (the `Trainer`'s `processing_class`); this collator pads its
    batches itself.

    Truncation to `max_length` never cuts through image placeholders: a record whose placeholders do not all fit is
    dropped with a warning, as is a record left with no assistant token to learn from. A batch whose records are
    all dropped raises.

    With the `plain` template (stage 1) every record must be one image, one user turn and one caption. A record with
    no assistant turn, or whose image is missing, raises an error naming it.

    Use it with `TrainingArguments(remove_unused_columns=False)`, since it needs the raw record fields.
    """

    processor: Any
    image_folder: str | Path | None = None
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: what is saved

    @property
    def plain(self) -> bool:
        """Whether records are stage-1 captions (the `plain` template): one image and one caption each."""
        return self.processor.chat_template == CHAT_TEMPLATES["plain"]

    def load_image(self, image: str | Path | Image.Image) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        path = Path(self.image_folder or "") / image
        if not path.is_file():
            raise FileNotFoundError(f"its image {path} is not found; check --image_folder and the record's `image`.")
        with Image.open(path) as opened:
            return opened.convert("RGB")

    def checked_messages(self, record: dict) -> tuple[list[dict], list]:
        """The record's messages and images, refused when there is nothing to train on or `plain` lacks an image."""
        messages, image_refs = record_to_messages(record, self.processor.image_token)
        roles = [message["role"] for message in messages if message["role"] != "system"]
        if "assistant" not in roles:
            raise ValueError(
                "it has no assistant turn (`gpt` in `conversations`, `assistant` in `messages`) to train on."
            )
        if self.plain and not image_refs:
            raise ValueError(
                "it has no `image`; the plain format (stage 1) trains on image captions only (conversations train "
                "with --version v1 or llama_3)."
            )
        if self.plain and roles != ["user", "assistant"]:
            raise ValueError(
                f"the plain format takes one user turn and one caption; it has the turns {roles} (conversations "
                "train with --version v1 or llama_3)."
            )
        return messages, image_refs

    def encode(self, record: dict) -> tuple[list[int], list[int], dict[str, torch.Tensor]] | None:
        """Token ids, labels and image tensors of one record, or `None` when it does not fit in `max_length`; a
        record that cannot be used raises, naming it."""
        try:
            messages, image_refs = self.checked_messages(record)
            images = [self.load_image(image) for image in image_refs]
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"{record_name(record)} cannot be trained on: {error}") from None
        text, spans = assistant_spans(self.processor, messages)
        # The rendered text starts with the template's BOS; the processor adds no second one.
        encoded = self.processor(images=images or None, text=text, return_tensors="pt")
        input_ids = encoded["input_ids"][0].tolist()
        labels = mask_labels(input_ids, token_char_starts(self.processor, text, input_ids), spans)
        if self.max_length is not None and len(input_ids) > self.max_length:
            placeholder_ids = {self.processor.image_token_id, self.processor.video_token_id}
            if any(token in placeholder_ids for token in input_ids[self.max_length :]):
                logger.warning(
                    f"Dropping a record of {len(input_ids)} tokens: its image placeholders do not fit in "
                    f"max_length={self.max_length}. Raise the maximum length or shorten the text."
                )
                return None
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            logger.warning("Dropping a record with no assistant reply left to train on (after truncation).")
            return None
        pixels = {key: encoded[key] for key in ("pixel_values", "image_sizes") if key in encoded}
        return input_ids, labels, pixels

    def __call__(self, records: list[dict]) -> BatchFeature:
        encoded = [item for item in map(self.encode, records) if item is not None]
        if not encoded:
            raise ValueError(
                f"All {len(records)} records of the batch were dropped (see the warnings): none fits in "
                f"max_length={self.max_length} with an assistant reply to learn from."
            )
        length = max(len(ids) for ids, _, _ in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self.processor.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` (e.g. to the unk token).")
        batch = {
            "input_ids": torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _, _ in encoded]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _, _ in encoded]),
            "labels": torch.tensor([labels + [IGNORE_INDEX] * (length - len(labels)) for _, labels, _ in encoded]),
        }
        pixels = [record_pixels for _, _, record_pixels in encoded if record_pixels]
        if pixels:
            batch["pixel_values"] = concat_padded([p["pixel_values"] for p in pixels])
            if "image_sizes" in pixels[0]:
                batch["image_sizes"] = torch.cat([p["image_sizes"] for p in pixels])
        return BatchFeature(batch)


def record_name(record: Any) -> str:
    """`Record id='...'` for records with an `id` (as LLaVA data has), else the start of its JSON."""
    if isinstance(record, dict) and "id" in record:
        return f"Record id={record['id']!r}"
    text = json.dumps(record, default=str)
    return f"Record {text[:100]}{'...' if len(text) > 100 else ''}"


def concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the image axis, zero-padding AnyRes tile axes (dim 1 of 5-d tensors) to the longest."""
    if tensors[0].dim() == 5:
        tiles = max(t.shape[1] for t in tensors)
        tensors = [nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, tiles - t.shape[1])) for t in tensors]
    return torch.cat(tensors)


def language_model_linear_names(model: nn.Module) -> list[str]:
    """Names of the language model's linear layers (`q_proj`, ..., `down_proj` for Llama): the LoRA targets."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.model.language_model.named_modules()
            if isinstance(module, nn.Linear)
        }
    )


def prepare_for_training(
    model: nn.Module,
    tune: str = "projector+lm",
    freeze_vision_tower: bool = True,
    lora_r: int = 128,
    lora_alpha: int = 256,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | None = None,
) -> nn.Module:
    """Set which parameters train, as in the original recipes, and return the model to train.

    - `"projector"` (stage 1, pre-training): only the projector (and AnyRes `image_newline`).
    - `"projector+lm"` (stage 2, instruction tuning): the projector, the language model and its head.
    - `"lora"`: LoRA adapters on the language model's linear layers (through `peft`), with the projector fully
      trained and saved with the adapter (`modules_to_save`); returns the `PeftModel`. AnyRes `image_newline` stays
      frozen in this regime, since `peft` saves whole modules only.

    `freeze_vision_tower=False` trains the tower too (saved with the adapter under LoRA). Activation checkpointing
    (`model.activation_checkpointing_enable()`, `--activation_checkpointing` in the Trainer; `gradient_checkpointing`
    before transformers 5.20) works in every regime,
    reentrant or not: transformers checkpoints the layers' `forward`, so the hooks through which the connector reads
    the tower's hidden states see the checkpointed outputs, and it makes the input embeddings require grad for frozen
    language models.
    """
    if tune not in TUNE_REGIMES:
        raise ValueError(f"tune={tune!r} is not a training regime; use one of {TUNE_REGIMES}.")
    inner = model.model
    model.requires_grad_(False)
    inner.connector.requires_grad_(True)
    if inner.image_newline is not None:
        inner.image_newline.requires_grad_(tune != "lora")
    if tune == "projector+lm":
        inner.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if not freeze_vision_tower:
        inner.vision_tower.requires_grad_(True)
    if tune != "lora":
        return model

    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules or language_model_linear_names(model)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=rf".*\.language_model\..*\.({'|'.join(map(re.escape, targets))})",
        modules_to_save=["projector"] + ([] if freeze_vision_tower else ["vision_tower"]),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_parameter_summary(model: nn.Module) -> str:
    """`"trainable: N / M parameters (P%)"` for logs."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable: {trainable:,} / {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


__all__ = [
    "IGNORE_INDEX",
    "TUNE_REGIMES",
    "DenseConnectorDataCollator",
    "assistant_spans",
    "language_model_linear_names",
    "llava_to_messages",
    "InstructionRecords",
    "load_instruction_data",
    "mask_labels",
    "prepare_for_training",
    "record_to_messages",
    "token_char_starts",
    "trainable_parameter_summary",
]
