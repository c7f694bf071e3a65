"""Where training records come from: local instruction files, datasets through the `datasets` library, mixtures.

A `Source` is one `--data_path` file or one `--dataset_name` (a Hub id or a local folder of parquet, arrow or JSON
files, or one written by `save_to_disk`), with its image folder and weight. `load_records` gives its records as a
sequence of plain dicts in the collator's formats (LLaVA `conversations` + `image`, TRL's `messages` + `images`):
embedded images stay undecoded `{"bytes": ..., "path": ...}` dicts until the collator opens them, and image paths
are resolved against the source's image folder, so records of several sources can share a batch. `Mixture` draws
from several sources in proportion to their weights; `RecordSubset` keeps the records that passed the data check.
"""

import copy
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import UsageError, one_line
from .data import load_instruction_data


@dataclass
class Source:
    """One source of records, named as in a recipe's `datasets:` list."""

    data_path: str | None = None
    image_folder: str | None = None
    dataset_name: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    streaming: bool = False
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.data_path or self.dataset_name


SOURCE_KEYS = [f.name for f in fields(Source)]


def sources_from(data_args) -> list[Source]:
    """The sources the data options name: `--datasets` (a mixture), or one `--data_path` / `--dataset_name`."""
    if data_args.datasets:
        try:
            entries = json.loads(data_args.datasets)
        except json.JSONDecodeError as error:
            raise UsageError(f"--datasets is not a JSON list of sources: {error}") from None
        if not isinstance(entries, list) or not entries:
            raise UsageError("--datasets (a recipe's `datasets:`) must be a non-empty list of sources")
        defaults = {"image_folder": data_args.image_folder}
        return [checked_source({**defaults, **entry} if isinstance(entry, dict) else entry, n) for n, entry in
                enumerate(entries)]  # fmt: skip
    if not (data_args.data_path or data_args.dataset_name):
        raise UsageError("no training data: give --data_path FILE, --dataset_name NAME_OR_FOLDER, or a recipe's "
                         "`datasets:` list")  # fmt: skip
    keys = ("data_path", "image_folder", "dataset_name", "dataset_config", "dataset_split", "streaming")
    return [checked_source({key: getattr(data_args, key) for key in keys}, None)]


def checked_source(entry: Any, number: int | None) -> Source:
    where = "" if number is None else f"source {number} of `datasets`: "
    if not isinstance(entry, dict):
        raise UsageError(f"{where}a source is a mapping such as {{data_path: data.json, weight: 0.7}}")
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise UsageError(f"{where}unknown key `{unknown[0]}`; a source takes {', '.join(SOURCE_KEYS)}")
    source = Source(**entry)
    if bool(source.data_path) == bool(source.dataset_name):
        raise UsageError(f"{where}give either --data_path or --dataset_name (one source each)")
    if not (isinstance(source.weight, int | float) and source.weight > 0):
        raise UsageError(f"{where}`weight` must be a positive number, not {source.weight!r}")
    if source.data_path and not Path(source.data_path).is_file():
        raise UsageError(f"--data_path {source.data_path}: no such file")
    if source.image_folder and not Path(source.image_folder).is_dir():
        raise UsageError(f"--image_folder {source.image_folder}: no such folder")
    return source


def undecoded(features):
    """The dataset's features with every `Image` left undecoded (bytes and path), so rows read fast."""
    from datasets import Image

    features = copy.deepcopy(features)

    def visit(feature):
        if isinstance(feature, Image):
            feature.decode = False
        elif isinstance(feature, dict):
            for value in feature.values():
                visit(value)
        elif isinstance(feature, list | tuple):
            for value in feature:
                visit(value)
        elif hasattr(feature, "feature"):
            visit(feature.feature)

    visit(features)
    return features


def load_hub_dataset(source: Source):
    """The source's split through `datasets`: `load_from_disk` for a saved folder, else `load_dataset`."""
    import datasets

    name = source.dataset_name
    try:
        if (Path(name) / "state.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[source.dataset_split]
            if source.streaming:
                dataset = dataset.to_iterable_dataset()
        else:
            dataset = datasets.load_dataset(
                name, source.dataset_config, split=source.dataset_split, streaming=source.streaming
            )
    except KeyError:
        split = source.dataset_split
        raise UsageError(f"--dataset_name {name} has no split {split!r}; pass --dataset_split") from None
    except Exception as error:
        raise UsageError(f"--dataset_name {name} cannot be loaded: {one_line(error)}") from error
    columns = set(dataset.column_names or [])
    if columns and not columns & {"messages", "conversations"}:
        raise UsageError(f"--dataset_name {name} has no `messages` (TRL) or `conversations` (LLaVA) column; its "
                         f"columns are {sorted(columns)}")  # fmt: skip
    if source.streaming:
        return dataset.decode(False)
    return dataset.cast(undecoded(dataset.features)) if dataset.features else dataset


def resolve_image(image: Any, folder: str | None) -> Any:
    """A path under the source's image folder, embedded bytes as they are (an undecoded dict), PIL images as given."""
    if isinstance(image, dict) and image.get("bytes") is None and image.get("path"):
        image = image["path"]
    if isinstance(image, str) and folder:
        return str(Path(folder) / image)
    return image


def resolved(record: Any, folder: str | None) -> Any:
    """The record with its image references resolved (`image`, `images` and `{"type": "image"}` content items)."""
    if not isinstance(record, dict):
        return record
    record = dict(record)
    if isinstance(record.get("image"), list):
        record["image"] = [resolve_image(image, folder) for image in record["image"]]
    elif record.get("image") is not None:
        record["image"] = resolve_image(record["image"], folder)
    if isinstance(record.get("images"), list):
        record["images"] = [resolve_image(image, folder) for image in record["images"]]
    return record


class SourceRecords(Sequence):
    """One source's records with their image references resolved; `name` names the source in messages."""

    def __init__(self, records: Sequence, source: Source):
        self.records, self.source, self.name = records, source, source.name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return resolved(self.records[index], self.source.image_folder)


class StreamedRecords(torch.utils.data.IterableDataset):
    """A streamed source's records, resolved as they come; `check(record, number)` (set by the command) returns the
    record, `None` to skip it, or raises."""

    def __init__(self, dataset, source: Source):
        self.dataset, self.source, self.name, self.check = dataset, source, source.name, None

    def __iter__(self) -> Iterator[dict]:
        for number, row in enumerate(self.dataset):
            record = resolved(row, self.source.image_folder)
            if self.check is not None:
                record = self.check(record, number)
            if record is not None:
                yield record


def load_records(source: Source):
    """The source's records: a `SourceRecords` sequence, or `StreamedRecords` with `streaming`."""
    if source.data_path:
        try:
            records = load_instruction_data(source.data_path)
        except ValueError as error:
            raise UsageError(str(error)) from None
        return SourceRecords(records, source)
    dataset = load_hub_dataset(source)
    return StreamedRecords(dataset, source) if source.streaming else SourceRecords(dataset, source)


class RecordSubset(Sequence):
    """The records of `records` at `indices` (those that passed the data check)."""

    def __init__(self, records: Sequence, indices: Sequence[int]):
        self.records, self.indices = records, np.asarray(indices, dtype=np.int64)
        self.name = getattr(records, "name", "records")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.records[int(self.indices[index])]


class Mixture(Sequence):
    """Records of several sources, each contributing in proportion to its weight to an epoch as long as all of them
    together; a source drawn more often than it has records repeats, in a new random order each time; a source drawn
    less often contributes a random subset. The same seed gives the same mixture."""

    def __init__(self, parts: list[Sequence], weights: list[float], seed: int = 0):
        total, rng = sum(len(part) for part in parts), np.random.default_rng(seed)
        self.parts, self.part_of, self.index_in = parts, [], []
        for number, (part, weight) in enumerate(zip(parts, weights)):
            count = round(total * weight / sum(weights))
            if count and not len(part):
                raise UsageError(f"{getattr(part, 'name', number)} has no records left to mix in")
            rounds = [rng.permutation(len(part)) for _ in range(math.ceil(count / max(len(part), 1)))]
            chosen = np.concatenate(rounds)[:count] if rounds else np.zeros(0, dtype=np.int64)
            self.part_of.append(np.full(len(chosen), number, dtype=np.int64))
            self.index_in.append(chosen)
        self.part_of, self.index_in = np.concatenate(self.part_of), np.concatenate(self.index_in)
        self.name = " + ".join(str(getattr(part, "name", "records")) for part in parts)

    def __len__(self) -> int:
        return len(self.part_of)

    def __getitem__(self, index: int) -> dict:
        return self.parts[int(self.part_of[index])][int(self.index_in[index])]

    def counts(self) -> list[int]:
        """How many of the mixture's records each source gives."""
        return np.bincount(self.part_of, minlength=len(self.parts)).tolist()
