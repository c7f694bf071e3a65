"""`dense-connector attention-maps`: the per-layer attention grid, made by the command as a user runs it.

The test run writes docs/images/attention-maps.png (shown by docs/web.md). The maps themselves are checked in
process on tiny CLIP and SigLIP towers: one per layer, the CLS row for CLIP, the mean received for SigLIP.
"""

import subprocess

import pytest
import torch
from conftest import CLI, IMAGES, REPO, SAMPLE
from PIL import Image, ImageChops, ImageStat
from tiny import tiny_config, tiny_model, tiny_processor
from transformers import AutoConfig

from dense_connector.web.attention import HEADER, LEGEND, PANEL, connector_marks, grid_shape, layer_attention


DEMO = REPO / "dense_connector" / "demo" / "checkpoint"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "attention-maps", *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def panels(picture: Image.Image, count: int) -> list[Image.Image]:
    rows, columns = grid_shape(count)
    boxes = []
    for index in range(count):
        row, column = divmod(index, columns)
        top = LEGEND + row * (HEADER + PANEL) + HEADER
        boxes.append(picture.crop((column * PANEL, top, (column + 1) * PANEL, top + PANEL)))
    return boxes


def test_command_draws_one_panel_per_tower_layer():
    output = IMAGES / "attention-maps.png"
    result = run("--model", str(DEMO), "--image", str(SAMPLE), "--output", str(output))
    assert result.returncode == 0, result.stderr
    layers = AutoConfig.from_pretrained(DEMO).vision_config.num_hidden_layers  # the layers the tower keeps
    assert f"{layers} layers (CLS-to-patch)" in result.stderr
    with Image.open(output) as picture:
        picture = picture.convert("RGB")
    rows, columns = grid_shape(layers)
    assert picture.size == (columns * PANEL, LEGEND + rows * (HEADER + PANEL))
    boxes = panels(picture, layers)
    for box in boxes:
        assert max(ImageStat.Stat(box).stddev) > 20  # an image with a map on it, not an empty cell
    for first, second in zip(boxes, boxes[1:]):  # each layer looks somewhere else
        assert ImageChops.difference(first, second).getbbox() is not None


def test_command_reports_bad_input(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    cases = {
        ("--image", str(text), "--output", str(tmp_path / "a.png")): "is not an image that Pillow can read",
        ("--image", str(tmp_path / "missing.png"), "--output", str(tmp_path / "a.png")): "image not found",
        ("--image", str(SAMPLE), "--output", str(tmp_path / "a.jpg")): "--output must be a .png file",
        ("--image", str(SAMPLE), "--output", str(tmp_path / "no" / "a.png")): "folder of --output does not exist",
        ("--model", str(tmp_path), "--image", str(SAMPLE), "--output", str(tmp_path / "a.png")): "has no config.json",
    }
    for args, message in cases.items():
        result = run(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_maps_are_attention_weights_per_layer(tower):
    config = tiny_config(tower, "sci", dense_connector_layers=[1, 2])
    model, processor = tiny_model(config), tiny_processor(config)
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    before = model.model.vision_tower.config._attn_implementation
    result = layer_attention(model, processor, image)
    assert model.model.vision_tower.config._attn_implementation == before  # eager only while the maps are made
    assert result.image.size == (config.vision_config.image_size,) * 2  # the padded, resized image the tower saw
    layers = model.model.vision_tower.config.num_hidden_layers
    assert len(result.maps) == layers
    side = config.vision_config.image_size // config.vision_config.patch_size
    assert all(m.shape == (side, side) for m in result.maps)
    totals = torch.stack([m.sum() for m in result.maps])
    if tower == "clip":  # the CLS row over patches: a softmax row less what CLS gives itself
        assert result.reduction == "CLS-to-patch"
        assert bool((totals < 1).all()) and bool((totals > 0).all())
    else:  # every query's row sums to 1, so the mean received over all patches sums to 1
        assert result.reduction == "mean received"
        torch.testing.assert_close(totals, torch.ones(layers), atol=1e-5, rtol=0)
    feature = config.feature_layer_index
    assert feature not in (1, 2)
    assert result.marks == {1: "SCI", 2: "SCI", feature: "F"}


def test_marks_name_the_dci_groups():
    marks, legend = connector_marks(tiny_config("clip", "dci", dense_connector_groups=[[0, 1], [2, 3]]))
    assert marks[1] == "G1" and marks[2] == "G2" and "F" in marks[3]
    assert "G1=[0, 1]" in legend and "0 = the embeddings" in legend
