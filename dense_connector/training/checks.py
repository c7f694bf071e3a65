"""The data check before training: every record, and one line per bad record naming it, the field and what to do.

`RecordChecker` checks a record's shape and keys (a near miss such as `conversation` or `imgae` is named), its
speakers or roles, that it has an assistant turn, its `<image>` placeholders against its images, the `plain`
format's rules (stage 1: one image, one user turn, one caption), that every image file exists and that Pillow reads
its header (nothing is decoded), and its length after image expansion against `--model_max_length`: estimated from
its texts' token counts, the chat template's tokens per turn and the processor's placeholders per image, it refuses a
record whose image placeholders (never cut) or first reply lie past the limit. `check_records` runs the checker over
a source in forked worker processes, chunk by chunk, each chunk's texts tokenised in one batch.
"""

import difflib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..chat_templates import CHAT_TEMPLATES
from .data import LLAVA_ROLES
from .parallel import map_chunks


CHAT_ROLES = ("user", "assistant", "system")
KNOWN_KEYS = ("conversations", "messages", "image", "images")
MAX_LINES = 50


@dataclass
class BadRecord:
    name: str
    field: str
    message: str
    index: int = -1

    def line(self) -> str:
        return f"{self.name}: `{self.field}`: {self.message}"


@dataclass
class DataReport:
    """What the check found in one source."""

    source: str
    checked: int
    bad: list[BadRecord] = field(default_factory=list)
    truncated: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.source}: {self.checked:,} records checked in {self.seconds:.1f} s, {len(self.bad):,} bad, "
                f"{self.truncated:,} longer than --model_max_length (their text is truncated)")  # fmt: skip


def near_miss(keys: list[str], wanted: str) -> str:
    """`` (is `conversation` a typo?)`` when one of `keys` is close to `wanted`."""
    close = difflib.get_close_matches(wanted, [key for key in keys if key not in KNOWN_KEYS], n=1, cutoff=0.6)
    return f" (is `{close[0]}` a typo of `{wanted}`?)" if close else ""


@dataclass
class Parsed:
    turns: list[tuple[str, str, int]]  # (role, text, image placeholders)
    images: list
    image_field: str
    conversation_field: str


class RecordChecker:
    """Checks records for training with `processor` (its template, placeholders, tokenizer) and `max_length`."""

    def __init__(self, processor, max_length: int | None):
        self.processor, self.max_length = processor, max_length
        self.image_token, self.tokenizer = processor.image_token, processor.tokenizer
        self.plain = processor.chat_template == CHAT_TEMPLATES["plain"]
        self.header, self.per_turn = self.template_tokens()
        self.image_tokens: dict[tuple[int, int], int] = {}

    def rendered_length(self, turns: int) -> int:
        messages = [{"role": ("user", "assistant")[k % 2], "content": "a"} for k in range(turns)]
        text = self.processor.apply_chat_template(messages, tokenize=False)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def template_tokens(self) -> tuple[int, float]:
        """Tokens the chat template adds before the first turn, and per turn (contents of one token each)."""
        one = self.rendered_length(2)
        try:
            per_pair = self.rendered_length(4) - one
        except Exception:  # a template for single exchanges (plain)
            per_pair = one
        return max(one - per_pair, 0), per_pair / 2

    def tokens_per_image(self, size: tuple[int, int]) -> int:
        if size not in self.image_tokens:
            counts = self.processor._get_num_multimodal_tokens(image_sizes=[size])
            self.image_tokens[size] = counts.num_image_tokens[0]
        return self.image_tokens[size]

    def parse(self, record: Any) -> Parsed | tuple[str, str]:
        """The record's turns and images, or the (field, message) of its first problem."""
        if not isinstance(record, dict):
            return "record", f"is a {type(record).__name__}, not an object with `conversations` or `messages`"
        if "video" in record or "videos" in record:
            return "video", "video records cannot be trained on; remove the record"
        keys = [str(key) for key in record]
        if "conversations" in record:
            parsed = self.parse_llava(record["conversations"])
            image = record.get("image")
            if not isinstance(parsed, tuple) and image is not None:
                parsed.images = list(image) if isinstance(image, list) else [image]
        elif "messages" in record:
            parsed = self.parse_chat(record)
        else:
            typo = near_miss(keys, "conversations") or near_miss(keys, "messages")
            return "conversations", (f"missing{typo}: a record needs `conversations` (LLaVA) or `messages` (chat); "
                                     f"its keys are {sorted(keys)}")  # fmt: skip
        if isinstance(parsed, tuple):
            return parsed
        if parsed.images is None:
            parsed.images = []
            placeholders = sum(count for _, _, count in parsed.turns)
            if placeholders:
                return parsed.image_field, (f"missing{near_miss(keys, parsed.image_field)}, but the text has "
                                            f"{placeholders} {self.image_token} placeholder(s); add the record's "
                                            "image or remove the placeholder")  # fmt: skip
        return parsed

    def parse_llava(self, conversations: Any) -> Parsed | tuple[str, str]:
        if not isinstance(conversations, list) or not conversations:
            return "conversations", 'must be a non-empty list of {"from": ..., "value": ...} turns'
        turns = []
        for number, turn in enumerate(conversations):
            where = f"conversations[{number}]"
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                return where, 'must be {"from": "human" or "gpt", "value": text}'
            if turn["from"] not in LLAVA_ROLES:
                return f"{where}.from", f"{turn['from']!r} is not a speaker; use human, gpt or system"
            if not isinstance(turn["value"], str):
                return f"{where}.value", f"must be text, not {type(turn['value']).__name__}"
            value = turn["value"]
            turns.append((LLAVA_ROLES[turn["from"]], value, value.count(self.image_token)))
        return Parsed(turns, None, "image", "conversations")

    def parse_chat(self, record: dict) -> Parsed | tuple[str, str]:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "messages", 'must be a non-empty list of {"role": ..., "content": ...} messages'
        turns, item_images = [], []
        for number, message in enumerate(messages):
            where = f"messages[{number}]"
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                return where, 'must be {"role": "user" or "assistant", "content": text or items}'
            if message["role"] not in CHAT_ROLES:
                return f"{where}.role", f"{message['role']!r} is not a role; use user, assistant or system"
            content = message["content"]
            if isinstance(content, str):
                turns.append((message["role"], content, content.count(self.image_token)))
                continue
            if not isinstance(content, list) or not all(isinstance(item, dict) for item in content):
                return f"{where}.content", 'must be text or a list of {"type": "text" or "image", ...} items'
            texts = [item.get("text") or "" for item in content if item.get("type") == "text"]
            images = [item for item in content if item.get("type") == "image"]
            if len(texts) + len(images) != len(content):
                return f"{where}.content", "has items whose `type` is neither text nor image"
            item_images += [item.get("image", item.get("path")) for item in images]
            text = " ".join(texts)
            turns.append((message["role"], text, len(images) + text.count(self.image_token)))
        if "images" in record:
            images = list(record["images"] or [])
        else:
            images = [image for image in item_images if image is not None] or None
        return Parsed(turns, images, "images", "messages")

    def problem(self, record: Any) -> tuple[str, str] | tuple[Parsed, list]:
        """The record's first problem before its length, or its parsed form and image sizes."""
        parsed = self.parse(record)
        if isinstance(parsed, tuple):
            return parsed
        roles = [role for role, _, _ in parsed.turns if role != "system"]
        if "assistant" not in roles:
            speaker = "`gpt`" if parsed.conversation_field == "conversations" else "`assistant`"
            return parsed.conversation_field, f"has no {speaker} turn to train on; add the reply or remove the record"
        placeholders = sum(count for _, _, count in parsed.turns)
        if placeholders != len(parsed.images):
            token = self.image_token
            message = f"{len(parsed.images)} image(s) but {placeholders} {token} placeholder(s) in the text"
            return parsed.image_field, f"{message}; give one {token} per image"
        if self.plain and (len(parsed.images) != 1 or roles != ["user", "assistant"]):
            what = f"{len(parsed.images)} image(s)" if len(parsed.images) != 1 else f"the turns {roles}"
            return parsed.image_field if len(parsed.images) != 1 else parsed.conversation_field, (
                f"the plain format (stage 1) takes one image, one user turn and one caption, not {what}; train "
                "conversations with --version v1 or llama_3"
            )
        sizes = []
        for number, image in enumerate(parsed.images):
            where = parsed.image_field if len(parsed.images) == 1 else f"{parsed.image_field}[{number}]"
            size = image_size(image)
            if isinstance(size, str):
                return where, size
            sizes.append(size)
        return parsed, sizes

    def length_problem(self, parsed: Parsed, sizes: list, text_tokens: list[int]) -> tuple[str, str] | None | bool:
        """A (field, message) if the placeholders or the first reply lie past `max_length`; `True` if only the
        text is too long (it is truncated); else `None`."""
        if self.max_length is None:
            return None
        position, image_end, reply_start, images = self.header, 0, None, iter(sizes)
        for (role, _, placeholders), tokens in zip(parsed.turns, text_tokens):
            position += self.per_turn
            if placeholders:
                position += sum(self.tokens_per_image(next(images, (1, 1))) for _ in range(placeholders))
                image_end = position
            if role == "assistant" and reply_start is None:
                reply_start = position
            position += 0 if self.plain and role == "user" else tokens
        limit = f"--model_max_length {self.max_length}"
        if image_end > self.max_length:
            return parsed.image_field, (f"its image placeholders end at about token {image_end:.0f}, past {limit} "
                                        "(placeholders are never cut); raise it or shorten the record")  # fmt: skip
        if reply_start is not None and reply_start >= self.max_length:
            return parsed.conversation_field, (
                f"its first reply starts at about token {reply_start:.0f}, past "
                f"{limit}: nothing would be trained; raise it or shorten the record"
            )
        return True if position > self.max_length else None

    def check(self, records: Sequence, indices: range, source: str) -> tuple[list[BadRecord], int]:
        """The bad records among `records[indices]`, and how many good ones will be truncated."""
        bad, pending = [], []
        for index in indices:
            record = records[index]
            found = self.problem(record)
            if isinstance(found[0], str):
                bad.append(BadRecord(record_label(source, index, record), *found, index))
            else:
                pending.append((index, record, *found))
        # Records that fit even at the most tokens their texts can make need no tokenising.
        pending = [item for item in pending if self.length_problem(item[2], item[3], most_tokens(item[2])) is not None]
        texts = [text.replace(self.image_token, "") for _, _, parsed, _ in pending for _, text, _ in parsed.turns]
        counts = iter(map(len, self.tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else iter(())
        truncated = 0
        for index, record, parsed, sizes in pending:
            found = self.length_problem(parsed, sizes, [next(counts) for _ in parsed.turns])
            if isinstance(found, tuple):
                bad.append(BadRecord(record_label(source, index, record), *found, index))
            truncated += found is True
        return bad, truncated


def most_tokens(parsed: Parsed) -> list[int]:
    """More tokens than each turn's text can make: one per UTF-8 byte (byte-level and byte-fallback vocabularies
    never split finer), plus one per space-separated word for a word-start marker."""
    return [len(text.encode("utf-8")) + text.count(" ") + 1 for _, text, _ in parsed.turns]


def image_size(image: Any) -> tuple[int, int] | str:
    """The (height, width) from an image's header, or what is wrong with it."""
    try:
        if isinstance(image, Image.Image):
            return image.height, image.width
        if isinstance(image, dict) and image.get("bytes") is not None:
            with Image.open(io.BytesIO(image["bytes"])) as opened:
                return opened.height, opened.width
        if isinstance(image, str | Path):
            if not Path(image).is_file():
                return f"{image} is not found; check --image_folder and the record's image path"
            with Image.open(image) as opened:
                return opened.height, opened.width
    except Exception as error:
        where = image if isinstance(image, str | Path) else "the embedded image"
        return f"{where} is not an image Pillow can read ({type(error).__name__}); replace or remove it"
    return f"must be an image path or an embedded image, not {type(image).__name__}"


def record_label(source: str, index: int, record: Any) -> str:
    """`data.json record 12 (id='abc')`: where a record is, and its `id` when it has one."""
    label = f"{source} record {index}"
    if isinstance(record, dict) and record.get("id") is not None:
        label += f" (id={record['id']!r})"
    return label


def check_chunk(work: tuple, start: int, stop: int) -> tuple[list[BadRecord], int]:
    checker, records, source = work
    return checker.check(records, range(start, stop), source)


def check_records(records: Sequence, checker: RecordChecker, source: str, workers: int | None = None) -> DataReport:
    """Check every record of `records`, in `workers` forked processes when there are enough records."""
    started = time.perf_counter()
    report = DataReport(source, len(records))
    for bad, truncated in map_chunks(check_chunk, (checker, records, source), len(records), workers):
        report.bad += bad
        report.truncated += truncated
    report.seconds = time.perf_counter() - started
    return report


def report_lines(reports: list[DataReport], limit: int | None = MAX_LINES) -> list[str]:
    """One line per bad record (the first `limit`), then how many more there are."""
    bad = [record for report in reports for record in report.bad]
    lines = [record.line() for record in (bad if limit is None else bad[:limit])]
    if limit is not None and len(bad) > limit:
        lines.append(f"... and {len(bad) - limit:,} more bad records")
    return lines
