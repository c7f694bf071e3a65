"""What a converted folder holds besides weights and config: processor, generation config and model card.

This module owns the image processor settings taken from the original tower (CLIP's saved preprocessor config, or
the fixed settings of the original SigLIP processor), the processor with the chat template of the conversation
format, the generation config that stops where the original conversation stops, and the model card's conversion
section.
"""

from collections import Counter
from pathlib import Path

from transformers import GenerationConfig, LlavaImageProcessorPil, LlavaNextImageProcessorPil, Siglip2ImageProcessorPil
from transformers.dynamic_module_utils import custom_object_save

from ..chat_templates import stop_token_ids
from ..configuration_dense_connector import side
from ..modeling_dense_connector import DenseConnectorForConditionalGeneration
from ..processing_dense_connector import DenseConnectorProcessor
from .sources import CheckpointError, read_json
from .tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from .towers import Translation


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


def write_code(model: DenseConnectorForConditionalGeneration, folder: Path, config) -> None:
    """Copy the remote-code files into `folder` and map the Auto classes to them in `config.auto_map`:
    `AutoModelForImageTextToText` to the model, and `AutoModel` to its base model, which vLLM's Transformers backend
    builds from the same folder (it refuses a config without that entry)."""
    custom_object_save(model, folder, config=config)
    custom_object_save(model.model, folder, config=config)


NAFLEX_PROCESSOR_FIELDS = ("resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


def naflex_settings(tower_folder: Path, vision_config) -> dict:
    """A NaFlex tower's preprocessing (SigLIP 2): its saved normalisation and patch budget (`max_num_patches`, else
    the tower's `num_patches`), patches of the tower's size; each image is resized to its own grid within the
    budget."""
    path = tower_folder / "preprocessor_config.json"
    saved = read_json(path) if path.is_file() else {}
    settings = {key: saved[key] for key in NAFLEX_PROCESSOR_FIELDS if key in saved}
    patch_size = side(vision_config.patch_size)
    if saved.get("patch_size", patch_size) != patch_size:
        raise CheckpointError(
            f"The preprocessor config in {tower_folder} cuts {saved['patch_size']}-pixel patches but the tower's "
            f"patch_size is {patch_size}; give the tower's own repository."
        )
    budget = saved.get("max_num_patches", vision_config.num_patches)
    return {**settings, "patch_size": patch_size, "max_num_patches": budget}


def image_processor_settings(tower: str, tower_folder: Path, image_size: int) -> dict:
    """Resize / crop / normalise settings of the tower's image processor.

    CLIP: its saved settings (a shortest-edge resize and a crop of the tower's size). SigLIP: the original's fixed
    settings. Any other tower: its saved rescaling, normalisation and resampling, with a square resize to the size the
    tower's config is built for (images are padded to a square first, so nothing is cropped away).
    """
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
    if not (tower_folder / "preprocessor_config.json").is_file():
        raise CheckpointError(
            f"The vision tower in {tower_folder} has no preprocessor_config.json; give the tower's own repository, "
            "whose image processor says how images are normalised."
        )
    settings = read_json(tower_folder / "preprocessor_config.json")
    settings = {key: settings[key] for key in CLIP_PROCESSOR_FIELDS if key in settings}
    if tower != "clip":
        square = {"height": image_size, "width": image_size}
        return {**settings, "size": square, "crop_size": square, "do_resize": True, "do_center_crop": False}
    size, crop = settings.get("size"), settings.get("crop_size")
    if isinstance(size, int):
        settings["size"] = size = {"shortest_edge": size}
    if isinstance(crop, int):
        settings["crop_size"] = crop = {"height": crop, "width": crop}
    if not size or "shortest_edge" not in size or crop != {"height": image_size, "width": image_size}:
        raise CheckpointError(
            f"The CLIP preprocessor config in {tower_folder} has size={size}, crop_size={crop}; expected a "
            f"shortest-edge resize and a {image_size}x{image_size} crop matching the tower's image_size."
        )
    return settings


def build_processor(
    translation: Translation, tokenizer, tower_folder: Path, chat_template: str
) -> DenseConnectorProcessor:
    """The processor: the tower's image preprocessing (`translation.preprocessing`), `tokenizer`, `chat_template`."""
    config = translation.config
    if translation.preprocessing == "naflex":
        image_processor = Siglip2ImageProcessorPil(**naflex_settings(tower_folder, config.vision_config))
    elif translation.preprocessing == "anyres":
        settings = image_processor_settings(translation.tower, tower_folder, config.tower_image_size)
        image_processor = LlavaNextImageProcessorPil(
            image_grid_pinpoints=config.image_grid_pinpoints, do_pad=True, **settings
        )
    else:
        settings = image_processor_settings(translation.tower, tower_folder, config.tower_image_size)
        image_processor = LlavaImageProcessorPil(do_pad=translation.preprocessing == "pad", **settings)
    return DenseConnectorProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        patch_size=side(config.vision_config.patch_size),
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
