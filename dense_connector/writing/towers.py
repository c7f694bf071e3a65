"""What a written folder needs to know of its vision tower: the transformers vision config and the tower family.

`tower_vision_config` turns a tower repository's config (a full model or a vision-only one) into the vision config
the Dense Connector model embeds; `Translation` carries a model config with the tower family and the preprocessing
the processor is built for.
"""

from dataclasses import dataclass, field

from ..configuration_dense_connector import DenseConnectorConfig
from .sources import CheckpointError


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

BOOKKEEPING_FIELDS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path"}

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
        raise CheckpointError(
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
