"""`--to llava`: a Dense Connector checkpoint as a stock transformers Llava (or LLaVA-NeXT for AnyRes) folder.

The folder loads with `AutoModelForImageTextToText` / `AutoProcessor` and no remote code: no `auto_map`, no `.py`
files. The tower keeps its cut, `vision_feature_layer` lists the hidden states read (ascending), the first projector
layer is folded (`folding.py`), the processor is transformers' own with the checkpoint's image preprocessing,
tokenizer and chat template, and the generation config is copied. Tensors stream through the shared writer; the one
computed tensor (the folded weight) is staged in a side file so that it streams like the others.
"""

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)

from ..configuration_dense_connector import DenseConnectorConfig
from ..processing_dense_connector import DenseConnectorProcessor
from ..writing.sources import CheckpointError, open_tensors, tensor_metadata, weight_files
from ..writing.staging import check_output, staged_output
from ..writing.tensors import PlanBuilder, TensorPlan, write_weights
from .folding import REFERENCE_COSTS, Costs, Fold, fold_weight, plan_fold, projector_costs


FIRST_LAYER = "model.connector.projector.0.weight"
RENAMES = {
    "model.connector.projector.0.bias": "model.multi_modal_projector.linear_1.bias",
    "model.connector.projector.2.weight": "model.multi_modal_projector.linear_2.weight",
    "model.connector.projector.2.bias": "model.multi_modal_projector.linear_2.bias",
}


NOT_SETTINGS = ("auto_map", "image_processor_type", "processor_class")  # the saved processor's, not settings


@dataclass
class Source:
    """A Dense Connector checkpoint folder: its config, each weight file's tensors (name -> shape, dtype, from the
    file's header, read once), and the dtype of its weights."""

    folder: Path
    config: DenseConnectorConfig
    tensors: dict[Path, dict[str, tuple[tuple[int, ...], torch.dtype]]]
    dtype: torch.dtype


def read_source(model: str | Path) -> Source:
    """The checkpoint to export; refuses a folder that is not a (converted or built) Dense Connector checkpoint."""
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"--model {model} has no config.json; give a Dense Connector checkpoint folder.")
    try:
        config = DenseConnectorConfig.from_pretrained(folder)
    except (ValueError, TypeError, OSError) as error:
        raise CheckpointError(f"--model {model} is not a Dense Connector checkpoint: {error}") from None
    tensors = {path: tensor_metadata(path) for path in weight_files(folder, "Dense Connector checkpoint")}
    dtypes = {name: dtype for names in tensors.values() for name, (_, dtype) in names.items()}
    if FIRST_LAYER not in dtypes:
        raise CheckpointError(f"{folder} has no {FIRST_LAYER}; is it a Dense Connector checkpoint?")
    return Source(folder=folder, config=config, tensors=tensors, dtype=dtypes[FIRST_LAYER])


def anyres_refusal(config: DenseConnectorConfig) -> str | None:
    """Why LLaVA-NeXT would not compute what this AnyRes checkpoint does, or None."""
    tile = config.vision_config.image_size
    if [tile, tile] in [list(pinpoint) for pinpoint in config.image_grid_pinpoints]:
        return (
            f"its pinpoints include the single tile {tile}x{tile}, where the original keeps only the base image and "
            "LLaVA-NeXT adds the tile too"
        )
    return None


def stock_config(config: DenseConnectorConfig, fold: Fold) -> LlavaConfig | LlavaNextConfig:
    """The Llava (or, with AnyRes, LLaVA-NeXT) config computing what `config` does with the folded projector."""
    settings = {
        "vision_config": config.vision_config.to_dict(),
        "text_config": config.text_config.to_dict(),
        "image_token_index": config.image_token_id,
        "projector_hidden_act": config.projector_hidden_act,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_feature_layer": fold.feature_layers,
        "multimodal_projector_bias": config.multimodal_projector_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    if config.image_grid_pinpoints is None:
        return LlavaConfig(**settings, image_seq_length=config.num_image_tokens())
    reason = anyres_refusal(config)
    if reason:
        raise CheckpointError(f"cannot export this AnyRes checkpoint as a stock LLaVA-NeXT: {reason}.")
    return LlavaNextConfig(**settings, image_grid_pinpoints=config.image_grid_pinpoints)


def stock_class(config) -> type:
    return LlavaNextForConditionalGeneration if isinstance(config, LlavaNextConfig) else LlavaForConditionalGeneration


def expected_shapes(config: LlavaConfig | LlavaNextConfig) -> dict[str, tuple[int, ...]]:
    """The stock model's tensor names and shapes (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = stock_class(config)(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def plan_stock_tensors(source: Source, fold: Fold, config, side_file: Path) -> TensorPlan:
    """Every checkpoint tensor under its stock name; the folded first projector weight is computed into `side_file`."""
    channels = source.config.vision_config.hidden_size
    plan = PlanBuilder(expected_shapes(config), source.dtype)
    for path, names in source.tensors.items():
        for name, (shape, dtype) in names.items():
            if name == FIRST_LAYER:
                with open_tensors(path) as get:
                    folded = fold_weight(get(name), fold, channels)
                save_file({name: folded.contiguous()}, side_file)
                new = "model.multi_modal_projector.linear_1.weight"
                plan.add(side_file, name, new, tuple(folded.shape), dtype)
            else:
                plan.add(path, name, RENAMES.get(name, name), shape, dtype)
    return plan.finish(
        "checkpoint",
        "stock LLaVA model",
        unknown_hint="Is --model a Dense Connector checkpoint written by this package?",
        mismatch_hint="The checkpoint does not match its own config.json.",
    )


def plain_tokenizer(tokenizer):
    """`tokenizer` without its references to this package's processor (the `auto_map` and `processor_class` it was
    saved with), so that the folder it is saved into needs no remote code."""
    tokenizer.init_kwargs.pop("auto_map", None)
    tokenizer.init_kwargs.pop("processor_class", None)
    tokenizer._processor_class = None
    return tokenizer


def stock_processor(source: Source, config) -> LlavaProcessor | LlavaNextProcessor:
    """transformers' own processor with the checkpoint's image processor, tokenizer and chat template."""
    ours = DenseConnectorProcessor.from_pretrained(source.folder)
    drop_cls = config.vision_feature_select_strategy == "default"
    processor_class = LlavaNextProcessor if isinstance(config, LlavaNextConfig) else LlavaProcessor
    settings = {key: value for key, value in ours.image_processor.to_dict().items() if key not in NOT_SETTINGS}
    return processor_class(
        image_processor=type(ours.image_processor)(**settings),
        tokenizer=plain_tokenizer(ours.tokenizer),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=ours.chat_template,
        image_token=ours.image_token,
        num_additional_image_tokens=1 if drop_cls else 0,
    )


def num_params(config) -> int:
    """Parameters of a config's model (meta device)."""
    from transformers import AutoModel

    with torch.device("meta"):
        return sum(tensor.numel() for tensor in AutoModel.from_config(config).parameters())


def checkpoint_costs(source: Source, fold: Fold) -> Costs:
    config = source.config
    return projector_costs(
        channels=config.vision_config.hidden_size,
        states_before=len(fold.blocks),
        states_after=len(fold.feature_layers),
        width=config.text_config.hidden_size,
        tokens=config.num_image_tokens((config.vision_config.image_size,) * 2),
        tower_params=num_params(config.vision_config),
        lm_params=num_params(config.text_config),
    )


def cost_lines(costs: Costs) -> str:
    added = costs.flops_after - costs.flops_before
    return (
        f"first projector layer {costs.params_before:,} -> {costs.params_after:,} parameters; "
        f"{costs.flops_before / 1e9:.3g} -> {costs.flops_after / 1e9:.3g} GFLOPs per image, "
        f"+{100 * added / costs.prefill_flops:.2g}% of the image's prefill through tower and language model "
        f"({costs.prefill_flops / 1e9:.4g} GFLOPs)"
    )


CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- dense-connector
- {model_type}
---

# {name}: a Dense Connector checkpoint as a stock {architecture}

This folder is the Dense Connector (Yao et al., NeurIPS 2024) checkpoint `{source}` ({connector}, exported with
`dense-connector export --to llava`) written as transformers' own `{architecture}`: it loads with
`AutoModelForImageTextToText` / `AutoProcessor` without `trust_remote_code`, and serves wherever LLaVA does.

It computes what the original does. The projector's first layer is linear, so projecting the concatenated
(SCI) or group-averaged (DCI) hidden states equals one linear layer over the concatenation of every hidden state
read, `vision_feature_layer = {layers}`, with the weight blocks summed (and divided by the group size), computed in
float64 and stored in `{dtype}`. Tokenizer, chat template, image preprocessing and generation config are the
checkpoint's. Images only: the original's video path (frames pooled along the tokens) is not part of a stock Llava.

## What it costs

The first projector layer grows from {before} to {after} inputs ({states_before} -> {states_after} states of
{channels} channels):

- this checkpoint: {checkpoint_costs};
- CLIP ViT-L/14-336 with a 7B language model (DCI reads 24 states instead of 3): {reference_costs}.
"""


def model_card(source: Source, config, fold: Fold, name: str) -> str:
    channels = source.config.vision_config.hidden_size
    return CARD.format(
        name=name,
        model_type=config.model_type,
        architecture=config.architectures[0] if config.architectures else type(config).__name__,
        source=source.folder.name,
        connector=source.config.dense_connector_type.upper(),
        layers=fold.feature_layers,
        dtype=str(source.dtype).removeprefix("torch."),
        before=len(fold.blocks) * channels,
        after=len(fold.feature_layers) * channels,
        states_before=len(fold.blocks),
        states_after=len(fold.feature_layers),
        channels=channels,
        checkpoint_costs=cost_lines(checkpoint_costs(source, fold)),
        reference_costs=cost_lines(REFERENCE_COSTS),
    )


def write_stock_folder(source: Source, folder: Path, name: str, max_shard_size: int, progress: bool) -> None:
    """Write the stock model (config, weights, processor, generation config, model card) into `folder`."""
    fold = plan_fold(source.config)
    config = stock_config(source.config, fold)
    config.architectures = [stock_class(config).__name__]
    config.dtype = source.dtype
    with tempfile.TemporaryDirectory(prefix="dense-connector-export-") as scratch:
        plan = plan_stock_tensors(source, fold, config, Path(scratch) / "folded.safetensors")
        write_weights(plan, folder, max_shard_size, progress=progress)
    config.save_pretrained(folder)
    stock_processor(source, config).save_pretrained(folder)
    if (source.folder / "generation_config.json").is_file():
        shutil.copyfile(source.folder / "generation_config.json", folder / "generation_config.json")
    (folder / "README.md").write_text(model_card(source, config, fold, name), encoding="utf-8")


def export_llava(
    model: str | Path,
    output: str | Path,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    progress: bool = True,
) -> Path:
    """Export the Dense Connector checkpoint folder `model` as a stock Llava / LLaVA-NeXT folder at `output`.

    Refuses (`CheckpointError`, nothing written) STI, Efficient DC, projectors of other depths, and AnyRes pinpoints
    LLaVA-NeXT reads differently. Returns the written folder.
    """
    output = Path(output).expanduser()
    check_output(output, overwrite)
    source = read_source(model)
    stock_config(source.config, plan_fold(source.config))  # refusals before anything is staged
    with staged_output(output, overwrite) as staging:
        write_stock_folder(source, staging, output.name, max_shard_size, progress)
    return output
