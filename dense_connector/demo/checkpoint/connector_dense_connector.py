"""The Dense Connector itself: which vision-tower hidden states it reads, how it fuses them, and its projector.

`DenseConnector` runs the vision tower once under hooks on its encoder layers (found by `encoder_layers`) that keep
only what the connector type reads: the final feature `F`, the STI/SCI layers, or a running float32 mean per DCI
group, never the whole stack of hidden states. It then fuses them (STI appends pooled tokens, SCI/DCI concatenate
channels), optionally downsamples the patch grid (Efficient Dense Connector), and projects the result to the language
model's width. `modeling_dense_connector.py` builds the full model around it; this file ships beside it for
`trust_remote_code` and imports only torch, transformers and the configuration module.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput

from .configuration_dense_connector import DenseConnectorConfig, side


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The tower's list of transformer layers, wherever the tower keeps it (`encoder.layers` for CLIP and SigLIP,
    `encoder.layer` for DINOv2 and InternViT, `model.layer` for DINOv3): the `nn.ModuleList` of `num_hidden_layers`
    modules reached by the shortest attribute path. Attribute access goes through wrappers that keep copies of the
    tower (PEFT's `modules_to_save`) to the copy they run."""
    num_layers = vision_tower.config.num_hidden_layers
    names = [
        name.split(".")
        for name, module in vision_tower.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    paths = sorted({tuple(name[start:]) for name in names for start in range(len(name))}, key=len)
    for path in paths:
        module = vision_tower
        for attribute in path:
            module = getattr(module, attribute, None)
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(
        f"{type(vision_tower).__name__} has no list of {num_layers} encoder layers; Dense Connector supports "
        "vision towers that keep their transformer layers in one list (CLIP, SigLIP, DINOv2, ...)."
    )


def valid_patch_counts(
    config: DenseConnectorConfig,
    pixel_values: torch.Tensor,
    pixel_attention_mask: torch.Tensor | None,
    spatial_shapes: torch.Tensor | None,
) -> list[int]:
    """Each image's number of valid patches (they lead its row), after refusing patch sequences that a tower taking
    them (SigLIP 2 NaFlex) cannot encode."""
    vision = config.vision_config
    width = vision.num_channels * side(vision.patch_size) ** 2
    if pixel_values.dim() != 3 or pixel_values.shape[-1] != width or pixel_attention_mask is None:
        raise ValueError(
            f"This model's tower takes patch sequences (SigLIP 2 NaFlex): pixel_values of shape (num_images, "
            f"max_num_patches, {width}) with pixel_attention_mask and spatial_shapes; got pixel_values of shape "
            f"{tuple(pixel_values.shape)}. Prepare images with the model's processor."
        )
    if spatial_shapes is None:
        raise ValueError("This model's tower takes patch sequences (SigLIP 2 NaFlex) and needs spatial_shapes too.")
    counts = [int(rows * cols) for rows, cols in spatial_shapes.tolist()]
    if len(counts) != len(pixel_values) or any(count > pixel_values.shape[1] for count in counts):
        raise ValueError(
            f"spatial_shapes give {counts} patches for {len(pixel_values)} image(s) of at most "
            f"{pixel_values.shape[1]} patches each; prepare images with the model's processor."
        )
    return counts


def zero_image(config: DenseConnectorConfig, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """One zero image as the tower takes it, and what the connector needs with it: a tower-sized square image, or for
    a tower taking patch sequences one sequence over its whole square position grid with its mask and grid."""
    vision = config.vision_config
    if not config.takes_patch_sequences:
        size = (1, vision.num_channels, config.tower_image_size, config.tower_image_size)
        return torch.zeros(size, device=device, dtype=dtype), {}
    rows = math.isqrt(vision.num_patches)
    size = (1, rows * rows, vision.num_channels * side(vision.patch_size) ** 2)
    return torch.zeros(size, device=device, dtype=dtype), {
        "pixel_attention_mask": torch.ones(size[:2], device=device, dtype=torch.long),
        "spatial_shapes": torch.tensor([[rows, rows]], device=device),
        "valid_tokens": [rows * rows],
    }


class DenseConnector(nn.Module):
    """Selects hidden states from the vision tower, fuses them by connector type, and projects them to the LM width.

    The tower runs under hooks that keep only what the connector reads: the final feature, the STI/SCI
    layers, and running sums for the DCI groups (never the whole stack of hidden states).
    """

    def __init__(self, config: DenseConnectorConfig):
        super().__init__()
        self.connector_type = config.dense_connector_type
        self.feature_layer = config.feature_layer_index
        self.layers = list(config.dense_connector_layers or []) if self.connector_type in ("sti", "sci") else []
        self.groups = [list(g) for g in config.dense_connector_groups or []] if self.connector_type == "dci" else []
        # Leading tokens that are not patches (CLS, registers), dropped from every state read.
        self.prefix_tokens = config.vision_prefix_tokens if config.vision_feature_select_strategy == "default" else 0
        self.sti_pool_stride = config.sti_pool_stride
        self.downsample_factor = config.image_downsample_factor

        in_features = config.vision_config.hidden_size * config.num_connector_states
        hidden_size = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        layers = [nn.Linear(in_features, hidden_size, bias=bias)]
        for _ in range(config.projector_depth - 1):
            layers += [ACT2FN[config.projector_hidden_act], nn.Linear(hidden_size, hidden_size, bias=bias)]
        self.projector = nn.Sequential(*layers)

    def collect_hidden_states(
        self, vision_tower: nn.Module, pixel_values: torch.Tensor, **kwargs
    ) -> tuple[ModelOutput, torch.Tensor, list[torch.Tensor]]:
        """Run the tower once; return its outputs, `F` and the extra states (STI/SCI layers, or DCI group means).

        Hooks on the encoder layers keep only what the connector reads. A DCI group is summed in float32 as
        its states go by and becomes its mean, in the tower's dtype, as soon as its last state is added: no group
        ever holds its 12-13 states, and with contiguous groups only one float32 running sum exists at a time.
        """
        singles = {self.feature_layer, *self.layers}
        kept: dict[int, torch.Tensor] = {}
        sums: dict[int, torch.Tensor] = {}
        means: dict[int, torch.Tensor] = {}
        grad_enabled = torch.is_grad_enabled()  # the caller's, even where a checkpointed layer runs its hooks

        def keep(index: int, state: torch.Tensor) -> None:
            with torch.set_grad_enabled(grad_enabled):
                if index in singles:
                    kept[index] = state
                for g, group in enumerate(self.groups):
                    if index not in group:
                        continue
                    if g in sums:
                        sums[g].add_(state.to(sums[g].device))
                    else:  # a copy: the state itself is the next layer's input and must stay untouched
                        sums[g] = state.to(torch.float32, copy=True)
                    if index == max(group):
                        means[g] = sums.pop(g).div_(len(group)).to(state.dtype)

        def keep_input(layer_index: int):
            def hook(module, args, kwargs):
                keep(layer_index, args[0] if args else kwargs["hidden_states"])

            return hook

        def keep_output(module, args, kwargs, output):
            keep(len(layers), output if isinstance(output, torch.Tensor) else output[0])

        # Each state is read where the graph sees it, outside the layers' activation checkpointing (which wraps the
        # layer hooks too before transformers 5.23): `hs[i]` as layer i's input, the last one as the encoder's output.
        layers = encoder_layers(vision_tower)
        encoder = next(module for module in vision_tower.modules() if layers in module.children())
        handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
        handles.append(encoder.register_forward_hook(keep_output, with_kwargs=True))
        try:
            outputs = vision_tower(pixel_values, return_dict=True, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

        final = kept[self.feature_layer]
        extras = [means[g] for g in range(len(self.groups))] if self.groups else [kept[i] for i in self.layers]
        extras = [state.to(final.device, final.dtype) for state in extras]
        if self.prefix_tokens:
            start = self.prefix_tokens
            final, extras = final[:, start:], [state[:, start:] for state in extras]
        return outputs, final, extras

    def downsample(self, features: torch.Tensor) -> torch.Tensor:
        """Efficient Dense Connector: bilinear downsampling of the square patch grid, per side."""
        if self.downsample_factor == 1:
            return features
        batch, tokens, channels = features.shape
        side = int(tokens**0.5)
        grid = features.transpose(1, 2).reshape(batch, channels, side, side)
        size = side // self.downsample_factor
        grid = F.interpolate(grid.float(), size=(size, size), mode="bilinear", align_corners=False)
        return grid.to(features.dtype).flatten(2).transpose(1, 2)

    def pool(self, state: torch.Tensor) -> torch.Tensor:
        """STI's average pooling along the tokens (no pooled token from fewer tokens than the stride)."""
        if state.shape[1] < self.sti_pool_stride:
            return state[:, :0]
        return F.avg_pool1d(state.transpose(1, 2), self.sti_pool_stride, self.sti_pool_stride).transpose(1, 2)

    def fuse(self, final: torch.Tensor, extras: list[torch.Tensor]) -> torch.Tensor:
        """Combine `F` with the extra states: STI appends pooled tokens, SCI/DCI concatenate channels."""
        final, extras = self.downsample(final), [self.downsample(state) for state in extras]
        if self.connector_type == "sti":
            return torch.cat([final, *(self.pool(state) for state in extras)], dim=1)
        return torch.cat([final, *extras], dim=-1)

    def forward(
        self, vision_tower: nn.Module, pixel_values: torch.Tensor, valid_tokens: list[int] | None = None, **kwargs
    ) -> tuple[ModelOutput, torch.Tensor | list[torch.Tensor]]:
        """`(num_images, C, H, W)` pixels to the tower's outputs and `(num_images, tokens, text_hidden_size)` features.

        A tower that takes padded patch sequences (SigLIP 2 NaFlex) gets `valid_tokens`, each image's number of
        valid patches (they lead its row): every image's states are then fused over its own valid patches only (STI
        pools them alone) and the features come back as one `(tokens, text_hidden_size)` tensor per image. `kwargs`
        (`output_hidden_states`, `output_attentions`, and a NaFlex tower's `pixel_attention_mask` and
        `spatial_shapes`) go to the tower, whose outputs are returned as it gives them.
        """
        outputs, final, extras = self.collect_hidden_states(vision_tower, pixel_values, **kwargs)
        if valid_tokens is None:
            fused = self.fuse(final, extras)
            del final, extras  # the separate states are freed before the projector's wider activations
            return outputs, self.projector(fused)
        fused = [
            self.fuse(final[i : i + 1, :count], [state[i : i + 1, :count] for state in extras])[0]
            for i, count in enumerate(valid_tokens)
        ]
        del final, extras
        projected = self.projector(torch.cat(fused))
        return outputs, list(projected.split([len(features) for features in fused]))


__all__ = ["DenseConnector", "encoder_layers", "valid_patch_counts", "zero_image"]
