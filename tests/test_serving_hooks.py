"""The hooks vLLM's Transformers modeling backend calls on the processor and model (tests/integrations/test_vllm.py
runs vLLM itself), and `token_prompt`, which hands vLLM the processor's ids."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import anyres_processor, tiny_config, tiny_model, tiny_processor
from transformers import AutoModel

from dense_connector import DenseConnectorModel
from dense_connector.integrations.vllm import token_prompt


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


SIZES = [(30, 41), (90, 20), (64, 64), (17, 200)]


@pytest.mark.parametrize("kind", ["clip", "siglip", "sti", "anyres"])
def test_num_multimodal_tokens_counts_the_placeholders_the_processor_writes(kind):
    if kind == "anyres":
        config = tiny_config("siglip", "dci", image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32]])
        processor = anyres_processor(config)
    else:
        config = tiny_config("clip" if kind == "sti" else kind, "sti" if kind == "sti" else "dci")
        processor = tiny_processor(config)
    images = [image(width, height, seed) for seed, (width, height) in enumerate(SIZES)]
    counts = processor._get_num_multimodal_tokens(image_sizes=[[img.height, img.width] for img in images])
    written = [processor(text="<image>", images=img)["input_ids"][0].count(config.image_token_id) for img in images]
    assert counts["num_image_tokens"] == written
    assert counts["num_image_patches"] == [1] * len(images)  # one row of pixel_values per image, tiles included
    if kind == "anyres":
        assert len(set(written)) > 1, "the sizes should need different numbers of AnyRes placeholders"


def test_replacement_offsets_locate_every_image_in_every_prompt():
    config = tiny_config()
    processor = tiny_processor(config)
    texts = ["USER: <image>\nWhat? ASSISTANT:", "<image> and <image>, compared"]
    images = [image(30, 41, 0), image(50, 20, 1), image(40, 40, 2)]
    plain = processor(text=texts, images=images, padding=True)
    output = processor(text=texts, images=images, padding=True, return_text_replacement_offsets=True)
    assert output["input_ids"] == plain["input_ids"]
    offsets = output["text_replacement_offsets"]
    assert [len(sample) for sample in offsets] == [1, 2]
    tokens = config.num_image_tokens()
    for text, sample in zip(texts, offsets):
        for entry in sample:
            start, end = entry["span"]
            assert text[start:end] == "<image>" == entry["text"]
            assert entry["type"] == "image"
            assert entry["replacement"] == "<image>" * tokens
    assert "text_replacement_offsets" not in plain
    tensors = processor(
        text=texts, images=images, padding=True, return_text_replacement_offsets=True, return_tensors="pt"
    )
    assert isinstance(tensors["input_ids"], torch.Tensor) and tensors["text_replacement_offsets"] == offsets


def test_token_prompt_has_one_placeholder_per_image_and_expands_to_the_processors_ids():
    config = tiny_config()
    processor = tiny_processor(config)
    text = "USER: <image><image>\nTwo? ASSISTANT:"
    images = [image(30, 41, 0), image(50, 20, 1)]
    prompt = token_prompt(processor, text, images)
    assert prompt["multi_modal_data"] == {"image": images}
    ids = prompt["prompt_token_ids"]
    assert ids.count(config.image_token_id) == 2
    expanded = [
        i for token in ids for i in [token] * (config.num_image_tokens() if token == config.image_token_id else 1)
    ]
    assert expanded == processor(text=text, images=images)["input_ids"][0]
    assert token_prompt(processor, "No image here.") == {
        "prompt_token_ids": processor(text="No image here.")["input_ids"][0]
    }


def test_saved_config_maps_automodel_to_the_base_model(tmp_path):
    model = tiny_model(tiny_config())
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_dense_connector.DenseConnectorModel"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_dense_connector.DenseConnectorForConditionalGeneration"
    base = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(base).__name__ == "DenseConnectorModel"


def test_base_model_keeps_no_rule_that_drops_the_head():
    # vLLM turns these rules into weight-name filters; one matching `lm_head.` drops the head's weights silently.
    rules = DenseConnectorModel._keys_to_ignore_on_load_unexpected or []
    assert not any(re.match(rule, "lm_head.weight") for rule in rules)


def test_packed_rows_longer_than_the_positions_run():
    # vLLM packs several requests into one row (no cache); only each request's positions must fit.
    config = tiny_config()
    model = tiny_model(config)
    limit = config.text_config.max_position_embeddings
    input_ids = torch.randint(5, 100, (1, limit + 10))
    position_ids = torch.cat([torch.arange(limit // 2), torch.arange(limit // 2 + 10)])[None]
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids).logits
    assert logits.shape[1] == limit + 10
