"""Convert checkpoints of the original Dense Connector release to this package's transformers format.

The original checkpoints (`HuanjinYao/DenseConnector-v1.5-*` and fine-tunes made with the authors' code) use the
LLaVA layout: one `LlavaLlamaForCausalLM` state dict, a flat config with `mm_*` fields, and a vision tower taken from
the Hub repository named in `mm_vision_tower`. `convert_checkpoint` translates the config, streams the tensors
shard by shard into safetensors shards (never holding the model in memory), converts the tokenizer, writes the
processor, chat template, generation config and model card, checks the result with a forward pass, and only then
moves the folder into place. Anything it does not understand stops it with a message saying what and why.
"""

import argparse
import ast
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import HfApi, snapshot_download
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Regex, normalizers, pre_tokenizers
from tqdm.auto import tqdm
from transformers import (
    AddedToken,
    AutoTokenizer,
    GenerationConfig,
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    PreTrainedTokenizerFast,
)
from transformers.dynamic_module_utils import custom_object_save

from .chat_templates import CHAT_TEMPLATES, stop_token_ids
from .configuration_dense_connector import DenseConnectorConfig
from .modeling_dense_connector import DenseConnectorForConditionalGeneration
from .processing_dense_connector import DenseConnectorProcessor


logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
VOCAB_MULTIPLE = 64
ORIGINAL_IMAGE_TOKEN_INDEX = -200

# Hidden states the original code hard-codes per tower family (`dense_connector.py` of the authors' repository).
ORIGINAL_CONNECTOR_LAYERS = {"clip": [7, 15], "siglip": [7, 15]}
ORIGINAL_DCI_GROUPS = {
    "clip": [list(range(0, 12)), list(range(12, 24))],
    "siglip": [list(range(0, 13)), list(range(13, 26))],
}
# The original SigLIP tower builds its config from these defaults for any field its saved config leaves out.
ORIGINAL_SIGLIP_DEFAULTS = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}

# Original config fields this converter reads.
HANDLED_FIELDS = {
    "mm_dense_connector_type",
    "mm_projector_type",
    "mm_hidden_size",
    "mm_vision_tower",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_patch_merge_type",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "use_mm_proj",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
}
# Fields that only steered training, or that the original loader overwrites at run time (`is_video`, `if_pool`).
IGNORED_FIELDS = {
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "pretrain_mm_mlp_adapter",
    "mm_projector_lr",
    "mm_vision_tower_lr",
    "freeze_backbone",
    "is_video",
    "if_pool",
}
BOOKKEEPING_FIELDS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path"}
# A field with one of these prefixes belongs to the multimodal wrapper: if it is not known above, it may change what
# the model computes, so the conversion stops rather than guessing.
MULTIMODAL_PREFIXES = ("mm_", "image_", "vision_", "video_", "s2", "tokenizer_", "tune_", "freeze_", "unfreeze_")
SENTENCEPIECE_SPACE = "\u2581"


class ConversionError(ValueError):
    """The checkpoint cannot be converted faithfully; the message says what was found and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Sources: local folders or Hub repositories
# ----------------------------------------------------------------------------------------------------------------


def resolve_source(source: str | os.PathLike, what: str, allow_patterns: list[str]) -> Path:
    """A local folder as is, or the files of a Hub repository matching `allow_patterns`, downloaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{what} {str(source)!r} is a file; pass the folder that holds it.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise ConversionError(
            f"{what} {str(source)!r} is neither a local folder nor a Hub repository id (owner/name)."
        )
    logger.info("Downloading %s from the Hub: %s", what, source)
    return Path(snapshot_download(repo_id=str(source), allow_patterns=allow_patterns))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing.") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None


def weight_files(folder: Path, what: str) -> list[Path]:
    """The weight files of a folder: the shards named by an index, else a single safetensors or `.bin` file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            names = sorted(set(read_json(folder / index_name)["weight_map"].values()))
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise ConversionError(f"{folder / index_name} names shards that are not in the folder: {missing}.")
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
    raise ConversionError(
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
        raise ConversionError(
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


# ----------------------------------------------------------------------------------------------------------------
# Config translation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Translation:
    """The converted config plus what the processor needs and notes for the log and model card."""

    config: DenseConnectorConfig
    tower: str  # "clip" or "siglip"
    preprocessing: str  # "pad", "anyres" or "square"
    notes: list[str] = field(default_factory=list)


def tower_vision_config(tower_config: dict) -> tuple[dict, str]:
    """The transformers vision config of the tower as the original runs it, and its family ("clip"/"siglip").

    SigLIP: the original builds the tower from its saved config, deletes the last encoder layer and the pooling head.
    """
    model_type = tower_config.get("model_type")
    if model_type in ("clip", "siglip"):
        vision = dict(tower_config.get("vision_config") or {})
        family = model_type
    elif model_type in ("clip_vision_model", "siglip_vision_model"):
        vision = dict(tower_config)
        family = model_type.split("_")[0]
    else:
        raise ConversionError(
            f"The vision tower config has model_type={model_type!r}; the original Dense Connector supports CLIP "
            "(clip / clip_vision_model) and SigLIP (siglip / siglip_vision_model) towers."
        )
    for key in (*BOOKKEEPING_FIELDS, "image_mean"):
        vision.pop(key, None)
    vision["model_type"] = f"{family}_vision_model"
    if family == "siglip":
        vision = {**ORIGINAL_SIGLIP_DEFAULTS, **vision}
        vision["num_hidden_layers"] -= 1
        vision["vision_use_head"] = False
    return vision, family


def _connector_type(original: dict) -> str:
    connector = original.get("mm_dense_connector_type")
    if connector is None:
        return "none"  # a plain LLaVA-1.5 checkpoint
    if connector not in ("sti", "sci", "dci"):
        raise ConversionError(
            f"mm_dense_connector_type={connector!r} is not supported; the original knows 'sti', 'sci' and 'dci' "
            "(or no field at all for plain LLaVA-1.5)."
        )
    return connector


def _projector(original: dict) -> int:
    """The projector depth of `mm_projector_type` (`linear` -> 1, `mlp{N}x_gelu` -> N)."""
    projector = original.get("mm_projector_type", "linear")
    if projector == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d+)x_gelu", str(projector))
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ConversionError(
        f"mm_projector_type={projector!r} is not supported; use 'linear' or 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu')."
    )


def _feature_selection(original: dict, family: str, connector: str, notes: list[str]) -> tuple[int, str]:
    """`vision_feature_layer` and `vision_feature_select_strategy` as the original tower selects its features."""
    if family == "siglip":
        notes.append(
            "SigLIP: the final feature is the last of the 26 kept layers and has no CLS token, whatever "
            "mm_vision_select_layer / mm_vision_select_feature say (the original SigLIP tower ignores them)."
        )
        return -1, "full"
    if "mm_vision_select_layer" not in original:
        raise ConversionError("The config has no mm_vision_select_layer, which the original CLIP tower requires.")
    layer = original["mm_vision_select_layer"]
    feature = original.get("mm_vision_select_feature", "patch")
    if feature == "patch":
        return layer, "default"
    if feature == "cls_patch" and connector == "none":
        return layer, "full"
    if feature == "cls_patch":
        raise ConversionError(
            f"mm_vision_select_feature='cls_patch' with the {connector!r} connector is not supported: the original "
            "keeps the CLS token in the final feature but drops it from the added layers, so it cannot fuse them."
        )
    raise ConversionError(f"mm_vision_select_feature={feature!r} is not supported; use 'patch' or 'cls_patch'.")


def _preprocessing(original: dict) -> tuple[str, list[list[int]] | None]:
    """The image preprocessing ("pad", "anyres", "square") and AnyRes pinpoints as `[height, width]` pairs."""
    aspect = original.get("image_aspect_ratio")
    merge = original.get("mm_patch_merge_type", "flat")
    if aspect in (None, "square"):
        preprocessing = "square"
    elif aspect in ("pad", "anyres"):
        preprocessing = aspect
    else:
        raise ConversionError(f"image_aspect_ratio={aspect!r} is not supported; use 'pad', 'anyres' or 'square'.")
    if preprocessing != "anyres":
        if merge not in ("flat", "spatial", "spatial_unpad"):
            raise ConversionError(f"mm_patch_merge_type={merge!r} is not supported; use 'flat' or 'spatial_unpad'.")
        return preprocessing, None
    if merge != "spatial_unpad":
        raise ConversionError(
            f"image_aspect_ratio='anyres' with mm_patch_merge_type={merge!r} is not supported; only 'spatial_unpad' "
            "(the released AnyRes checkpoint's setting: tiles re-assembled, unpadded, one image_newline per row)."
        )
    pinpoints = original.get("image_grid_pinpoints")
    if isinstance(pinpoints, str):
        try:
            pinpoints = ast.literal_eval(pinpoints)
        except (ValueError, SyntaxError):
            pinpoints = None
    if not pinpoints or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pinpoints):
        raise ConversionError(
            f"image_grid_pinpoints={original.get('image_grid_pinpoints')!r} must be a list of [width, height] pairs "
            "for image_aspect_ratio='anyres'."
        )
    return preprocessing, [[int(height), int(width)] for width, height in pinpoints]


def _check_fields(original: dict) -> None:
    """Stop on multimodal fields or values this converter does not know, listing them all."""
    known = HANDLED_FIELDS | IGNORED_FIELDS | BOOKKEEPING_FIELDS
    unknown = sorted(key for key in original if key.startswith(MULTIMODAL_PREFIXES) and key not in known)
    if unknown:
        raise ConversionError(
            f"The original config has fields this converter does not know: {unknown}. They may change what the model "
            "computes; convert only checkpoints made with the original Dense Connector / LLaVA-1.5 code."
        )
    architectures = original.get("architectures") or ["LlavaLlamaForCausalLM"]
    if "text_config" in original or original.get("model_type") not in ("llava", "llava_llama"):
        raise ConversionError(
            f"The config has model_type={original.get('model_type')!r} and architectures={architectures}; expected "
            "the original LLaVA layout (model_type 'llava_llama' or 'llava', LlavaLlamaForCausalLM)."
        )
    if architectures != ["LlavaLlamaForCausalLM"]:
        raise ConversionError(f"architectures={architectures} is not supported; expected ['LlavaLlamaForCausalLM'].")
    for name, value in (("mm_use_im_start_end", False), ("mm_use_im_patch_token", False), ("use_mm_proj", True)):
        if original.get(name, value) != value:
            raise ConversionError(
                f"{name}={original[name]!r} is not supported (the Dense Connector and LLaVA-1.5 releases use {value})."
            )
    padding_side = original.get("tokenizer_padding_side", "right")
    if padding_side not in ("left", "right"):
        raise ConversionError(f"tokenizer_padding_side={padding_side!r} must be 'left' or 'right'.")


def translate_config(
    original: dict, tower_config: dict, vocab_size: int, image_token_id: int, video_token_id: int, pad_token_id: int
) -> Translation:
    """The `DenseConnectorConfig` equivalent to an original config and the tower's own config."""
    _check_fields(original)
    notes: list[str] = []
    vision, family = tower_vision_config(tower_config)
    connector = _connector_type(original)
    depth = _projector(original)
    feature_layer, strategy = _feature_selection(original, family, connector, notes)
    preprocessing, pinpoints = _preprocessing(original)

    layers = ORIGINAL_CONNECTOR_LAYERS[family] if connector in ("sti", "sci") else None
    groups = ORIGINAL_DCI_GROUPS[family] if connector == "dci" else None
    states = {"sci": 1 + len(layers or []), "dci": 1 + len(groups or [])}.get(connector, 1)
    expected_width = vision["hidden_size"] * states
    if original.get("mm_hidden_size", expected_width) != expected_width:
        raise ConversionError(
            f"mm_hidden_size={original['mm_hidden_size']} does not match the tower (width {vision['hidden_size']}) "
            f"with the {connector!r} connector ({states} state(s) -> {expected_width}); is --vision-tower the right "
            "tower?"
        )

    text = {key: value for key, value in original.items() if key not in HANDLED_FIELDS | IGNORED_FIELDS}
    for key in BOOKKEEPING_FIELDS:
        text.pop(key, None)
    text.update(model_type="llama", vocab_size=vocab_size, pad_token_id=pad_token_id)
    config = DenseConnectorConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        dense_connector_type=connector,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        dense_connector_layers=layers,
        dense_connector_groups=groups,
        projector_hidden_act="gelu",
        projector_depth=depth,
        multimodal_projector_bias=True,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
    )
    try:
        config.validate_dense_connector()
    except ValueError as error:
        raise ConversionError(f"The translated config is not valid: {error}") from None
    config.architectures = [DenseConnectorForConditionalGeneration.__name__]
    return Translation(config=config, tower=family, preprocessing=preprocessing, notes=notes)


# ----------------------------------------------------------------------------------------------------------------
# Tensor names
# ----------------------------------------------------------------------------------------------------------------

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


def plan_tensors(
    checkpoint_files: list[Path],
    tower_files: Callable[[], list[Path]],
    tower_source: str,
    expected: dict[str, tuple[int, ...]],
    layers_used: int,
    dtype: torch.dtype,
) -> TensorPlan:
    """Map every tensor of the checkpoint (and of the tower when the checkpoint lacks it) onto the model's names.

    Stops, listing them, on tensors that map to nothing the model has, on tensors the model needs that no source
    holds, and on shapes that do not fit. `tower_files` is called only when the tower weights are needed.
    """
    entries, dropped, unknown, mismatched = [], {}, [], []

    def add(path: Path, name: str, new_name: str, shape: tuple[int, ...], tensor_dtype: torch.dtype) -> None:
        if new_name not in expected:
            unknown.append(name)
            return
        if new_name in RESIZED_EMBEDDINGS:
            if len(shape) != 2 or shape[1] != expected[new_name][1] or shape[0] > expected[new_name][0]:
                mismatched.append(f"{name}: {list(shape)} vs {list(expected[new_name])}")
            shape = expected[new_name]
        elif shape != tuple(expected[new_name]):
            mismatched.append(f"{name}: {list(shape)} vs {list(expected[new_name])}")
        entries.append(TensorEntry(path, name, new_name, shape, _target_dtype(tensor_dtype, dtype)))

    for path in checkpoint_files:
        for name, (shape, tensor_dtype) in tensor_metadata(path).items():
            new_name, reason = rename_checkpoint_tensor(name, layers_used)
            if new_name is None:
                dropped[name] = reason
            else:
                add(path, name, new_name, shape, tensor_dtype)

    tower_from = "checkpoint"
    if not any(entry.name.startswith("model.vision_tower.") for entry in entries):
        tower_from = tower_source
        for path in tower_files():
            for name, (shape, tensor_dtype) in tensor_metadata(path).items():
                if name.startswith(NOT_VISION_PREFIXES):
                    continue
                new_name, _ = rename_tower_tensor(name, layers_used)
                if new_name is not None:
                    add(path, name, new_name, shape, tensor_dtype)

    if unknown:
        raise ConversionError(
            f"{len(unknown)} tensor(s) fit nothing in the converted model, so converting would lose them: "
            f"{sorted(unknown)}. Is this an original Dense Connector / LLaVA-1.5 checkpoint?"
        )
    counts = Counter(entry.name for entry in entries)
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    missing = sorted(set(expected) - set(counts))
    if duplicates or missing or mismatched:
        problems = [f"missing: {missing}" if missing else "", f"given twice: {duplicates}" if duplicates else ""]
        problems.append(f"shapes that do not fit: {mismatched}" if mismatched else "")
        raise ConversionError(
            "The weights do not fit the converted config ("
            + "; ".join(p for p in problems if p)
            + "). Check that --vision-tower is the tower this checkpoint was trained with."
        )
    return TensorPlan(entries=entries, dropped=dropped, tower_from=tower_from)


# ----------------------------------------------------------------------------------------------------------------
# Streaming writer
# ----------------------------------------------------------------------------------------------------------------


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
    bar = tqdm(total=len(plan.entries), unit="tensor", desc="Converting weights", disable=not progress)
    with bar, ExitStack() as inputs:
        source, get = None, None
        for shard_name, shard in zip(names, shards):
            with open(folder / shard_name, "wb") as out:
                out.write(safetensors_header(shard))
                for entry in shard:
                    if entry.source != source:
                        inputs.close()  # release the previous input file before mapping the next one
                        source, get = entry.source, inputs.enter_context(open_tensors(entry.source))
                        bar.set_postfix_str(f"{entry.source.name} -> {shard_name}")
                    tensor = get(entry.original_name)
                    if entry.name in RESIZED_EMBEDDINGS:
                        tensor = append_rows(tensor, entry.shape[0])
                    tensor = tensor.to(entry.dtype)
                    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    del tensor  # so that closing an input file unmaps it
                    bar.update()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(entry.nbytes for entry in plan.entries)},
            "weight_map": {entry.name: name for name, shard in zip(names, shards) for entry in shard},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def sentencepiece_model(model_file: Path):
    """The parsed SentencePiece model proto (normalizer and trainer specs)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def sentencepiece_pipeline(proto, legacy: bool) -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer]:
    """Normalizer and pre-tokenizer that make the fast tokenizer split text as the original slow one does.

    The original code tokenises with transformers' slow `LlamaTokenizer`, i.e. SentencePiece with the model's own
    normalizer spec. transformers' fast conversion ignores that spec, so for models trained with
    `remove_extra_whitespaces` (runs of spaces collapsed, trailing spaces removed: a prompt chunk ending in "USER: "
    gets no trailing "▁") the ids differ. Non-legacy slow tokenizers (`legacy=False`) prefix the text with "▁" even
    when it starts with a space (" What" -> "▁▁What"), which the fast `Metaspace` does not; legacy ones let
    SentencePiece add its dummy prefix to every piece between special tokens.
    """
    spec = proto.normalizer_spec
    if not spec.escape_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix:
        raise ConversionError(
            "The SentencePiece model uses escape_whitespaces=False or treat_whitespace_as_suffix=True, which Llama "
            "tokenizers never do; this converter does not support it."
        )
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if not legacy:
        steps.append(normalizers.Replace(SENTENCEPIECE_SPACE, " "))
    if spec.remove_extra_whitespaces:
        # SentencePiece strips trailing whitespace after escaping it, so a trailing literal "▁" goes too.
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("[ \u2581]+\\z"), "")]
        if legacy:
            steps.append(normalizers.Replace(Regex("\\A +"), ""))
    if legacy:
        if spec.add_dummy_prefix:
            steps.append(normalizers.Prepend(SENTENCEPIECE_SPACE))
        scheme = "never"
    else:
        steps.append(normalizers.Replace(Regex("\\A "), "  "))
        scheme = "first"
    normalizer = normalizers.Sequence(steps) if steps else None
    return normalizer, pre_tokenizers.Metaspace(replacement=SENTENCEPIECE_SPACE, prepend_scheme=scheme, split=False)


def sentencepiece_tokenizer(folder: Path, **settings) -> PreTrainedTokenizerFast:
    """A fast tokenizer built from the original `tokenizer.model` that gives the original slow tokenizer's ids."""
    tokenizer_config = (
        read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    )
    legacy = tokenizer_config.get("legacy")
    legacy = True if legacy is None else bool(legacy)  # the slow LlamaTokenizer's default when unset
    with tempfile.TemporaryDirectory() as scratch:
        # Only the SentencePiece model and its configs, so that a stale tokenizer.json cannot take precedence.
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                shutil.copy(folder / name, scratch)
        converted = AutoTokenizer.from_pretrained(scratch, legacy=legacy)
    backend = converted.backend_tokenizer
    backend.normalizer, backend.pre_tokenizer = sentencepiece_pipeline(
        sentencepiece_model(folder / "tokenizer.model"), legacy
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=converted.bos_token,
        eos_token=converted.eos_token,
        unk_token=converted.unk_token,
        pad_token=converted.pad_token,
        clean_up_tokenization_spaces=False,
        **settings,
    )


def convert_tokenizer(folder: Path, original: dict) -> PreTrainedTokenizerFast:
    """The original tokenizer as a fast tokenizer with `<image>`/`<video>`, a pad token, and left padding."""
    # Left padding for batched generation; the original's training-time side is recorded in the model card.
    settings = {"padding_side": "left"}
    if original.get("tokenizer_model_max_length"):
        settings["model_max_length"] = int(original["tokenizer_model_max_length"])
    if (folder / "tokenizer.model").is_file():
        tokenizer = sentencepiece_tokenizer(folder, **settings)
    elif (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder, **settings)
    else:
        raise ConversionError(f"{folder} has neither tokenizer.model (SentencePiece) nor tokenizer.json.")
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (IMAGE_TOKEN, VIDEO_TOKEN)],
        special_tokens=True,
    )
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad_id = original.get("pad_token_id")
        if isinstance(pad_id, int) and 0 <= pad_id < len(tokenizer) and pad_id not in (tokenizer.eos_token_id,):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token  # what the original Vicuna training pads with
        elif "<|finetune_right_pad_id|>" in vocab:
            tokenizer.pad_token = "<|finetune_right_pad_id|>"
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_conv_mode(tokenizer) -> str:
    """`llama_3` for a Llama-3 tokenizer, `vicuna_v1` otherwise (the two formats of the released checkpoints)."""
    return "llama_3" if "<|eot_id|>" in tokenizer.get_vocab() else "vicuna_v1"


def padded_vocab_size(rows: int, tokenizer_size: int) -> int:
    return -(-max(rows, tokenizer_size) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ----------------------------------------------------------------------------------------------------------------
# Processor, generation config, model card
# ----------------------------------------------------------------------------------------------------------------

CLIP_PROCESSOR_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def image_processor_settings(tower: str, tower_folder: Path, image_size: int) -> dict:
    """Resize / crop / normalise settings of the original tower's image processor."""
    if tower == "siglip":  # the original SigLIP processor ignores saved settings: square resize, mean = std = 0.5
        square = {"height": image_size, "width": image_size}
        return {
            "size": square,
            "crop_size": square,
            "do_center_crop": False,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
        }
    settings = read_json(tower_folder / "preprocessor_config.json")
    settings = {key: settings[key] for key in CLIP_PROCESSOR_FIELDS if key in settings}
    size, crop = settings.get("size"), settings.get("crop_size")
    if isinstance(size, int):
        settings["size"] = size = {"shortest_edge": size}
    if isinstance(crop, int):
        settings["crop_size"] = crop = {"height": crop, "width": crop}
    if not size or "shortest_edge" not in size or crop != {"height": image_size, "width": image_size}:
        raise ConversionError(
            f"The CLIP preprocessor config in {tower_folder} has size={size}, crop_size={crop}; expected a "
            f"shortest-edge resize and a {image_size}x{image_size} crop matching the tower's image_size."
        )
    return settings


def build_processor(
    translation: Translation, tokenizer, tower_folder: Path, conv_mode: str
) -> DenseConnectorProcessor:
    config = translation.config
    settings = image_processor_settings(translation.tower, tower_folder, config.vision_config.image_size)
    if translation.preprocessing == "anyres":
        image_processor = LlavaNextImageProcessorPil(
            image_grid_pinpoints=config.image_grid_pinpoints, do_pad=True, **settings
        )
    else:
        image_processor = LlavaImageProcessorPil(do_pad=translation.preprocessing == "pad", **settings)
    return DenseConnectorProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATES[conv_mode],
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        patch_size=config.vision_config.patch_size,
        dense_connector_type=config.dense_connector_type,
        sti_pool_stride=config.sti_pool_stride,
        image_downsample_factor=config.image_downsample_factor,
        video_pool_stride=config.video_pool_stride,
    )


def build_generation_config(tokenizer, conv_mode: str) -> GenerationConfig:
    """Greedy by default; stops where the original conversation format stops; pads with the tokenizer's pad id."""
    stops = stop_token_ids(tokenizer, conv_mode)
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops[0] if len(stops) == 1 else stops,
        pad_token_id=tokenizer.pad_token_id,
    )


CONVERSION_CARD = """
## Conversion

Converted from the original Dense Connector checkpoint `{original}` (vision tower `{tower}`) with
`python conversion_scripts/convert_dense_connector_to_hf.py` of the `dense-connector` package.

- Connector `{connector}`, projector of depth {depth}, image preprocessing `{preprocessing}`, conversation format
  `{conv_mode}` (chat template included), weights in `{dtype}`.
- Tokenizer: `<image>` (id {image_token_id}) and `<video>` (id {video_token_id}) added; vocabulary {old_vocab} ->
  {new_vocab} rows (new rows are the mean of the original ones). Padding side `left` for batched generation (the
  original trained with `{padding_side}`).
- Vision tower weights from: {tower_from}. Tensors left out on purpose: {dropped}.
{notes}- Check after conversion: {verification}
"""


def model_card(
    model: DenseConnectorForConditionalGeneration, details: dict, notes: list[str], verification: str
) -> str:
    note_lines = "".join(f"- {note}\n" for note in notes)
    return model.model_card() + CONVERSION_CARD.format(**details, notes=note_lines, verification=verification)


def summarize_dropped(dropped: dict[str, str]) -> str:
    """'16 x vision-tower layer that is never run; ...' (or 'none')."""
    counts = Counter(dropped.values())
    return "; ".join(f"{count} x {reason}" for reason, count in sorted(counts.items())) or "none"


# ----------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------


def probe_image() -> Image.Image:
    """A fixed, non-square RGB image (so that padding and AnyRes paths are exercised)."""
    rows, cols = np.mgrid[0:48, 0:80]
    pixels = np.stack([rows * 5, cols * 3, (rows + cols) * 2], axis=-1) % 256
    return Image.fromarray(pixels.astype(np.uint8))


def load_converted(
    folder: Path, dtype: torch.dtype
) -> tuple[DenseConnectorForConditionalGeneration, DenseConnectorProcessor]:
    """Load the written folder with strict checks: every weight present, nothing unexpected, nothing resized.

    The check runs on a GPU when there is one; CPUs compute float16 very slowly, so there it runs in bfloat16.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    model, info = DenseConnectorForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, device_map=device, output_loading_info=True
    )
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise ConversionError(f"The written folder does not load cleanly: {problems}")
    return model.eval(), DenseConnectorProcessor.from_pretrained(folder)


def run_probe(model, processor) -> str:
    """One forward pass on a built-in image and chat prompt; the logits must be finite."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[probe_image()], text=prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits
    if not torch.isfinite(logits).all():
        raise ConversionError("The converted model gives non-finite logits on the built-in probe.")
    tokens = int(inputs["input_ids"].shape[1])
    return f"forward pass on a built-in image ({tokens} positions) gives finite logits"


def collapse_placeholders(ids: list[int], placeholder: int) -> list[int]:
    """Input ids with each run of image placeholders replaced by the original's single -200."""
    collapsed = []
    for token in ids:
        if token == placeholder:
            if not collapsed or collapsed[-1] != ORIGINAL_IMAGE_TOKEN_INDEX:
                collapsed.append(ORIGINAL_IMAGE_TOKEN_INDEX)
        else:
            collapsed.append(token)
    return collapsed


def golden_pixel_values(golden: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-image golden pixels: `pixel_values` split by image, or `pixel_values_0`, `pixel_values_1`, ..."""
    if "pixel_values" in golden:
        return list(golden["pixel_values"])
    return [golden[f"pixel_values_{i}"].squeeze(0) for i in range(len([k for k in golden if k.startswith("pixel")]))]


def compare_with_golden(model, processor, fixture: Path) -> str:
    """Run a fixture folder's prompt and images; compare with its recorded original outputs.

    float32 conversions must meet the fixtures' tolerances (pixels 1e-5, logits 1e-4, identical greedy ids);
    half-precision ones must give the same ids and pixels and logits within what their rounding allows.
    """
    meta = read_json(fixture / "meta.json")
    if meta.get("video"):
        raise ConversionError(f"{fixture} is a video fixture; --verify-against compares image fixtures only.")
    golden = load_file(fixture / "golden.safetensors")
    images = [Image.open(fixture / f"image{i}.png").convert("RGB") for i in range(meta.get("num_images", 1))]
    inputs = processor(images=images, text=meta["prompt"], return_tensors="pt")

    ids = collapse_placeholders(inputs["input_ids"][0].tolist(), model.config.image_token_id)
    if ids != golden["input_ids_original"][0].tolist():
        raise ConversionError(f"The processor's input ids differ from the original's in {fixture}.")
    pixel_error = 0.0
    for ours, theirs in zip(inputs["pixel_values"], golden_pixel_values(golden)):
        ours = ours[: theirs.shape[0]] if theirs.dim() == 4 else ours
        pixel_error = max(pixel_error, (ours.float() - theirs).abs().max().item())
    inputs = inputs.to(model.device)

    vocab = golden["logits_last32"].shape[-1]
    expected_ids = golden["generated_ids"][0, 1:].tolist()
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():  # the tower runs once, for both the forward pass and generation
        images = model.get_image_features(inputs["pixel_values"], image_sizes=inputs.get("image_sizes"))
        logits = model(**text, mm_encoder_outputs={"image": images}).logits[:, -32:, :vocab].float()
        generated = model.generate(
            **text, mm_encoder_outputs={"image": images}, max_new_tokens=len(expected_ids), do_sample=False
        )
    logit_error = (logits.cpu() - golden["logits_last32"]).abs().max().item()
    new_ids = generated[0, inputs["input_ids"].shape[1] :].tolist()

    half = model.dtype != torch.float32
    logit_tolerance = 1e-4 if not half else 2e-2 * max(1.0, golden["logits_last32"].abs().max().item())
    summary = (
        f"{fixture.name}: input ids identical, pixel_values max diff {pixel_error:.2e}, last-32 logits max diff "
        f"{logit_error:.2e}, greedy ids {'identical' if new_ids == expected_ids else 'different'}"
    )
    if pixel_error > 1e-5 or logit_error > logit_tolerance or (new_ids != expected_ids and not half):
        raise ConversionError(f"The converted model does not reproduce the original outputs: {summary}.")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} is a file; give a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"--output {output} is not empty; pass --overwrite to replace it.")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def move_into_place(staging: Path, output: Path) -> None:
    """Replace `output` by `staging` with renames only (the old folder is removed once the new one is in place)."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old)


def source_weights(source: str, what: str) -> list[Path]:
    """The weight files of a local folder, or of a Hub repository downloading only them (safetensors if it has
    them, else `.bin`), never both formats."""
    if Path(source).expanduser().is_dir():
        return weight_files(Path(source).expanduser(), what)
    folder = resolve_source(source, what, ["*.json", "model.safetensors", "model-*.safetensors"])
    if not any(folder.glob("model*.safetensors")):
        folder = resolve_source(source, what, ["*.json", "pytorch_model.bin", "pytorch_model-*.bin"])
    return weight_files(folder, what)


@dataclass
class Conversion:
    """Everything decided before anything is written: sources, tokenizer, config, and the tensor plan."""

    original: str
    tower_source: str
    tower_folder: Path
    original_config: dict
    tokenizer: PreTrainedTokenizerFast
    conv_mode: str
    translation: Translation
    meta_model: DenseConnectorForConditionalGeneration
    plan: TensorPlan
    dtype: torch.dtype


def prepare_conversion(
    original: str, vision_tower: str | None, dtype: str | None, conv_mode: str | None
) -> Conversion:
    """Read the original config and tokenizer, translate them, and map every tensor; stops on anything unknown."""
    original_folder = resolve_source(original, "original checkpoint", ["*.json", "*.model"])
    original_config = read_json(original_folder / "config.json")
    tower_source = vision_tower or original_config.get("mm_vision_tower")
    if not tower_source:
        raise ConversionError("The config names no mm_vision_tower; pass --vision-tower.")
    tower_folder = resolve_source(tower_source, "vision tower", ["*.json"])
    stored_dtype = original_config.get("torch_dtype")
    torch_dtype = DTYPES[dtype or (stored_dtype if stored_dtype in DTYPES else "float32")]

    tokenizer = convert_tokenizer(original_folder, original_config)
    conv_mode = conv_mode or default_conv_mode(tokenizer)
    if conv_mode not in CHAT_TEMPLATES:
        raise ConversionError(f"--conv-mode {conv_mode!r} is not one of {sorted(CHAT_TEMPLATES)}.")
    translation = translate_config(
        original_config,
        read_json(tower_folder / "config.json"),
        vocab_size=padded_vocab_size(int(original_config.get("vocab_size", len(tokenizer))), len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )
    config = translation.config
    config.dtype = str(torch_dtype).removeprefix("torch.")
    with torch.device("meta"):
        meta_model = DenseConnectorForConditionalGeneration(config)
    plan = plan_tensors(
        source_weights(str(original), "original checkpoint"),
        lambda: source_weights(str(tower_source), "vision tower"),
        str(tower_source),
        {name: tuple(tensor.shape) for name, tensor in meta_model.state_dict().items()},
        config.num_vision_layers_used,
        torch_dtype,
    )
    return Conversion(
        str(original),
        str(tower_source),
        tower_folder,
        original_config,
        tokenizer,
        conv_mode,
        translation,
        meta_model,
        plan,
        torch_dtype,
    )


def write_folder(conversion: Conversion, folder: Path, max_shard_size: int, progress: bool) -> None:
    """Weights, config with `auto_map` and code, generation config, processor (tokenizer, chat template)."""
    config = conversion.translation.config
    write_weights(conversion.plan, folder, max_shard_size, progress=progress)
    custom_object_save(conversion.meta_model, folder, config=config)
    config.save_pretrained(folder)
    build_generation_config(conversion.tokenizer, conversion.conv_mode).save_pretrained(folder)
    processor = build_processor(
        conversion.translation, conversion.tokenizer, conversion.tower_folder, conversion.conv_mode
    )
    processor.save_pretrained(folder)


def check_folder(folder: Path, dtype: torch.dtype, verify_against: str | os.PathLike | None) -> list[str]:
    """Load the written folder strictly, run the probe (and the fixture comparison); returns what passed."""
    model, processor = load_converted(folder, dtype)
    checks = [run_probe(model, processor)]
    if verify_against is not None:
        checks.append(compare_with_golden(model, processor, Path(verify_against)))
    return checks


def write_model_card(conversion: Conversion, folder: Path, checks: list[str]) -> None:
    config, original = conversion.translation.config, conversion.original_config
    details = {
        "original": conversion.original,
        "tower": conversion.tower_source,
        "connector": config.dense_connector_type,
        "depth": config.projector_depth,
        "preprocessing": conversion.translation.preprocessing,
        "conv_mode": conversion.conv_mode,
        "dtype": config.dtype,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "old_vocab": original.get("vocab_size", "?"),
        "new_vocab": config.text_config.vocab_size,
        "padding_side": original.get("tokenizer_padding_side", "right"),
        "tower_from": "the checkpoint"
        if conversion.plan.tower_from == "checkpoint"
        else f"`{conversion.plan.tower_from}`",
        "dropped": summarize_dropped(conversion.plan.dropped),
    }
    card = model_card(conversion.meta_model, details, conversion.translation.notes, "; ".join(checks) + ".")
    (folder / "README.md").write_text(card, encoding="utf-8")


def convert_checkpoint(
    original: str | os.PathLike,
    output: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    verify_against: str | os.PathLike | None = None,
    conv_mode: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    max_shard_size: int = 5 * 10**9,
    progress: bool = True,
) -> Path:
    """Convert an original Dense Connector checkpoint into a folder the Auto classes load; returns the folder.

    The folder is written next to `output` under a temporary name and renamed into place only after the result
    loaded cleanly and passed a forward pass (and `verify_against`, if given). On any failure, including Ctrl-C,
    nothing is left behind.
    """
    output = Path(output).expanduser().resolve()
    check_output(output, overwrite)
    conversion = prepare_conversion(str(original), vision_tower and str(vision_tower), dtype, conv_mode)
    for note in conversion.translation.notes:
        logger.info(note)
    logger.info("Tensors left out on purpose: %s", summarize_dropped(conversion.plan.dropped))

    created = [folder for folder in [output.parent, *output.parent.parents] if not folder.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result should not be
        write_folder(conversion, staging, max_shard_size, progress)
        checks = check_folder(staging, conversion.dtype, verify_against)
        write_model_card(conversion, staging, checks)
        check_output(output, overwrite)  # nobody filled it meanwhile
        move_into_place(staging, output)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    for check in checks:
        logger.info("Check passed: %s", check)
    if push_to_hub:
        upload(output, push_to_hub, private=private, original=str(original))
    return output


def upload(folder: Path, repo_id: str, private: bool = False, original: str = "") -> str:
    """Upload the finished folder to the Hub in one commit; returns the repository id."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=f"Dense Connector converted from {original}" if original else "Dense Connector conversion",
    )
    logger.info("Uploaded %s to https://huggingface.co/%s", folder, repo_id)
    return repo_id


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_size(size: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", size.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{size!r} is not a size like 5GB, 500MB or 2GiB.")
    number, unit, suffix = match.groups()
    base = 1024 if suffix == "IB" else 1000
    return int(float(number) * base ** "_KMGT".index(unit or "_"))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The conversion's command-line arguments, added to `parser` when given (e.g. a `dense-connector convert` one)."""
    parser = parser or argparse.ArgumentParser(
        prog="convert_dense_connector_to_hf",
        description="Convert an original Dense Connector (LLaVA-layout) checkpoint to a transformers folder.",
    )
    parser.add_argument("--original", required=True, help="folder or Hub id of the original checkpoint")
    parser.add_argument(
        "--vision-tower", help="folder or Hub id of the vision tower (default: the checkpoint's mm_vision_tower)"
    )
    parser.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weights dtype (default: the checkpoint's torch_dtype)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the converted folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument(
        "--verify-against", metavar="FIXTURE_DIR", help="compare with recorded original outputs (golden.safetensors)"
    )
    parser.add_argument(
        "--conv-mode", choices=sorted(CHAT_TEMPLATES), help="conversation format (default: from the tokenizer)"
    )
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=5 * 10**9, help="largest output shard (default: 5GB)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through convert_checkpoint, which removes its staging folder


def run_from_args(args: argparse.Namespace) -> int:
    """Run a parsed command line; returns the exit status (2 with a message when the checkpoint is refused).

    A termination signal (`kill`) is turned into an exit that cleans up like Ctrl-C does.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        folder = convert_checkpoint(
            original=args.original,
            output=args.output,
            vision_tower=args.vision_tower,
            dtype=args.dtype,
            overwrite=args.overwrite,
            verify_against=args.verify_against,
            conv_mode=args.conv_mode,
            push_to_hub=args.push_to_hub,
            private=args.private,
            max_shard_size=args.max_shard_size,
            progress=not args.no_progress,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print(f"Converted model written to {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


__all__ = ["ConversionError", "build_parser", "convert_checkpoint", "main", "run_from_args", "translate_config"]
