"""Reading the inputs of a conversion: local folders or Hub repositories, their JSON files and weight files.

This module owns where the original checkpoint and the vision tower come from (a folder, or the files of a Hub
repository matching a pattern, downloaded), which weight files a folder holds (index-named shards, a single
safetensors or `.bin` file, with hints for projector-only or LoRA folders), and reading tensors from them safely
(`.bin` only with `weights_only=True`, memory-mapped, metadata without reading the data). It also defines
`CheckpointError`, the error every conversion step raises for a checkpoint it cannot convert faithfully.
"""

import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open


logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The checkpoint cannot be converted faithfully; the message says what was found and what to do."""


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` names a Hub repository (owner/name) rather than a local path: a path that does not exist,
    shaped like a Hub id, but under an existing local folder (a mistyped `runs/model`) is a missing folder."""
    text = str(source)
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not Path(text.split("/")[0]).expanduser().is_dir()


def resolve_source(source: str | os.PathLike, what: str, allow_patterns: list[str]) -> Path:
    """A local folder as is, or the files of a Hub repository matching `allow_patterns`, downloaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{what} {str(source)!r} is a file; pass the folder that holds it.")
    if not is_hub_id(source):
        raise CheckpointError(
            f"{what} {str(source)!r} is neither a local folder nor a Hub repository id (owner/name)."
        )
    logger.info("Downloading %s from the Hub: %s", what, source)
    return Path(snapshot_download(repo_id=str(source), allow_patterns=allow_patterns))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def weight_files(folder: Path, what: str) -> list[Path]:
    """The weight files of a folder: the shards named by an index, else a single safetensors or `.bin` file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            names = sorted(set(read_json(folder / index_name)["weight_map"].values()))
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise CheckpointError(f"{folder / index_name} names shards that are not in the folder: {missing}.")
            return [folder / name for name in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    hints = []
    if (folder / "mm_projector.bin").is_file():
        hints.append("it holds only a projector (mm_projector.bin): convert the full model instead")
    if (folder / "adapter_model.safetensors").is_file() or (folder / "adapter_model.bin").is_file():
        hints.append("it holds LoRA adapters: merge them into the base model with the original code first")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise CheckpointError(
        f"No weights found for the {what} in {folder}: expected model.safetensors, pytorch_model.bin, or a sharded "
        f"checkpoint with its .index.json{hint}."
    )


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict read with `weights_only=True` (never full unpickling), memory-mapped when possible."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # old (non-zip) format: no mmap
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds objects other than tensors, which a safe (weights_only) load refuses: {error}"
        ) from None


@contextmanager
def open_tensors(path: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """A getter for the tensors of one weight file, which stays open (memory-mapped) inside the block."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            yield f.get_tensor
    else:
        state = load_bin(path)
        try:
            yield state.__getitem__
        finally:
            state.clear()


def tensor_metadata(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in a weight file, without reading the data (headers / mmap)."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {
                name: (tuple(piece.get_shape()), SAFETENSORS_TO_TORCH[piece.get_dtype()])
                for name, piece in slices.items()
            }
    state = load_bin(path)
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in state.items()}


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


SAFETENSORS_TO_TORCH = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def source_weights(source: str, what: str) -> list[Path]:
    """The weight files of a local folder, or of a Hub repository downloading only them (safetensors if it has
    them, else `.bin`), never both formats."""
    if Path(source).expanduser().is_dir():
        return weight_files(Path(source).expanduser(), what)
    folder = resolve_source(source, what, ["*.json", "model.safetensors", "model-*.safetensors"])
    if not any(folder.glob("model*.safetensors")):
        folder = resolve_source(source, what, ["*.json", "pytorch_model.bin", "pytorch_model-*.bin"])
    return weight_files(folder, what)
