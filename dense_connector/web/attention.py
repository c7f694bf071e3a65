"""Layer attention maps: where each layer of a checkpoint's vision tower looks in one image (the paper's Figure 1).

`layer_attention` runs the model's own tower, with eager attention and `output_attentions`, on the image as the
model's own processor prepares it, and reduces each layer's attention to one weight per patch, averaged over heads.
A tower with a CLS token (CLIP, DINOv2, ...) gives the CLS token's attention to each patch (register tokens, which
follow the CLS token, left out); a tower without one (SigLIP, AIMv2) gives the mean attention each patch receives
from all patches, the nearest analogue of "what the layer gathers". Panel `k` is
encoder layer `k`, whose output is hidden state `k` (hidden state 0, the embeddings, has no attention).
`draw_attention_grid` overlays the maps on the image the tower saw (after resizing, padding or cropping) in a grid,
with PIL only, and marks the hidden states the connector reads: `F` (the final feature), the STI/SCI layers, and the
DCI groups `G1`, `G2`, ...
"""

import math
import textwrap
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from dense_connector.connector_dense_connector import encoder_layers


PANEL = 224  # pixels per panel side
HEADER = 22  # pixels above each panel for its label
LEGEND_LINES = 3  # lines of legend above the grid, wrapped to its width
LINE = 18
LEGEND = LEGEND_LINES * LINE + 8  # pixels above the grid
MAX_COLUMNS = 6
BACKGROUND = (255, 255, 255)
MARK_COLOR = (220, 30, 30)
TEXT_COLOR = (20, 20, 20)


@dataclass(frozen=True)
class LayerAttention:
    """One map per encoder layer (`maps[k - 1]` for layer `k`, a `(rows, cols)` tensor) and the image they cover."""

    maps: list[torch.Tensor]
    image: Image.Image
    reduction: str  # "CLS-to-patch" or "mean received"
    marks: dict[int, str]  # layer -> label of what the connector reads there ("F", "G1", "SCI", ...)
    connector: str  # a one-line summary of what the connector reads


def connector_marks(config) -> tuple[dict[int, str], str]:
    """Labels of the hidden states the connector reads, keyed by layer, and a legend line saying the same."""
    marks: dict[int, list[str]] = {}
    kind = config.dense_connector_type
    feature = config.feature_layer_index
    marks.setdefault(feature, []).append("F")
    if kind in ("sti", "sci"):
        for layer in config.dense_connector_layers or []:
            marks.setdefault(layer, []).append(kind.upper())
        read = f"{kind.upper()} layers {list(config.dense_connector_layers or [])}"
    elif kind == "dci":
        groups = [list(group) for group in config.dense_connector_groups or []]
        for number, group in enumerate(groups, start=1):
            for layer in group:
                marks.setdefault(layer, []).append(f"G{number}")
        read = "DCI groups " + ", ".join(f"G{n}={g}" for n, g in enumerate(groups, start=1))
        if any(0 in group for group in groups):
            read += " (0 = the embeddings)"
    else:
        read = "no extra layers"
    legend = f"{kind or 'none'}: F = hidden state {feature}; {read}"
    return {layer: "+".join(labels) for layer, labels in marks.items()}, legend


def tower_pixels(processor, image: Image.Image) -> torch.Tensor:
    """`(1, channels, height, width)` pixel values of `image` as the checkpoint's processor makes them.

    With AnyRes, the first tile is the whole image resized (the overview the tiles are appended to); that one is used.
    """
    pixels = processor.image_processor([image.convert("RGB")], return_tensors="pt")["pixel_values"]
    return pixels[:, 0] if pixels.ndim == 5 else pixels[:1]


def seen_image(processor, pixels: torch.Tensor) -> Image.Image:
    """The image the tower saw: `pixels` with the processor's normalisation undone."""
    settings = processor.image_processor
    mean = torch.tensor(settings.image_mean).view(-1, 1, 1)
    std = torch.tensor(settings.image_std).view(-1, 1, 1)
    values = (pixels[0].float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(values.permute(1, 2, 0).numpy())


@torch.inference_mode()
def layer_attention(model, processor, image: Image.Image) -> LayerAttention:
    """Per-layer attention of the vision tower of `model` (a `...ForConditionalGeneration`) on `image`, head mean."""
    side = model.config.patches_per_side  # a tower without a fixed patch grid (NaFlex) is refused before it runs
    tower = model.model.vision_tower
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")  # fused kernels do not return attention weights
    try:
        pixels = tower_pixels(processor, image)
        outputs = tower(pixels.to(tower.device, tower.dtype), output_attentions=True, return_dict=True)
    finally:
        tower.set_attn_implementation(previous)
    attentions = outputs.attentions
    if not attentions or len(attentions) != len(encoder_layers(tower)):
        raise ValueError(f"{type(tower).__name__} did not return the attention weights of each layer.")
    prefix = attentions[0].shape[-1] - side * side  # leading tokens that are not patches: CLS, then any registers
    if prefix == 0:
        reduction, maps = "mean received", [a[0].float().mean(0).mean(0) for a in attentions]
    elif prefix > 0:
        reduction, maps = "CLS-to-patch", [a[0].float().mean(0)[0, prefix:] for a in attentions]
    else:
        raise ValueError(f"Cannot lay {attentions[0].shape[-1]} tokens out as the tower's {side}x{side} patch grid.")
    marks, legend = connector_marks(model.config)
    return LayerAttention(
        maps=[m.reshape(side, side).cpu() for m in maps],
        image=seen_image(processor, pixels),
        reduction=reduction,
        marks=marks,
        connector=legend,
    )


def grid_shape(num_layers: int) -> tuple[int, int]:
    """(rows, columns) of the grid for `num_layers` panels."""
    columns = min(MAX_COLUMNS, num_layers)
    return math.ceil(num_layers / columns), columns


def heat(values: torch.Tensor) -> Image.Image:
    """An RGB heat map (dark blue, through red, to yellow) of a 2-D tensor, scaled to its own range."""
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    red = (scaled * 2).clamp(0, 1)
    green = (scaled * 2 - 1).clamp(0, 1)
    blue = (1 - scaled * 2).clamp(0, 1) * 0.6
    rgb = torch.stack([red, green, blue], dim=-1).mul(255).round().byte()
    return Image.fromarray(rgb.numpy())


def draw_attention_grid(result: LayerAttention) -> Image.Image:
    """The maps overlaid on the image, one panel per layer, read layers framed in red and labelled."""
    rows, columns = grid_shape(len(result.maps))
    canvas = Image.new("RGB", (columns * PANEL, LEGEND + rows * (HEADER + PANEL)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    text = f"{result.reduction} attention, mean over heads. {result.connector}"
    for line, words in enumerate(textwrap.wrap(text, width=canvas.width // 8)[:LEGEND_LINES]):
        draw.text((6, 4 + line * LINE), words, TEXT_COLOR, font=font)
    base = result.image.resize((PANEL, PANEL), Image.Resampling.BICUBIC)
    for index, values in enumerate(result.maps):
        layer = index + 1
        row, column = divmod(index, columns)
        left, top = column * PANEL, LEGEND + row * (HEADER + PANEL)
        overlay = heat(values).resize((PANEL, PANEL), Image.Resampling.BILINEAR)
        canvas.paste(Image.blend(base, overlay, 0.55), (left, top + HEADER))
        mark = result.marks.get(layer)
        label = f"layer {layer}" + (f"  [{mark}]" if mark else "")
        draw.text((left + 6, top + 3), label, MARK_COLOR if mark else TEXT_COLOR, font=font)
        if mark:
            frame = (left, top + HEADER, left + PANEL - 1, top + HEADER + PANEL - 1)
            draw.rectangle(frame, outline=MARK_COLOR, width=4)
    return canvas
