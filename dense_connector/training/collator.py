"""The collator that turns instruction records into training batches.

It renders each record with the processor's chat template, expands the image placeholders through the processor,
and masks with `IGNORE_INDEX` every label that is not part of an assistant reply (the original's `plain` format:
everything after the image), padding each batch to its longest record, or (`padding_free=True`) putting the batch's
records one after the other in a single row.
"""

import io
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature, DataCollatorWithFlattening

from ..chat_templates import CHAT_TEMPLATES
from .data import record_name, record_to_messages
from .parallel import map_chunks


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# What the processor gives per image, batched image after image: pixels, AnyRes original sizes, NaFlex patch masks
# and patch grids.
IMAGE_KEYS = ("pixel_values", "image_sizes", "pixel_attention_mask", "spatial_shapes")


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
    ...}], "images": [...]}`); images are paths (relative to `image_folder`), PIL images, or embedded images as
    `datasets` leaves them undecoded (`{"bytes": ..., "path": ...}`). `labels` keep only the
    assistant replies with their end-of-turn token; system prompt, user turns, role markers, image placeholders and
    padding are `IGNORE_INDEX`. Sequences are padded on the right. The processor's tokenizer is set to pad on the left,
    for batched generation with what is saved with it (the `Trainer`'s `processing_class`); this collator pads its
    batches itself.

    Truncation to `max_length` never cuts through image placeholders: a record whose placeholders do not all fit is
    dropped with a warning, as is a record left with no assistant token to learn from. A batch whose records are
    all dropped raises.

    With the `plain` template (stage 1) every record must be one image, one user turn and one caption. A record with
    no assistant turn, or whose image is missing, raises an error naming it.

    `padding_free=True` (TRL's name) puts the batch's records one after the other in one row of shape `(1, total
    tokens)` with no padding (transformers' `DataCollatorWithFlattening`): `position_ids` restart at 0 at every
    record, which is what keeps records from attending to each other (transformers' packed-sequence masks for SDPA,
    eager and flex attention, and flash-attention's variable-length kernels, all read them when no `attention_mask`
    is passed), and the label of each record's first token is `IGNORE_INDEX`, so no record learns to predict the
    next one's start. Loss and gradients are those of the padded batch of the same records.

    Use it with `TrainingArguments(remove_unused_columns=False)`, since it needs the raw record fields.
    """

    processor: Any
    image_folder: str | Path | None = None
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    padding_free: bool = False

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: what is saved
        if self.padding_free and self.pad_to_multiple_of:
            raise ValueError("padding_free=True adds no padding; leave pad_to_multiple_of out.")

    @property
    def plain(self) -> bool:
        """Whether records are stage-1 captions (the `plain` template): one image and one caption each."""
        return self.processor.chat_template == CHAT_TEMPLATES["plain"]

    def load_image(self, image: str | Path | Image.Image | dict) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, dict) and image.get("bytes") is not None:  # embedded, left undecoded by `datasets`
            with Image.open(io.BytesIO(image["bytes"])) as opened:
                return opened.convert("RGB")
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
        pixels = {key: encoded[key] for key in IMAGE_KEYS if key in encoded}
        return input_ids, labels, pixels

    def token_lengths(self, records: Sequence[dict], workers: int | None = None) -> list[int]:
        """Each record's tokens after image expansion, as `encode` counts them (at most `max_length`), positive for
        records with images and negative for text-only ones (the sign the modality-grouped sampler reads), computed
        in `workers` forked processes (default: the CPUs this process's share of the machine has).

        The text is rendered and tokenised as `encode` does it; the images are not loaded: an image's placeholders
        come from the processor's tower input size, and with AnyRes from the image's size (a PIL image's, or the
        file header's). A record `encode` would refuse counts its text alone here; `encode` names it later.
        """
        began = time.perf_counter()
        chunks = map_chunks(chunk_token_lengths, (self, records), len(records), workers)
        lengths = [length for chunk in chunks for length in chunk]
        logger.info(f"Token lengths of {len(lengths)} records in {time.perf_counter() - began:.1f} s.")
        return lengths

    def record_token_lengths(self, records: Sequence[dict], indices: range) -> list[int]:
        """`token_lengths` of the records at `indices`, in this process."""
        processor, tokenizer = self.processor, self.processor.tokenizer
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
        anyres = getattr(processor.image_processor, "image_grid_pinpoints", None) is not None
        lengths = []
        for index in indices:
            messages, image_refs = record_to_messages(records[index], processor.image_token)
            text = processor.apply_chat_template(messages, tokenize=False)
            sizes = [self.image_size(ref) if anyres else (1, 1) for ref in image_refs]
            counts = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens if sizes else []
            replacements = [("image", processor.image_token_id, count) for count in counts]
            length = len(processor._tokenize(text, adds_bos, replacements)[0])
            length = min(length, self.max_length or length)
            lengths.append(length if image_refs else -length)
        return lengths

    def image_size(self, image: str | Path | Image.Image) -> tuple[int, int]:
        """`(height, width)` of an image, from its file's header (no pixels decoded)."""
        if isinstance(image, Image.Image):
            return image.height, image.width
        try:
            with Image.open(Path(self.image_folder or "") / image) as opened:
                return opened.height, opened.width
        except OSError:  # a missing or broken image: `encode` refuses the record, naming it
            return 1, 1

    def __call__(self, records: list[dict]) -> BatchFeature:
        encoded = [item for item in map(self.encode, records) if item is not None]
        if not encoded:
            raise ValueError(
                f"All {len(records)} records of the batch were dropped (see the warnings): none fits in "
                f"max_length={self.max_length} with an assistant reply to learn from."
            )
        return self.collate(encoded)

    def collate(self, encoded: list[tuple[list[int], list[int], dict[str, torch.Tensor]]]) -> BatchFeature:
        """One batch of encoded records (`encode`'s results): padded, or in one row with `padding_free`."""
        if self.padding_free:
            flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX, return_tensors="pt")
            batch = flat([{"input_ids": ids, "labels": labels} for ids, labels, _ in encoded])
        else:
            batch = self.pad(encoded)
        pixels = [record_pixels for _, _, record_pixels in encoded if record_pixels]
        if pixels:
            batch["pixel_values"] = concat_padded([p["pixel_values"] for p in pixels])
            for key in IMAGE_KEYS[1:]:  # AnyRes sizes; NaFlex patch masks and grids (every row max_num_patches long)
                if key in pixels[0]:
                    batch[key] = torch.cat([p[key] for p in pixels])
        return BatchFeature(dict(batch))

    def pad(self, encoded: list[tuple[list[int], list[int], dict]]) -> dict[str, torch.Tensor]:
        """Ids, attention mask and labels of the records, padded on the right to the longest."""
        length = max(len(ids) for ids, _, _ in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self.processor.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` (e.g. to the unk token).")
        return {
            "input_ids": torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _, _ in encoded]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _, _ in encoded]),
            "labels": torch.tensor([labels + [IGNORE_INDEX] * (length - len(labels)) for _, labels, _ in encoded]),
        }


def chunk_token_lengths(work: tuple, start: int, stop: int) -> list[int]:
    collator, records = work
    return collator.record_token_lengths(records, range(start, stop))


def concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the image axis, zero-padding AnyRes tile axes (dim 1 of 5-d tensors) to the longest."""
    if tensors[0].dim() == 5:
        tiles = max(t.shape[1] for t in tensors)
        tensors = [nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, tiles - t.shape[1])) for t in tensors]
    return torch.cat(tensors)
