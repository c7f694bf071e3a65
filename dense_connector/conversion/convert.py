"""The conversion itself: decide everything, write into a staging folder, check it, then move it into place.

This module owns the order of the steps and their safety: `prepare_conversion` reads and translates everything and
plans every tensor before anything is written; `convert_checkpoint` writes the folder under a temporary name next to
the output, checks it, writes the model card, and renames it into place only when all passed, leaving nothing behind
on any failure (including Ctrl-C: `staged_output`, which building uses too); `upload` pushes the finished folder
to the Hub.
"""

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi
from transformers import PreTrainedTokenizerFast

from ..chat_templates import CHAT_TEMPLATES, STOP_TOKENS
from ..modeling_dense_connector import DenseConnectorForConditionalGeneration
from .config import Translation, translate_config
from .folder import build_generation_config, build_processor, model_card, summarize_dropped, write_code
from .sources import ConversionError, read_json, resolve_source, source_weights
from .tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, convert_tokenizer, default_conv_mode, padded_vocab_size
from .verify import compare_with_golden, load_converted, run_probe
from .weights import TensorPlan, plan_tensors, write_weights


logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


@contextmanager
def staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden staging folder next to `output`, moved into place when the block ends without error.

    On any failure, including Ctrl-C, the staging folder and the parent folders this created are removed, so nothing
    half-written is left. `output` is checked again just before the move (nobody may have filled it meanwhile).
    """
    created = [folder for folder in [output.parent, *output.parent.parents] if not folder.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result should not be
        yield staging
        check_output(output, overwrite)
        move_into_place(staging, output)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


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
    if conv_mode not in STOP_TOKENS:  # the conversation formats of inference (`plain` is stage-1 training only)
        raise ConversionError(f"--conv-mode {conv_mode!r} is not one of {sorted(STOP_TOKENS)}.")
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

    with staged_output(output, overwrite) as staging:
        write_folder(conversion, staging, max_shard_size, progress)
        checks = check_folder(staging, conversion.dtype, verify_against)
        write_model_card(conversion, staging, checks)
    for check in checks:
        logger.info("Check passed: %s", check)
    if push_to_hub:
        upload(output, push_to_hub, private=private, original=str(original))
    return output


def upload(
    folder: Path, repo_id: str, private: bool = False, original: str = "", commit_message: str | None = None
) -> str:
    """Upload the finished folder to the Hub in one commit; returns the repository id."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if commit_message is None:
        commit_message = f"Dense Connector converted from {original}" if original else "Dense Connector conversion"
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    logger.info("Uploaded %s to https://huggingface.co/%s", folder, repo_id)
    return repo_id
