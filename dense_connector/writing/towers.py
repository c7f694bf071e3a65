"""What a written folder needs to know of its vision tower: the transformers vision config and the tower family.

`tower_vision_config` turns an original tower repository's config (CLIP or SigLIP, a full model or a vision-only
one) into the vision config the Dense Connector model embeds, as the original runs it; `describe_tower` does the same
for any patch-token vision encoder transformers has (`dense-connector build`), reading off the tower itself which
leading tokens are not patches and where a full repository keeps the vision model's tensors. `Translation` carries a
model config with the tower family and the preprocessing the processor is built for.
"""

from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..configuration_dense_connector import DenseConnectorConfig, side
from ..connector_dense_connector import encoder_layers
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
    preprocessing: str  # "pad", "anyres", "square" or "naflex" (patch sequences at each image's aspect ratio)
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


# Vision configs whose model transformers builds only inside its full model, with the architecture (and tensor names)
# of another one that `AutoModel` builds alone: MetaCLIP 2's vision tower is CLIP's.
SAME_ARCHITECTURE = {"metaclip_2_vision_model": "clip_vision_model"}
SUPPORTED_TOWERS = (
    "patch-token ViT encoders: CLIP, MetaCLIP 2, SigLIP, SigLIP 2 (fixed resolution and NaFlex), DINOv2 (with or "
    "without registers), DINOv3 ViT, AIMv2, MLCD, InternViT (internvl_vision), as full repositories or vision-only "
    "ones"
)
# Towers that take patch sequences at each image's aspect ratio (`pixel_attention_mask`, `spatial_shapes`) rather than
# square images: every token is a patch, padding trails each row.
PATCH_SEQUENCE_TOWERS = ("siglip2_vision_model",)


@dataclass
class Tower:
    """A vision tower as a Dense Connector runs it."""

    vision: dict  # the vision config the model embeds
    family: str  # "clip" / "siglip" (run and preprocessed as the original does), else the vision model_type
    prefix_tokens: int  # leading tokens of its sequence that are not patches (CLS, registers)
    weights_prefix: str  # where a full repository keeps the vision model's tensors ("vision_model."), or ""


def config_from(settings: dict):
    """The transformers config of a saved config dict."""
    return AutoConfig.for_model(settings["model_type"], **{k: v for k, v in settings.items() if k != "model_type"})


def refuse(model_type, why: str) -> CheckpointError:
    return CheckpointError(
        f"The vision tower (model_type={model_type!r}) {why}; dense-connector build supports {SUPPORTED_TOWERS}."
    )


def non_patch_tokens(vision: dict, model_type) -> int:
    """How many leading tokens of the tower's sequence are not patches, read off the tower run on the meta device.

    Every encoder layer must see `(batch, prefix + patches, hidden_size)` with `patches` the square patch grid;
    a tower whose stages downsample (Swin, ConvNeXt) is refused. A tower that takes patch sequences (SigLIP 2
    NaFlex) has none: it is built (on the meta device) only to check that it keeps its layers in one list.
    """
    try:
        config = config_from(vision)
    except (KeyError, ValueError, TypeError):
        raise refuse(model_type, "is not a vision encoder transformers knows") from None
    if vision["model_type"] in PATCH_SEQUENCE_TOWERS:
        with torch.device("meta"):
            encoder_layers(AutoModel.from_config(config))
        return 0
    if not (hasattr(config, "image_size") and hasattr(config, "patch_size")):
        raise refuse(model_type, "is not a vision encoder of square patches (no image_size and patch_size)")
    try:
        size, patch = side(config.image_size), side(config.patch_size)
        with torch.device("meta"):
            tower = AutoModel.from_config(config)
            layers = encoder_layers(tower)
            lengths = []

            def record(module, args, kwargs):
                lengths.append(tuple((args[0] if args else kwargs["hidden_states"]).shape))

            hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
            tower(torch.empty(1, config.num_channels, size, size))
            for hook in hooks:
                hook.remove()
    except Exception as error:  # noqa: BLE001 - any tower that cannot run this way is refused in one line
        raise refuse(model_type, f"cannot be run as a patch-token encoder ({type(error).__name__})") from None
    patches = (size // patch) ** 2
    shapes = set(lengths)
    if len(shapes) != 1 or len(lengths) != len(layers):
        raise refuse(model_type, "changes its token grid between layers")
    [(_, tokens, width)] = shapes
    if width != config.hidden_size or tokens < patches:
        raise refuse(model_type, f"gives {tokens} tokens of width {width} for {patches} patches")
    return tokens - patches


def full_model_vision_prefix(tower_config: dict, vision: dict) -> str:
    """Where a full repository (`CLIPModel`, `SiglipModel`, ...) keeps the vision model's tensors: the prefix most of
    the vision model's own tensor names take in the full model's state dict."""
    with torch.device("meta"):
        full_names = list(AutoModel.from_config(config_from(tower_config)).state_dict())
        vision_names = set(AutoModel.from_config(config_from(vision)).state_dict())
    prefixes = Counter(
        name[: len(name) - len(own)] for name in full_names for own in vision_names if name.endswith("." + own)
    )
    return prefixes.most_common(1)[0][0] if prefixes else ""


def any_vision_config(tower_config: dict) -> dict:
    """The vision config of any other tower: a full repository's `vision_config`, or a vision-only config, without
    bookkeeping fields and with any pooling head off (it reads the last layer, never what the connector reads)."""
    model_type = tower_config.get("model_type")
    if "vision_config" in tower_config:
        try:
            vision = config_from(tower_config).vision_config.to_dict()
        except (KeyError, ValueError, TypeError, AttributeError):
            raise refuse(model_type, "is not a model transformers knows") from None
    elif "text_config" in tower_config or model_type not in CONFIG_MAPPING:
        raise refuse(model_type, "is not a vision encoder transformers knows")
    else:
        vision = dict(tower_config)
    vision = {key: value for key, value in vision.items() if key not in BOOKKEEPING_FIELDS or key == "model_type"}
    vision.pop("image_mean", None)
    vision["model_type"] = SAME_ARCHITECTURE.get(vision["model_type"], vision["model_type"])
    for key in ("use_head", "vision_use_head"):
        if key in AutoConfig.for_model(vision["model_type"]).to_dict():
            vision[key] = False
    return vision


def describe_tower(tower_config: dict) -> Tower:
    """The tower of a repository's config as `dense-connector build` runs it: CLIP and SigLIP as the original does
    (SigLIP without its last layer and head), any other patch-token encoder whole up to the deepest layer read."""
    model_type = tower_config.get("model_type")
    if model_type in ("clip", "siglip", "clip_vision_model", "siglip_vision_model"):
        vision, family = tower_vision_config(tower_config)
    else:
        vision = any_vision_config(tower_config)
        family = "clip" if vision["model_type"] == "clip_vision_model" else vision["model_type"]
    prefix_tokens = non_patch_tokens(vision, model_type)
    full = "vision_config" in tower_config
    return Tower(vision, family, prefix_tokens, full_model_vision_prefix(tower_config, vision) if full else "")
