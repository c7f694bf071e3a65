"""Translation of an original (LLaVA-layout) config into a `DenseConnectorConfig`.

This module owns the knowledge of the original code's configuration: the fields it reads and those it ignores, the
layers and groups it hard-codes per tower family, the SigLIP defaults and cut it applies, how `mm_projector_type`,
`mm_vision_select_*`, `image_aspect_ratio` and `mm_patch_merge_type` map onto our config, and the refusal of any
multimodal field or value it does not know. `translate_config` returns the config with what the processor needs
(tower family, preprocessing) and notes for the log and the model card.
"""

import ast
import re

from ..configuration_dense_connector import DenseConnectorConfig
from ..modeling_dense_connector import DenseConnectorForConditionalGeneration
from ..writing.sources import CheckpointError
from ..writing.towers import BOOKKEEPING_FIELDS, Translation, tower_vision_config


# Hidden states the original code hard-codes per tower family (`dense_connector.py` of the authors' repository).
ORIGINAL_CONNECTOR_LAYERS = {"clip": [7, 15], "siglip": [7, 15]}
ORIGINAL_DCI_GROUPS = {
    "clip": [list(range(0, 12)), list(range(12, 24))],
    "siglip": [list(range(0, 13)), list(range(13, 26))],
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
# A field with one of these prefixes belongs to the multimodal wrapper: if it is not known above, it may change what
# the model computes, so the conversion stops rather than guessing.
MULTIMODAL_PREFIXES = ("mm_", "image_", "vision_", "video_", "s2", "tokenizer_", "tune_", "freeze_", "unfreeze_")


def _connector_type(original: dict) -> str:
    connector = original.get("mm_dense_connector_type")
    if connector is None:
        return "none"  # a plain LLaVA-1.5 checkpoint
    if connector not in ("sti", "sci", "dci"):
        raise CheckpointError(
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
    raise CheckpointError(
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
        raise CheckpointError("The config has no mm_vision_select_layer, which the original CLIP tower requires.")
    layer = original["mm_vision_select_layer"]
    feature = original.get("mm_vision_select_feature", "patch")
    if feature == "patch":
        return layer, "default"
    if feature == "cls_patch" and connector == "none":
        return layer, "full"
    if feature == "cls_patch":
        raise CheckpointError(
            f"mm_vision_select_feature='cls_patch' with the {connector!r} connector is not supported: the original "
            "keeps the CLS token in the final feature but drops it from the added layers, so it cannot fuse them."
        )
    raise CheckpointError(f"mm_vision_select_feature={feature!r} is not supported; use 'patch' or 'cls_patch'.")


def _preprocessing(original: dict) -> tuple[str, list[list[int]] | None]:
    """The image preprocessing ("pad", "anyres", "square") and AnyRes pinpoints as `[height, width]` pairs."""
    aspect = original.get("image_aspect_ratio")
    merge = original.get("mm_patch_merge_type", "flat")
    if aspect in (None, "square"):
        preprocessing = "square"
    elif aspect in ("pad", "anyres"):
        preprocessing = aspect
    else:
        raise CheckpointError(f"image_aspect_ratio={aspect!r} is not supported; use 'pad', 'anyres' or 'square'.")
    if preprocessing != "anyres":
        if merge not in ("flat", "spatial", "spatial_unpad"):
            raise CheckpointError(f"mm_patch_merge_type={merge!r} is not supported; use 'flat' or 'spatial_unpad'.")
        return preprocessing, None
    if merge != "spatial_unpad":
        raise CheckpointError(
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
        raise CheckpointError(
            f"image_grid_pinpoints={original.get('image_grid_pinpoints')!r} must be a list of [width, height] pairs "
            "for image_aspect_ratio='anyres'."
        )
    return preprocessing, [[int(height), int(width)] for width, height in pinpoints]


def _check_fields(original: dict) -> None:
    """Stop on multimodal fields or values this converter does not know, listing them all."""
    known = HANDLED_FIELDS | IGNORED_FIELDS | BOOKKEEPING_FIELDS
    unknown = sorted(key for key in original if key.startswith(MULTIMODAL_PREFIXES) and key not in known)
    if unknown:
        raise CheckpointError(
            f"The original config has fields this converter does not know: {unknown}. They may change what the model "
            "computes; convert only checkpoints made with the original Dense Connector / LLaVA-1.5 code."
        )
    architectures = original.get("architectures") or ["LlavaLlamaForCausalLM"]
    if "text_config" in original or original.get("model_type") not in ("llava", "llava_llama"):
        raise CheckpointError(
            f"The config has model_type={original.get('model_type')!r} and architectures={architectures}; expected "
            "the original LLaVA layout (model_type 'llava_llama' or 'llava', LlavaLlamaForCausalLM)."
        )
    if architectures != ["LlavaLlamaForCausalLM"]:
        raise CheckpointError(f"architectures={architectures} is not supported; expected ['LlavaLlamaForCausalLM'].")
    for name, value in (("mm_use_im_start_end", False), ("mm_use_im_patch_token", False), ("use_mm_proj", True)):
        if original.get(name, value) != value:
            raise CheckpointError(
                f"{name}={original[name]!r} is not supported (the Dense Connector and LLaVA-1.5 releases use {value})."
            )
    padding_side = original.get("tokenizer_padding_side", "right")
    if padding_side not in ("left", "right"):
        raise CheckpointError(f"tokenizer_padding_side={padding_side!r} must be 'left' or 'right'.")


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
        raise CheckpointError(
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
        raise CheckpointError(f"The translated config is not valid: {error}") from None
    config.architectures = [DenseConnectorForConditionalGeneration.__name__]
    return Translation(config=config, tower=family, preprocessing=preprocessing, notes=notes)
