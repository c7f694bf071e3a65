"""Instruction data for training: records read from LLaVA JSON / JSON Lines files and turned into chat messages.

`load_instruction_data` keeps a file's records as one compact buffer (parsed again on each read, so a 665K-record
mix costs little memory and nothing per dataloader worker); `record_to_messages` turns a record, in LLaVA's
`conversations` layout or as chat `messages`, into the messages and images the collator renders; `record_name`
names a record in error messages.
"""

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


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


def record_name(record: Any) -> str:
    """`Record id='...'` for records with an `id` (as LLaVA data has), else the start of its JSON."""
    if isinstance(record, dict) and "id" in record:
        return f"Record id={record['id']!r}"
    text = json.dumps(record, default=str)
    return f"Record {text[:100]}{'...' if len(text) > 100 else ''}"
