"""The tensors of a conversion: their new names, the plan of what is written, and the streaming safetensors writer.

This module owns the renaming of the original checkpoint's tensors (and of a separate tower's) onto the model's state
dict, the plan that checks every tensor fits (nothing unknown, nothing missing, no shape mismatch; embedding rows
padded to the new vocabulary) before anything is written, and `write_weights`, which streams the planned tensors
shard by shard into safetensors files so that memory never holds more than one input file (memory-mapped) and one
tensor.
"""

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .load_rules import Fused, LoadRules
from .sources import SAFETENSORS_DTYPES, CheckpointError, open_tensors, tensor_metadata


CHECKPOINT_TOWER_PREFIX = "model.vision_tower.vision_tower."
RESIZED_EMBEDDINGS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
NOT_VISION_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias")


def rename_tower_tensor(name: str, layers_used: int) -> tuple[str | None, str | None]:
    """(new name, None), or (None, why it is dropped), for a tower tensor named as in a `*VisionModel` state dict."""
    name = name.removeprefix("vision_model.")
    layer = re.match(r"encoder\.layers\.(\d+)\.", name)
    if layer and int(layer.group(1)) >= layers_used:
        return None, "vision-tower layer that is never run"
    if name.startswith("head."):
        return None, "SigLIP pooling head (the original removes it)"
    if name == "embeddings.position_ids":
        return None, "position-id buffer (rebuilt by transformers)"
    return f"model.vision_tower.{name}", None


def rename_checkpoint_tensor(name: str, layers_used: int) -> tuple[str | None, str | None]:
    """(new name, None), or (None, why it is dropped), for a tensor of the original checkpoint.

    Names that fit no rule come back under `model.language_model.` and are then rejected as unknown by the check
    against the model's own state dict.
    """
    if name.startswith(CHECKPOINT_TOWER_PREFIX):
        return rename_tower_tensor(name[len(CHECKPOINT_TOWER_PREFIX) :], layers_used)
    projector = re.fullmatch(r"model\.mm_projector\.(?:(\d+)\.)?(weight|bias)", name)
    if projector:
        return f"model.connector.projector.{projector.group(1) or 0}.{projector.group(2)}", None
    if name in ("model.image_newline", "lm_head.weight"):
        return name, None
    if re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
        return None, "rotary-embedding buffer (rebuilt by transformers)"
    if name.startswith("model."):
        return f"model.language_model.{name[len('model.') :]}", None
    return name, None


@dataclass
class TensorEntry:
    """One tensor to write: where it comes from, its new name, and its shape and dtype on disk."""

    source: Path
    original_name: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fused: Fused | None = None  # made from several checkpoint tensors by a transformers converter (MoE experts)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class TensorPlan:
    entries: list[TensorEntry]
    dropped: dict[str, str]  # original name -> reason
    tower_from: str  # "checkpoint", or the tower folder / Hub id the tower weights came from


def _target_dtype(dtype: torch.dtype, target: torch.dtype) -> torch.dtype:
    return target if dtype.is_floating_point else dtype


class PlanBuilder:
    """Collects the tensors to write, each checked against the model's state dict, and finishes them into a plan.

    `expected` maps the model's tensor names to shapes; embedding matrices may have fewer rows (they are padded to the
    new vocabulary when written). `finish` stops, listing them, on tensors that map to nothing the model has, on
    tensors the model needs that no source holds, on tensors given twice and on shapes that do not fit.
    """

    def __init__(self, expected: dict[str, tuple[int, ...]], dtype: torch.dtype):
        self.expected, self.dtype = expected, dtype
        self.entries: list[TensorEntry] = []
        self.dropped: dict[str, str] = {}
        self.unknown: list[str] = []
        self.mismatched: list[str] = []

    def add(self, path: Path, name: str, new_name: str, shape: tuple[int, ...], tensor_dtype: torch.dtype) -> None:
        expected = self.expected.get(new_name)
        if expected is None:
            self.unknown.append(name)
            return
        if new_name in RESIZED_EMBEDDINGS:
            if len(shape) != 2 or shape[1] != expected[1] or shape[0] > expected[0]:
                self.mismatched.append(f"{name}: {list(shape)} vs {list(expected)}")
            shape = expected
        elif shape != tuple(expected):
            self.mismatched.append(f"{name}: {list(shape)} vs {list(expected)}")
        self.entries.append(TensorEntry(path, name, new_name, shape, _target_dtype(tensor_dtype, self.dtype)))

    def add_tower(self, tower_files: list[Path], layers_used: int) -> None:
        """The vision model's tensors of a tower repository (`*VisionModel`, or the vision half of `CLIPModel` /
        `SiglipModel`), up to the deepest layer the connector reads."""
        for path in tower_files:
            for name, (shape, tensor_dtype) in tensor_metadata(path).items():
                new_name, reason = rename_tower_tensor(name, layers_used)
                if name.startswith(NOT_VISION_PREFIXES):
                    new_name, reason = None, "text half of the tower repository"
                if new_name is None:
                    self.dropped[name] = reason
                else:
                    self.add(path, name, new_name, shape, tensor_dtype)

    def add_model(
        self,
        files: list[Path],
        rules: LoadRules,
        place: Callable[[str], tuple[str | None, str | None]],
        strip: str = "",
    ) -> None:
        """The tensors of a transformers model's repository (a tower, a causal LM), renamed and fused as transformers
        does when it loads them (`rules`), then named in the built model by `place` (the model's name -> our name, or
        None and why it is left out). With `strip`, only the tensors under that prefix belong to the model."""
        for path in files:
            for name, (shape, tensor_dtype) in tensor_metadata(path).items():
                if not name.startswith(strip):
                    self.dropped[name] = "outside the model built from the repository (e.g. a text half)"
                    continue
                target, pattern = rules.rename(name[len(strip) :])
                new_name, reason = place(target)
                if new_name is None:
                    self.dropped[name] = reason
                elif pattern is None:
                    self.add(path, name, new_name, shape, tensor_dtype)
                else:
                    fused = rules.collect(path, name, target, pattern)
                    if fused is not None:
                        self.add_fused(fused, target, new_name, tensor_dtype)

    def add_fused(self, fused: Fused, target: str, new_name: str, tensor_dtype: torch.dtype) -> None:
        """Every tensor `fused`'s converter makes (one per target pattern), planned with the model's shapes."""
        patterns = fused.converter.target_patterns
        for pattern in patterns:
            name, ours = target.replace(patterns[0], pattern), new_name.replace(patterns[0], pattern)
            if ours not in self.expected:
                self.unknown.append(name)
                continue
            dtype = _target_dtype(tensor_dtype, self.dtype)
            self.entries.append(TensorEntry(fused.parts[0][0], name, ours, tuple(self.expected[ours]), dtype, fused))

    def has_tower(self) -> bool:
        return any(entry.name.startswith("model.vision_tower.") for entry in self.entries)

    def finish(self, tower_from: str, what: str, unknown_hint: str, mismatch_hint: str) -> "TensorPlan":
        """The plan (`tower_from` says where the tower came from, `what` names the result in messages)."""
        if self.unknown:
            raise CheckpointError(
                f"{len(self.unknown)} tensor(s) fit nothing in the {what}, which would lose them: "
                f"{sorted(self.unknown)}. {unknown_hint}"
            )
        counts = Counter(entry.name for entry in self.entries)
        duplicates = sorted(name for name, count in counts.items() if count > 1)
        missing = sorted(set(self.expected) - set(counts))
        if duplicates or missing or self.mismatched:
            problems = [f"missing: {missing}" if missing else "", f"given twice: {duplicates}" if duplicates else ""]
            problems.append(f"shapes that do not fit: {self.mismatched}" if self.mismatched else "")
            listed = "; ".join(problem for problem in problems if problem)
            raise CheckpointError(f"The weights do not fit the {what}'s config ({listed}). {mismatch_hint}")
        return TensorPlan(entries=self.entries, dropped=self.dropped, tower_from=tower_from)


def plan_tensors(
    checkpoint_files: list[Path],
    tower_files: Callable[[], list[Path]],
    tower_source: str,
    expected: dict[str, tuple[int, ...]],
    layers_used: int,
    dtype: torch.dtype,
) -> TensorPlan:
    """Map every tensor of the checkpoint (and of the tower when the checkpoint lacks it) onto the model's names.

    Stops as `PlanBuilder.finish` does. `tower_files` is called only when the tower weights are needed.
    """
    plan = PlanBuilder(expected, dtype)
    for path in checkpoint_files:
        for name, (shape, tensor_dtype) in tensor_metadata(path).items():
            new_name, reason = rename_checkpoint_tensor(name, layers_used)
            if new_name is None:
                plan.dropped[name] = reason
            else:
                plan.add(path, name, new_name, shape, tensor_dtype)
    tower_from = "checkpoint"
    if not plan.has_tower():
        tower_from = tower_source
        plan.add_tower(tower_files(), layers_used)
    return plan.finish(
        tower_from,
        "converted model",
        unknown_hint="Is this an original Dense Connector / LLaVA-1.5 checkpoint?",
        mismatch_hint="Check that --vision-tower is the tower this checkpoint was trained with.",
    )


def shard_plan(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive groups of entries, each at most `max_shard_bytes` (a larger single tensor gets its own shard)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def safetensors_header(entries: list[TensorEntry]) -> bytes:
    """The safetensors header (length prefix + JSON, padded to 8 bytes) for `entries` laid out in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in entries:
        header[entry.name] = {
            "dtype": SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def append_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with rows appended up to `rows`, each the mean of the existing rows (as llava-hf initialises them)."""
    if rows == weight.shape[0]:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def read_planned(entries: list[TensorEntry]) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Each planned tensor in order, read, padded to its planned rows and cast; one input file is open
    (memory-mapped) at a time, released before the next one is mapped."""
    with ExitStack() as inputs:
        source, get = None, None
        for entry in entries:
            if entry.fused is not None:
                yield entry, fused_tensor(entry).to(entry.dtype)
                continue
            if entry.source != source:
                inputs.close()
                source, get = entry.source, inputs.enter_context(open_tensors(entry.source))
            tensor = get(entry.original_name)
            if entry.name in RESIZED_EMBEDDINGS:
                tensor = append_rows(tensor, entry.shape[0])
            yield entry, tensor.to(entry.dtype)
            del tensor  # so that closing an input file unmaps it


def fused_tensor(entry: TensorEntry) -> torch.Tensor:
    """A fused tensor, its parts read from their files (memory-mapped only while it is made)."""
    with ExitStack() as files:
        getters = {}

        def get(path: Path, name: str) -> torch.Tensor:
            if path not in getters:
                getters[path] = files.enter_context(open_tensors(path))
            return getters[path](name)

        tensor = entry.fused.tensor(get, entry.original_name).clone()
    if tuple(tensor.shape) != entry.shape:  # e.g. experts missing from the checkpoint
        parts = [name for _, name, _ in entry.fused.parts]
        raise CheckpointError(
            f"{entry.original_name}, made from {len(parts)} tensor(s) ({parts[0]}, ...), has shape "
            f"{list(tensor.shape)}; the model's config needs {list(entry.shape)}."
        )
    return tensor


def write_weights(plan: TensorPlan, folder: Path, max_shard_bytes: int, progress: bool = True) -> list[str]:
    """Stream every planned tensor into safetensors shards in `folder`; returns the shard file names.

    Each shard's header is written first (names, shapes and dtypes are known from the plan), then the tensors one by
    one, so memory holds at most the input file being read (memory-mapped) and one tensor, never an output shard.
    """
    shards = shard_plan(plan.entries, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    bar = tqdm(total=len(plan.entries), unit="tensor", desc="Writing weights", disable=not progress)
    with bar, closing(read_planned(plan.entries)) as tensors:
        for shard_name, shard in zip(names, shards):
            with open(folder / shard_name, "wb") as out:
                out.write(safetensors_header(shard))
                for entry, tensor in islice(tensors, len(shard)):
                    bar.set_postfix_str(f"{entry.source.name} -> {shard_name}", refresh=False)
                    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    del tensor
                    bar.update()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(entry.nbytes for entry in plan.entries)},
            "weight_map": {entry.name: name for name, shard in zip(names, shards) for entry in shard},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names
