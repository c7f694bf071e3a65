"""Dense Connector model configuration."""

import copy
import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import strict


CONNECTOR_TYPES = ("sti", "sci", "dci", "none")
FEATURE_SELECT_STRATEGIES = ("default", "full")
NO_NAFLEX_VIDEO = (
    "Video is not supported with a tower that takes patch sequences (SigLIP 2 NaFlex); pass the frames as images, "
    "or build the model on a fixed-resolution tower."
)


# The vision tower when a config names none: CLIP ViT-L/14 at 336 px, as the released checkpoints use.
DEFAULT_VISION_CONFIG = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
}


def build_sub_config(sub_config: dict | PreTrainedConfig | None, default: dict) -> PreTrainedConfig:
    """A sub-config from a config, a dict (its `model_type` defaulting to `default`'s) or `None` (`default`)."""
    if isinstance(sub_config, PreTrainedConfig):
        return sub_config
    settings = dict(default if sub_config is None else sub_config)
    model_type = settings.pop("model_type", default["model_type"])
    return AutoConfig.for_model(model_type, **settings)


def default_connector_layers(num_layers: int) -> list[int]:
    """STI/SCI layers: the outputs of layers `L // 3` and `2 * (L // 3)` (`hs[L//3 - 1]`, `hs[2*(L//3) - 1]`).

    The paper's 8th and 16th of CLIP-L's 24 layers (`hs[7]`, `hs[15]`), the same for the original's 26-layer
    SigLIP.
    """
    step = max(num_layers // 3, 1)
    return [step - 1, 2 * step - 1]


def default_connector_groups(num_layers: int) -> list[list[int]]:
    """DCI groups: the states `hs[0..L-1]` split into two halves, the first getting the extra one when L is odd.

    The paper's `hs[0..11]`, `hs[12..23]` for CLIP-L's 24 layers and `hs[0..12]`, `hs[13..25]` for the original's
    26-layer SigLIP.
    """
    half = (num_layers + 1) // 2
    return [list(range(0, half)), list(range(half, num_layers))]


def side(value: int | list[int] | tuple[int, ...]) -> int:
    """A square tower's image or patch size, given as an int or as `[height, width]` (InternViT)."""
    return value if isinstance(value, int) else value[0]


def select_best_resolution(image_size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """The `(height, width)` in `pinpoints` that keeps most of the image's resolution and wastes least area.

    `image_size` is `(height, width)`; `pinpoints` holds `[height, width]` pairs.
    """
    height, width = image_size
    best, best_effective, best_wasted = None, -1, math.inf
    for cand_height, cand_width in pinpoints:
        scale = min(cand_width / width, cand_height / height)
        down_width, down_height = int(width * scale), int(height * scale)
        effective = min(down_width * down_height, width * height)
        wasted = cand_width * cand_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_height, cand_width), effective, wasted
    return best


def unpadded_grid_size(grid_height: int, grid_width: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of a `grid_height x grid_width` feature grid left after removing the resize-and-pad padding.

    Follows the original `unpad_image`: the padding removed on each side is `(current - scaled) // 2`.
    """
    height, width = image_size
    if width / height > grid_width / grid_height:
        scaled_height = int(height * (grid_width / width))
        return grid_height - 2 * ((grid_height - scaled_height) // 2), grid_width
    scaled_width = int(width * (grid_height / height))
    return grid_height, grid_width - 2 * ((grid_width - scaled_width) // 2)


def num_connector_tokens(num_patches: int, connector_type: str, sti_pool_stride: int) -> int:
    """Number of features the connector makes from `num_patches` patch tokens (STI appends two pooled runs)."""
    if connector_type == "sti":
        return num_patches + 2 * (num_patches // sti_pool_stride)
    return num_patches


def num_tile_tokens(
    patches_per_side: int, connector_type: str, sti_pool_stride: int, image_downsample_factor: int
) -> int:
    """Number of features the connector makes from one tower-sized image (one AnyRes tile)."""
    side = patches_per_side // image_downsample_factor
    return num_connector_tokens(side * side, connector_type, sti_pool_stride)


@strict
class DenseConnectorConfig(PreTrainedConfig):
    r"""
    Configuration of a Dense Connector vision-language model (Yao et al., NeurIPS 2024): a vision tower, a connector
    that fuses several of the tower's hidden states, a projector, and a causal language model.

    Hidden-state indices follow transformers' `output_hidden_states`: `0` is the embedding output, `i` the output of
    encoder layer `i`, negative values count from the end of the full tower. The config then describes the tower that
    is built: `vision_config.num_hidden_layers` becomes the number of layers up to the deepest state the connector
    reads (the rest are never built nor run) and `vision_feature_layer` its non-negative index.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*): the vision tower (CLIP, SigLIP, ...). A tower whose
            config has `num_patches` but no `image_size` (SigLIP 2 NaFlex) takes patch sequences: each image keeps its
            aspect ratio and gives as many features as it has valid patches (see `takes_patch_sequences`).
        text_config (`dict` or `PreTrainedConfig`, *optional*): the language model (Llama, ...).
        image_token_id (`int`): id of the image placeholder token.
        video_token_id (`int`, *optional*): id of the video placeholder token.
        dense_connector_type (`str`): `"sti"`, `"sci"`, `"dci"`, or `"none"` (final layer only, as LLaVA-1.5).
        vision_feature_layer (`int`): hidden state used as the final feature `F`.
        vision_feature_select_strategy (`str`): `"default"` drops the `vision_prefix_tokens` leading tokens that are
            not patches (CLIP's CLS; DINOv2's CLS and registers), `"full"` keeps all (towers without any, as SigLIP).
        vision_prefix_tokens (`int`): how many leading tokens of the tower's sequence are not patches (CLS and
            register tokens); `1` for CLIP. `dense-connector build` reads it off the tower.
        dense_connector_layers (`list[int]`, *optional*): hidden states added by STI/SCI; default `[7, 15]` for 24 or
            26 layers.
        dense_connector_groups (`list[list[int]]`, *optional*): hidden-state groups averaged by DCI; default the two
            halves of `hs[0..L-1]`.
        sti_pool_stride (`int`): kernel and stride of STI's average pooling along the tokens.
        projector_hidden_act (`str`): activation between projector layers.
        projector_depth (`int`): number of linear layers of the projector (`2` is `mlp2x_gelu`, `1` is `linear`).
        multimodal_projector_bias (`bool`): whether the projector's linear layers have a bias.
        image_grid_pinpoints (`list[list[int]]`, *optional*): AnyRes resolutions `[height, width]`; `None` turns AnyRes
            off. With AnyRes the tiles are re-assembled, unpadded, and closed by a learned `image_newline` per row.
        image_downsample_factor (`int`): Efficient Dense Connector: bilinear downsampling of the patch grid per side
            before the projector (`2` turns 576 tokens into 144); `1` is off.
        video_pool_stride (`int`): max-pooling stride along the tokens of each video frame's projected features; `1`
            is off.
    """

    model_type = "dense_connector"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    video_token_id: int | None = None
    dense_connector_type: str = "dci"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    vision_prefix_tokens: int = 1
    dense_connector_layers: list[int] | None = None
    dense_connector_groups: list[list[int]] | None = None
    sti_pool_stride: int = 8
    projector_hidden_act: str = "gelu"
    projector_depth: int = 2
    multimodal_projector_bias: bool = True
    image_grid_pinpoints: list[list[int]] | None = None
    image_downsample_factor: int = 1
    video_pool_stride: int = 2
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Built here rather than through `SubConfigSpec`, which transformers before 5.20 lack.
        self.vision_config = build_sub_config(self.vision_config, DEFAULT_VISION_CONFIG)
        self.text_config = build_sub_config(self.text_config, {"model_type": "llama"})
        super().__post_init__(**kwargs)
        num_layers = self.vision_config.num_hidden_layers
        if self.dense_connector_layers is None and self.dense_connector_type in ("sti", "sci"):
            self.dense_connector_layers = default_connector_layers(num_layers)
        if self.dense_connector_groups is None and self.dense_connector_type == "dci":
            self.dense_connector_groups = default_connector_groups(num_layers)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.validate_dense_connector()
        self._describe_built_tower()

    def _describe_built_tower(self):
        """Make `vision_config` describe the tower that is built: layers after the deepest state read are dropped.

        `vision_feature_layer` is first resolved to a non-negative index of the full tower, so that it keeps naming the
        same hidden state; SigLIP's pooling head, never read, is turned off; a backbone config's stages are cut too. A
        saved config reloads unchanged. A vision config object passed in is copied before it is changed, never
        modified in place.
        """
        self.vision_feature_layer = self.feature_layer_index
        built = {"num_hidden_layers": self.num_vision_layers_used}
        if getattr(self.vision_config, "vision_use_head", False):
            built["vision_use_head"] = False
        if any(getattr(self.vision_config, key) != value for key, value in built.items()):
            self.vision_config = copy.deepcopy(self.vision_config)
            for key, value in built.items():
                setattr(self.vision_config, key, value)
            if getattr(self.vision_config, "stage_names", None) is not None:  # a backbone config (DINOv2): its
                # stages follow the layers built, and its output is the last of them
                self.vision_config.stage_names = self.vision_config.stage_names[: built["num_hidden_layers"] + 1]
                self.vision_config.out_features = None

    def validate_dense_connector(self):
        """Reject settings the connector cannot run, naming the field and what is allowed."""
        if self.dense_connector_type not in CONNECTOR_TYPES:
            raise ValueError(
                f"dense_connector_type={self.dense_connector_type!r} is not supported; use one of {CONNECTOR_TYPES}."
            )
        if self.vision_feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} is not supported; use one of "
                f"{FEATURE_SELECT_STRATEGIES}."
            )
        num_states = self.vision_config.num_hidden_layers + 1
        if not -num_states <= self.vision_feature_layer < num_states:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is outside the tower's hidden states "
                f"(allowed: {-num_states}..{num_states - 1} for {num_states - 1} layers)."
            )
        for name, layers in (
            ("dense_connector_layers", self.dense_connector_layers or []),
            ("dense_connector_groups", [i for group in self.dense_connector_groups or [] for i in group]),
        ):
            outside = [i for i in layers if not 0 <= i < num_states]
            if outside:
                raise ValueError(
                    f"{name} has hidden-state indices {outside} outside the tower (allowed: 0..{num_states - 1})."
                )
        if self.dense_connector_type in ("sti", "sci") and not self.dense_connector_layers:
            raise ValueError(f"dense_connector_layers must name at least one layer for {self.dense_connector_type!r}.")
        if self.dense_connector_type == "dci":
            if not self.dense_connector_groups or any(len(group) == 0 for group in self.dense_connector_groups):
                raise ValueError(
                    f"dense_connector_groups={self.dense_connector_groups} must be a non-empty list of non-empty "
                    "lists of hidden-state indices for 'dci'."
                )
        if self.vision_prefix_tokens < 0:
            raise ValueError(f"vision_prefix_tokens={self.vision_prefix_tokens} must not be negative.")
        for name in ("sti_pool_stride", "projector_depth", "image_downsample_factor", "video_pool_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.takes_patch_sequences:
            unsupported = {
                "image_downsample_factor": self.image_downsample_factor != 1,
                "image_grid_pinpoints": self.image_grid_pinpoints is not None,
            }
            for name in (name for name, used in unsupported.items() if used):
                raise ValueError(
                    f"{name} is not supported with a tower that takes patch sequences (SigLIP 2 NaFlex): its images "
                    "already keep their aspect ratio and size; leave it at its default."
                )
            return
        patches = self.patches_per_side
        if patches % self.image_downsample_factor:
            raise ValueError(
                f"image_downsample_factor={self.image_downsample_factor} must divide the "
                f"{patches}x{patches} patch grid."
            )
        if self.image_grid_pinpoints is not None:
            size = self.tower_image_size
            bad = [p for p in self.image_grid_pinpoints if len(p) != 2 or p[0] % size or p[1] % size]
            if bad or not self.image_grid_pinpoints:
                raise ValueError(
                    f"image_grid_pinpoints must be [height, width] pairs that are multiples of the tower's image size "
                    f"{size}; got {self.image_grid_pinpoints}."
                )

    @property
    def takes_patch_sequences(self) -> bool:
        """Whether the tower takes `(num_images, max_num_patches, C*P*P)` patch sequences with `pixel_attention_mask`
        and `spatial_shapes` (SigLIP 2 NaFlex: a `num_patches` budget, no fixed `image_size`) instead of square
        images."""
        vision = self.vision_config
        return getattr(vision, "image_size", None) is None and getattr(vision, "num_patches", None) is not None

    @property
    def tower_image_size(self) -> int:
        """Side in pixels of the square images the tower takes."""
        if self.takes_patch_sequences:
            raise ValueError(
                "This model's tower takes patch sequences (SigLIP 2 NaFlex) at each image's own size; it has no fixed "
                "image size or patch grid, which this feature needs."
            )
        return side(self.vision_config.image_size)

    @property
    def patches_per_side(self) -> int:
        return self.tower_image_size // side(self.vision_config.patch_size)

    @property
    def num_connector_states(self) -> int:
        """How many hidden states (including `F`) the connector concatenates along channels (1 for STI and none)."""
        if self.dense_connector_type == "sci":
            return 1 + len(self.dense_connector_layers)
        if self.dense_connector_type == "dci":
            return 1 + len(self.dense_connector_groups)
        return 1

    @property
    def feature_layer_index(self) -> int:
        """`vision_feature_layer` as a non-negative hidden-state index."""
        return self.vision_feature_layer % (self.vision_config.num_hidden_layers + 1)

    @property
    def num_vision_layers_used(self) -> int:
        """Encoder layers that must run: those up to the deepest hidden state the connector reads."""
        used = [self.feature_layer_index, *(self.dense_connector_layers or [])]
        used += [i for group in self.dense_connector_groups or [] for i in group]
        return max(used)

    def num_image_tokens(self, image_size: tuple[int, int] | None = None, num_patches: int | None = None) -> int:
        """Placeholders one image of `(height, width)` takes (the size matters only with AnyRes); with a tower that
        takes patch sequences, one image of `num_patches` valid patches (its `spatial_shapes` product)."""
        if self.takes_patch_sequences:
            if num_patches is None:
                raise ValueError("A tower that takes patch sequences (NaFlex) needs the image's num_patches.")
            return num_connector_tokens(num_patches, self.dense_connector_type, self.sti_pool_stride)
        tile = num_tile_tokens(
            self.patches_per_side, self.dense_connector_type, self.sti_pool_stride, self.image_downsample_factor
        )
        if self.image_grid_pinpoints is None:
            return tile
        return num_anyres_tokens(image_size, self.image_grid_pinpoints, self.tower_image_size, tile)

    def num_video_tokens(self, num_frames: int) -> int:
        """Placeholders one video of `num_frames` frames takes; every frame is encoded as one tower-sized image."""
        if self.takes_patch_sequences:
            raise ValueError(NO_NAFLEX_VIDEO)
        tile = num_tile_tokens(
            self.patches_per_side, self.dense_connector_type, self.sti_pool_stride, self.image_downsample_factor
        )
        return num_video_tokens(num_frames, tile, self.video_pool_stride)


def num_video_tokens(num_frames: int, frame_tokens: int, video_pool_stride: int) -> int:
    """Placeholders of a video: each frame's `frame_tokens` features max-pooled by `video_pool_stride`, all frames."""
    return num_frames * (frame_tokens // video_pool_stride)


def num_anyres_tokens(
    image_size: tuple[int, int], pinpoints: list[list[int]], tile_size: int, tile_tokens: int
) -> int:
    """Placeholders of an AnyRes image: the base image, then the unpadded tile grid with one newline per row."""
    height, width = select_best_resolution(image_size, pinpoints)
    grid_rows, grid_cols = height // tile_size, width // tile_size
    if grid_rows * grid_cols == 1:
        return tile_tokens + 1
    side = math.isqrt(tile_tokens)
    if side * side != tile_tokens:
        raise ValueError("AnyRes needs a square per-tile feature grid; it does not combine with the 'sti' connector.")
    rows, cols = unpadded_grid_size(grid_rows * side, grid_cols * side, image_size)
    return tile_tokens + rows * (cols + 1)


__all__ = ["DenseConnectorConfig"]
