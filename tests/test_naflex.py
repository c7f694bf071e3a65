"""SigLIP 2 NaFlex towers: each image encoded at its own aspect ratio, one feature per valid patch.

Built in memory (`build_model`) from the tiny NaFlex stand-in of tests/hub_parts.py and Qwen3; the remote-code run
(generation with two aspect ratios in one batch, a training step, text-only logits) is a cell of
tests/test_plug_and_play.py. Here: the placeholder count of every image is its valid patch count, an image's features
are the same in a padded batch and alone, the training collator batches the patch sequences, and what NaFlex does not
support is refused in one line.
"""

import pytest
import torch
from hub_parts import NAFLEX_MAX_PATCHES, language_model_repo, siglip2_naflex_repo
from PIL import Image

from dense_connector import DenseConnectorConfig
from dense_connector.building import BuildError, build_checkpoint
from dense_connector.building.builder import build_model, build_processor_for
from dense_connector.training.collator import IGNORE_INDEX, DenseConnectorDataCollator
from dense_connector.web.attention import layer_attention


# Wide, tall and square images: three different patch grids within the 64-patch budget.
IMAGES = [
    Image.new("RGB", (40, 30), (200, 40, 40)),
    Image.linear_gradient("L").resize((24, 48)).convert("RGB"),
    Image.new("RGB", (32, 32), (10, 90, 200)),
]
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("naflex_parts")
    return siglip2_naflex_repo(root / "siglip2_naflex"), language_model_repo(root / "qwen3", "qwen3")


@pytest.fixture(scope="module", params=["dci", "sti", "sci"])
def naflex(parts, request):
    """A model and processor of each connector type (STI pools each image's own patches)."""
    tower, lm = parts
    return build_model(tower, lm, connector=request.param), build_processor_for(tower, lm, connector=request.param)


def batch(processor, images):
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return processor(
        images=images, text=[prompt] * len(images), padding=True, padding_side="left", return_tensors="pt"
    )


def test_each_image_takes_its_own_number_of_placeholders(naflex):
    """Placeholders per image = its valid patches (the tower's mask and grid agree), plus STI's pooled tokens."""
    model, processor = naflex
    inputs = batch(processor, IMAGES)
    valid = inputs["pixel_attention_mask"].sum(1).tolist()
    rows, cols = inputs["spatial_shapes"].unbind(1)
    assert valid == (rows * cols).tolist()
    assert len(set(valid)) == 3 and max(valid) <= NAFLEX_MAX_PATCHES  # three grids, none padded to a square
    assert all(r != c for r, c in inputs["spatial_shapes"].tolist()[:2])  # wide and tall keep their aspect ratio
    pooled = {"sti": [2 * (count // 8) for count in valid]}.get(model.config.dense_connector_type, [0] * 3)
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert placeholders == [count + extra for count, extra in zip(valid, pooled)]
    features = model.get_image_features(
        inputs["pixel_values"],
        pixel_attention_mask=inputs["pixel_attention_mask"],
        spatial_shapes=inputs["spatial_shapes"],
    ).pooler_output
    assert [len(f) for f in features] == placeholders


def test_features_in_a_padded_batch_equal_each_image_alone(naflex):
    """The connector reads each image's valid patches only: an image's features in a batch padded to the budget
    equal those of the image run alone with no padding at all."""
    model, processor = naflex
    inputs = batch(processor, IMAGES)
    with torch.no_grad():
        together = model.get_image_features(
            inputs["pixel_values"],
            pixel_attention_mask=inputs["pixel_attention_mask"],
            spatial_shapes=inputs["spatial_shapes"],
        ).pooler_output
        for index, count in enumerate(inputs["pixel_attention_mask"].sum(1).tolist()):
            alone = model.get_image_features(
                inputs["pixel_values"][index : index + 1, :count],
                pixel_attention_mask=inputs["pixel_attention_mask"][index : index + 1, :count],
                spatial_shapes=inputs["spatial_shapes"][index : index + 1],
            ).pooler_output[0]
            torch.testing.assert_close(together[index], alone, rtol=1e-4, atol=1e-5)


def test_a_training_step_through_the_collator(parts):
    """The collator batches NaFlex patch sequences, masks and grids; the loss reaches the projector and the tower."""
    model, processor = build_model(*parts), build_processor_for(*parts)
    records = [
        {"messages": [*MESSAGES, {"role": "assistant", "content": reply}], "images": [picture]}
        for picture, reply in zip(IMAGES[:2], ["A red box.", "A grey ramp."])
    ]
    collated = DenseConnectorDataCollator(processor)(records)
    assert collated["pixel_values"].shape == (2, NAFLEX_MAX_PATCHES, 3 * 4 * 4)
    assert collated["pixel_attention_mask"].shape == (2, NAFLEX_MAX_PATCHES)
    assert collated["spatial_shapes"].tolist() == batch(processor, IMAGES[:2])["spatial_shapes"].tolist()
    assert (collated["labels"] != IGNORE_INDEX).any()
    model.train()
    loss = model(**collated).loss
    loss.backward()
    assert torch.isfinite(loss)
    reached = {name for name, param in model.named_parameters() if param.grad is not None and param.grad.any()}
    assert any("projector" in name for name in reached) and any("vision_tower" in name for name in reached)


def test_a_text_only_training_step_runs_the_tower(parts):
    """A text-only batch still runs tower and connector (0 x a zero image), as every rank must."""
    model = build_model(*parts).train()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.connector.projector[0].weight.grad is not None


def test_what_naflex_does_not_support_is_refused_in_one_line(parts, tmp_path):
    tower, lm = parts
    with pytest.raises(BuildError, match="image_downsample_factor is not supported .* NaFlex") as refused:
        build_checkpoint(tower, lm, tmp_path / "out", image_downsample_factor=2, progress=False)
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()

    model = build_model(tower, lm)
    with pytest.raises(ValueError, match="image_grid_pinpoints is not supported .* NaFlex"):
        DenseConnectorConfig(**{**model.config.to_dict(), "image_grid_pinpoints": [[32, 64]]})
    with pytest.raises(ValueError, match="Video is not supported .* NaFlex"):
        model.get_video_features(torch.zeros(1, 2, 3, 32, 32))
    processor = build_processor_for(tower, lm)
    with pytest.raises(ValueError, match="Video is not supported .* NaFlex"):
        processor(text="<video>", videos=[IMAGES[:2]])
    with pytest.raises(ValueError, match="takes patch sequences .* spatial_shapes"):
        model.get_image_features(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no fixed image size or patch grid"):
        layer_attention(model, processor, IMAGES[0])
    with pytest.raises(ValueError, match="NaFlex .* vLLM is not supported"):
        processor._get_num_multimodal_tokens(image_sizes=[[30, 40]])
