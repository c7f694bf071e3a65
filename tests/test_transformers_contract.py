"""Regression tests for what transformers' common model tests found: loading semantics, the `get_*_features`
output contract, one config for the tower, no prompt-length refusal in the forward pass, compiled decoding, and a
second language-model family."""

import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import tiny_config, tiny_model, tiny_processor
from transformers import CLIPVisionConfig, CompileConfig
from transformers.utils import logging as hf_logging

from dense_connector import DenseConnectorConfig, DenseConnectorForConditionalGeneration, DenseConnectorModel


def _inputs(config: DenseConnectorConfig, batch_size: int = 2) -> dict[str, torch.Tensor]:
    size = config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 1000, (batch_size, 5), generator=generator)
    placeholders = torch.full((batch_size, config.num_image_tokens()), config.image_token_id)
    input_ids = torch.cat([torch.ones(batch_size, 1, dtype=torch.long), placeholders, text], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
    }


# --- 1. loading semantics --------------------------------------------------------------------------------------


def test_base_model_checkpoint_loads_into_the_head_class(tmp_path):
    base = DenseConnectorModel(tiny_config()).eval()
    base.save_pretrained(tmp_path)
    model, info = DenseConnectorForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"} and not info["unexpected_keys"]
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[name], tensor)


def test_unexpected_tensors_are_reported_not_refused(tmp_path, caplog):
    tiny_model(tiny_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "model.connector.extra": torch.zeros(3)}, tmp_path / "model.safetensors")
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            _, info = DenseConnectorForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    finally:
        hf_logging.disable_propagation()
    assert info["unexpected_keys"] == {"model.connector.extra"} and not info["missing_keys"]
    assert "model.connector.extra" in caplog.text


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_missing_weights_get_each_sub_model_initialisation(tower):
    """`from_pretrained(None, config=..., state_dict={})` initialises every tensor as `__init__` does: CLIP's attention
    and MLP use CLIP's own scaled init, not the generic std 0.02."""
    config = tiny_config(tower)
    torch.manual_seed(0)
    from_init = DenseConnectorForConditionalGeneration(config)
    from_nothing = DenseConnectorForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    assert from_init.state_dict().keys() == from_nothing.state_dict().keys()
    tower_model = from_nothing.model.vision_tower
    for name in ("encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.mlp.fc1.weight"):
        expected = from_init.model.vision_tower.get_parameter(name).std()
        torch.testing.assert_close(tower_model.get_parameter(name).std(), expected, rtol=0.15, atol=0)
    if tower == "clip":  # CLIP's q_proj std is hidden^-0.5 * (2 * layers)^-0.5 = 0.072 here, far from 0.02
        assert tower_model.get_parameter("encoder.layers.0.self_attn.q_proj.weight").std() > 0.05


# --- 2. get_image_features / get_video_features ----------------------------------------------------------------


def test_image_features_return_the_tower_outputs_and_the_projected_features():
    config = tiny_config("clip", "dci", vision_config={**tiny_config().vision_config.to_dict(), "hidden_size": 48})
    model = tiny_model(config)
    model.set_attn_implementation("eager")
    pixel_values = _inputs(config)["pixel_values"]
    out = model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
    patches = config.patches_per_side**2 + 1
    assert out.last_hidden_state.shape == (2, patches, 48)  # the tower's width, not the LM's
    assert len(out.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert len(out.attentions) == config.vision_config.num_hidden_layers
    assert [f.shape for f in out.pooler_output] == [(config.num_image_tokens(), 64)] * 2
    plain = model.get_image_features(pixel_values)
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(torch.stack(plain.pooler_output), torch.stack(out.pooler_output))
    as_tuple = model.get_image_features(pixel_values, return_dict=False)
    torch.testing.assert_close(as_tuple[0], plain.last_hidden_state)


def test_video_features_return_the_tower_outputs_over_all_frames():
    config = tiny_config()
    model = tiny_model(config)
    videos = torch.randn(2, 3, 3, 32, 32)
    out = model.get_video_features(videos, output_hidden_states=True)
    assert out.last_hidden_state.shape == (6, config.patches_per_side**2 + 1, 32)
    assert len(out.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert [f.shape for f in out.pooler_output] == [(config.num_video_tokens(3), 64)] * 2


# --- 3. one config for the tower -------------------------------------------------------------------------------


def test_tower_config_is_the_models_vision_config(tmp_path):
    model = tiny_model(tiny_config("siglip", "sti"))
    assert model.model.vision_tower.config is model.config.vision_config
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    assert model.model.vision_tower.config._attn_implementation == "eager"
    assert model.model.language_model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    loaded = DenseConnectorForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.vision_config.num_hidden_layers == len(loaded.model.vision_tower.encoder.layers)
    fields = ("vision_feature_layer", "dense_connector_layers")
    assert [getattr(loaded.config, f) for f in fields] == [getattr(model.config, f) for f in fields]


def test_config_keeps_naming_the_same_hidden_states():
    """hs[-2] of a 4-layer tower is hs[3]: the config keeps 3 layers and says 3, and a vision config object passed
    in is not modified."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=4
    )
    config = tiny_config(vision_config=vision, dense_connector_type="sci", dense_connector_layers=[1])
    assert (config.vision_feature_layer, config.vision_config.num_hidden_layers) == (3, 3)
    assert vision.num_hidden_layers == 4 and config.vision_config is not vision
    assert DenseConnectorConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


# --- 4. no prompt-length check in the forward pass -------------------------------------------------------------


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
def test_rope_scaled_prompt_longer_than_max_positions_runs(rope_type):
    """As in the wrapped Llama: RoPE scaling lets a prompt exceed `max_position_embeddings` (512 here)."""
    config = tiny_config()
    config.text_config.rope_parameters = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    model = tiny_model(config)
    input_ids = torch.randint(3, 1000, (1, 700), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        alone = model.lm_head(model.model.language_model(input_ids=input_ids).last_hidden_state)
    torch.testing.assert_close(logits, alone)


def test_processor_warns_about_a_prompt_longer_than_model_max_length(caplog):
    processor = tiny_processor(tiny_config())
    processor.tokenizer.model_max_length = 70
    image = Image.new("RGB", (40, 30))
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            processor(images=image, text="<image>\nHi")  # 64 placeholders + 4 tokens: fits
            assert "model_max_length" not in caplog.text
            processor(images=image, text="<image>\nA longer question about the picture")
    finally:
        hf_logging.disable_propagation()
    assert "more than the tokenizer's model_max_length=70" in caplog.text


# --- compiled decoding -----------------------------------------------------------------------------------------


def test_compiled_static_cache_generation_gives_the_eager_ids():
    torch._dynamo.reset()
    config = tiny_config("clip", "dci")
    model = tiny_model(config)
    inputs = _inputs(config, batch_size=1)
    eager = model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static")
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    compiled = model.generate(  # fullgraph=True: any graph break is an error
        **inputs, max_new_tokens=5, do_sample=False, cache_implementation="static", compile_config=compile_config
    )
    assert model._compiled_call is not None, "decoding must have run through the compiled forward"
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)  # token ids: integers


# --- a second language-model family ----------------------------------------------------------------------------


def test_qwen2_language_model(tmp_path):
    text_config = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1002,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }
    config = tiny_config("siglip", "dci", text_config=text_config)
    model = tiny_model(config)
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    assert model.lm_head.weight is model.get_input_embeddings().weight
    inputs = _inputs(config)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, 1002)
    model.save_pretrained(tmp_path)
    loaded, info = DenseConnectorForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    torch.testing.assert_close(loaded.eval()(**inputs).logits, logits)
    generated = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 4)
