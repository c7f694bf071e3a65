"""The Dense Connector as one linear layer over concatenated tower states, the form stock LLaVA code runs.

The projector's first layer is linear, so projecting `cat(F, e_1, ..., e_k)` (SCI: `e_j` a hidden state; DCI:
`e_j` the mean of a group of hidden states) equals one linear layer over the concatenation of every hidden state read,
in ascending order, whose weight block for a state is the sum of the blocks that read it (each divided by its group's
size). transformers' Llava / LLaVA-NeXT (`vision_feature_layer` as a list) and llama.cpp's CLIP
(`clip.vision.feature_layer`) concatenate exactly those states along channels. STI appends pooled tokens along the
sequence and Efficient DC resamples the patch grid: neither is a linear map of concatenated channels, so both are
refused.
"""

from dataclasses import dataclass

import torch

from ..configuration_dense_connector import DenseConnectorConfig
from ..writing.sources import CheckpointError


@dataclass
class Fold:
    """Which hidden states the folded layer reads (ascending), and how each input block of the original's first
    projector layer spreads over them: `(block, [(state, weight), ...])`."""

    feature_layers: list[int]
    blocks: list[list[tuple[int, float]]]


def refusal(config: DenseConnectorConfig) -> str | None:
    """Why this checkpoint cannot be a stock LLaVA model (one sentence), or None if it can."""
    if config.dense_connector_type == "sti":
        return (
            "STI appends tokens pooled from other layers along the sequence, which no stock LLaVA model computes; "
            "only none, SCI and DCI fold into one"
        )
    if config.image_downsample_factor != 1:
        return (
            f"Efficient Dense Connector downsamples the patch grid (factor {config.image_downsample_factor}) before "
            "the projector, which no stock LLaVA model computes"
        )
    if config.projector_depth != 2:
        return f"stock LLaVA projectors have two linear layers; this one has {config.projector_depth}"
    if config.takes_patch_sequences:
        return "its tower takes patch sequences at each image's aspect ratio (SigLIP 2 NaFlex); stock LLaVA does not"
    if config.vision_feature_select_strategy == "default" and config.vision_prefix_tokens != 1:
        return (
            f"its tower puts {config.vision_prefix_tokens} non-patch tokens (CLS, registers) before the patches, and "
            "stock LLaVA drops exactly one"
        )
    return None


def plan_fold(config: DenseConnectorConfig) -> Fold:
    """The folded layer's hidden states and the original blocks' shares of them; refuses what cannot fold."""
    reason = refusal(config)
    if reason:
        raise CheckpointError(f"cannot export a {config.dense_connector_type.upper()} checkpoint: {reason}.")
    blocks = [[(config.feature_layer_index, 1.0)]]
    if config.dense_connector_type == "sci":
        blocks += [[(layer, 1.0)] for layer in config.dense_connector_layers]
    elif config.dense_connector_type == "dci":
        blocks += [[(layer, 1.0 / len(group)) for layer in group] for group in config.dense_connector_groups]
    layers = sorted({layer for block in blocks for layer, _ in block})
    return Fold(feature_layers=layers, blocks=blocks)


def fold_weight(weight: torch.Tensor, fold: Fold, channels: int) -> torch.Tensor:
    """The first projector layer's `(out, blocks * channels)` weight as `(out, len(feature_layers) * channels)`,
    summed in float64 and returned in `weight`'s dtype."""
    if weight.shape[1] != len(fold.blocks) * channels:
        raise CheckpointError(
            f"the projector's first layer takes {weight.shape[1]} inputs; the config reads {len(fold.blocks)} states "
            f"of {channels} channels."
        )
    folded = torch.zeros(weight.shape[0], len(fold.feature_layers) * channels, dtype=torch.float64)
    position = {layer: index for index, layer in enumerate(fold.feature_layers)}
    for index, block in enumerate(fold.blocks):
        source = weight[:, index * channels : (index + 1) * channels].to(torch.float64)
        for layer, share in block:
            start = position[layer] * channels
            folded[:, start : start + channels] += source * share
    return folded.to(weight.dtype)


@dataclass
class Costs:
    """What folding costs: the first projector layer's parameters and its multiply-adds for one image, before and
    after, beside the rest of the prefill of that image's tokens."""

    params_before: int
    params_after: int
    flops_before: float
    flops_after: float
    prefill_flops: float


def projector_costs(
    channels: int, states_before: int, states_after: int, width: int, tokens: int, tower_params: int, lm_params: int
) -> Costs:
    """Costs of the first projector layer (`channels` per state, `width` outputs) for one image of `tokens` tokens;
    `prefill_flops` is 2 FLOPs per parameter per token through the tower and the language model."""
    params = [states * channels * width + width for states in (states_before, states_after)]
    return Costs(
        params_before=params[0],
        params_after=params[1],
        flops_before=2.0 * tokens * (params[0] - width),
        flops_after=2.0 * tokens * (params[1] - width),
        prefill_flops=2.0 * tokens * (tower_params + lm_params),
    )


# CLIP ViT-L/14-336 (1024 channels, 24 layers: DCI reads hs[0..23]) with a 7B Llama (width 4096), 576 image tokens.
REFERENCE_COSTS = projector_costs(
    channels=1024, states_before=3, states_after=24, width=4096, tokens=576, tower_params=303_000_000,
    lm_params=6_740_000_000,
)  # fmt: skip
