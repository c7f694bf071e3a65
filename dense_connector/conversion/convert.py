"""The conversion itself: decide everything, write into a staging folder, check it, then move it into place.

This module owns the order of the steps and their safety: `prepare_conversion` reads and translates everything and
plans every tensor before anything is written; `convert_checkpoint` writes the folder under a temporary name next to
the output, checks it, writes the model card, and renames it into place only when all passed, leaving nothing behind
on any failure (including Ctrl-C: `staged_output`, which building uses too); `upload` pushes the finished folder
to the Hub.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from ..chat_templates import CHAT_TEMPLATES, STOP_TOKENS
from ..modeling_dense_connector import DenseConnectorForConditionalGeneration
from ..writing.folder import build_generation_config, build_processor, model_card, summarize_dropped, write_code
from ..writing.sources import CheckpointError, read_json, resolve_source, source_weights
from ..writing.staging import DTYPES, check_output, staged_output, upload
from ..writing.tensors import TensorPlan, plan_tensors, write_weights
from ..writing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, convert_tokenizer, default_conv_mode, padded_vocab_size
from ..writing.towers import Translation
from ..writing.verify import check_folder
from .config import translate_config


logger = logging.getLogger(__name__)

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
        raise CheckpointError("The config names no mm_vision_tower; pass --vision-tower.")
    tower_folder = resolve_source(tower_source, "vision tower", ["*.json"])
    stored_dtype = original_config.get("torch_dtype")
    torch_dtype = DTYPES[dtype or (stored_dtype if stored_dtype in DTYPES else "float32")]

    tokenizer = convert_tokenizer(original_folder, original_config)
    conv_mode = conv_mode or default_conv_mode(tokenizer)
    if conv_mode not in STOP_TOKENS:  # the conversation formats of inference (`plain` is stage-1 training only)
        raise CheckpointError(f"--conv-mode {conv_mode!r} is not one of {sorted(STOP_TOKENS)}.")
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
    write_code(conversion.meta_model, folder, config)
    config.save_pretrained(folder)
    build_generation_config(conversion.tokenizer, conversion.conv_mode).save_pretrained(folder)
    processor = build_processor(
        conversion.translation, conversion.tokenizer, conversion.tower_folder, CHAT_TEMPLATES[conversion.conv_mode]
    )
    processor.save_pretrained(folder)


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

    with staged_output(output, overwrite) as staging:
        write_folder(conversion, staging, max_shard_size, progress)
        checks = check_folder(staging, conversion.dtype, verify_against)
        write_model_card(conversion, staging, checks)
    for check in checks:
        logger.info("Check passed: %s", check)
    if push_to_hub:
        upload(output, push_to_hub, private=private, original=str(original))
    return output
