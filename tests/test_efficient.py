"""Efficient Dense Connector (issue 6): the patch grid downsampled 2x per side before the projector."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import tiny_config, tiny_model, tiny_processor

from dense_connector import DenseConnectorConfig


CLIP_L = {"model_type": "clip_vision_model", "num_hidden_layers": 24, "image_size": 336, "patch_size": 14}


@pytest.mark.parametrize("connector,tokens", [("dci", 144), ("sci", 144), ("none", 144), ("sti", 144 + 2 * 18)])
def test_real_tower_token_counts(connector, tokens):
    config = DenseConnectorConfig(vision_config=CLIP_L, dense_connector_type=connector, image_downsample_factor=2)
    assert config.num_image_tokens() == tokens
    assert config.num_video_tokens(8) == 8 * (tokens // 2)


@pytest.mark.parametrize("tower,connector", [("clip", "dci"), ("siglip", "dci"), ("clip", "sci"), ("clip", "sti")])
def test_features_are_the_2x2_means_of_the_full_features(tower, connector):
    """Bilinear interpolation to exactly half the size (align_corners=False) samples midway between each pair of
    patches, i.e. averages each 2x2 block: the efficient features equal the full-resolution states averaged over
    2x2 patch blocks (raster order), then fused and projected. STI pools its extras from the downsampled grids."""
    model = tiny_model(tiny_config(tower, connector, image_downsample_factor=2))
    connector_module = model.model.connector
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, final, extras = connector_module.collect_hidden_states(model.model.vision_tower, pixel_values)  # 8x8 grids

        def block_means(state: torch.Tensor) -> torch.Tensor:
            grid = state.transpose(1, 2).unflatten(2, (8, 8))
            return F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)

        final, extras = block_means(final), [block_means(state) for state in extras]
        if connector == "sti":
            extras = [F.avg_pool1d(state.transpose(1, 2), 8).transpose(1, 2) for state in extras]
            fused = torch.cat([final, *extras], dim=1)
        else:
            fused = torch.cat([final, *extras], dim=-1)
        expected = connector_module.projector(fused)
        ours = torch.stack(model.get_image_features(pixel_values).pooler_output)
    assert ours.shape[1] == (16 if connector != "sti" else 16 + 2 * 2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_processor_follows_and_generate_runs_end_to_end():
    config = tiny_config("clip", "dci", image_downsample_factor=2)
    model, processor = tiny_model(config), tiny_processor(config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    inputs = processor(text="USER: <image>\nDescribe the picture. ASSISTANT:", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 16 == config.num_image_tokens()
    generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5

    frames = [image] * 3
    video_inputs = processor(text="USER: <video>\nWhat happens? ASSISTANT:", videos=frames, return_tensors="pt")
    assert int((video_inputs["input_ids"] == config.video_token_id).sum()) == 3 * 16 // 2
    with torch.no_grad():
        assert model(**video_inputs).video_hidden_states.shape[0] == 24
