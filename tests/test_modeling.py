"""Modeling tests in the style of transformers' model testers, over every connector type and two towers."""

import copy

import pytest
import torch
from tiny import tiny_config, tiny_model
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

from dense_connector import DenseConnectorConfig, DenseConnectorForConditionalGeneration, DenseConnectorModel


TOWERS = ("clip", "siglip")
CONNECTORS = ("sti", "sci", "dci", "none")
COMBOS = [(tower, connector) for tower in TOWERS for connector in CONNECTORS]


class DenseConnectorModelTester:
    """Builds tiny configs and matching inputs (text with placeholders, pixels, labels)."""

    def __init__(self, tower: str, connector: str, batch_size: int = 2):
        self.config = tiny_config(tower, connector)
        self.batch_size = batch_size
        self.num_image_tokens = self.config.num_image_tokens()

    def pixel_values(self, num_images: int, seed: int = 0) -> torch.Tensor:
        size = self.config.vision_config.image_size
        return torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def input_ids(self, images_per_sample: int = 1, text_len: int = 5, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        rows = []
        for _ in range(self.batch_size):
            row = [1]
            for _ in range(images_per_sample):
                row += [self.config.image_token_id] * self.num_image_tokens
                row += torch.randint(3, 1000, (text_len,), generator=generator).tolist()
            rows.append(row)
        return torch.tensor(rows)

    def inputs(self, images_per_sample: int = 1) -> dict[str, torch.Tensor]:
        input_ids = self.input_ids(images_per_sample)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": self.pixel_values(self.batch_size * images_per_sample),
        }


@pytest.fixture(params=COMBOS, ids=[f"{t}-{c}" for t, c in COMBOS])
def tester(request) -> DenseConnectorModelTester:
    return DenseConnectorModelTester(*request.param)


def test_forward_shapes(tester):
    model = tiny_model(tester.config)
    inputs = tester.inputs()
    out = model(**inputs)
    seq_len = inputs["input_ids"].shape[1]
    assert out.logits.shape == (tester.batch_size, seq_len, tester.config.text_config.vocab_size)
    hidden = tester.config.text_config.hidden_size
    assert out.image_hidden_states.shape == (tester.batch_size * tester.num_image_tokens, hidden)
    base = DenseConnectorModel(tester.config).eval()
    assert base(**inputs).last_hidden_state.shape == (tester.batch_size, seq_len, hidden)


def test_image_features_replace_placeholders(tester):
    model = tiny_model(tester.config)
    inputs = tester.inputs()
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert [f.shape[0] for f in features] == [tester.num_image_tokens] * tester.batch_size
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    mask = inputs["input_ids"] == tester.config.image_token_id
    embeds[mask] = torch.cat(features)
    by_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(model(**inputs).logits, by_embeds)


def test_save_load_round_trip(tester, tmp_path):
    model = tiny_model(tester.config)
    inputs = tester.inputs()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is DenseConnectorForConditionalGeneration
    torch.testing.assert_close(model(**inputs).logits, loaded(**inputs).logits)
    assert type(AutoModel.from_pretrained(tmp_path)) is DenseConnectorModel


@pytest.mark.parametrize("tower,connector", [("clip", "dci"), ("siglip", "sti")])
def test_generate_with_cache_matches_no_cache(tower, connector):
    tester = DenseConnectorModelTester(tower, connector)
    model = tiny_model(tester.config)
    inputs = tester.inputs()
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
    handle.remove()
    assert len(calls) == 1, "pixel values must be encoded once, at the prefill step"
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    assert cached.shape == (tester.batch_size, inputs["input_ids"].shape[1] + 6)


def test_batch_with_left_padding_matches_single():
    tester = DenseConnectorModelTester("clip", "dci", batch_size=1)
    model = tiny_model(tester.config)
    short = tester.input_ids(text_len=3, seed=1)[0]
    long = tester.input_ids(text_len=9, seed=2)[0]
    pad = long.shape[0] - short.shape[0]
    input_ids = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), short]), long])
    attention_mask = (torch.arange(long.shape[0]) >= torch.tensor([[pad], [0]])).long()
    pixel_values = tester.pixel_values(2)
    batched = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, max_new_tokens=5
    )
    for row, (ids, pixels) in enumerate(((short, pixel_values[:1]), (long, pixel_values[1:]))):
        single = model.generate(input_ids=ids[None], pixel_values=pixels, max_new_tokens=5)
        torch.testing.assert_close(batched[row, -5:], single[0, -5:])
    batched_logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    single_logits = model(input_ids=short[None], pixel_values=pixel_values[:1]).logits
    torch.testing.assert_close(batched_logits[0, pad:], single_logits[0], atol=1e-5, rtol=1e-4)


def test_multi_image_prompt_keeps_image_order():
    tester = DenseConnectorModelTester("clip", "sci", batch_size=1)
    model = tiny_model(tester.config)
    inputs = tester.inputs(images_per_sample=2)
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    out = model(**inputs)
    torch.testing.assert_close(out.image_hidden_states, torch.cat(features))
    swapped = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)})
    assert not torch.allclose(out.logits, swapped.logits), "the two images must not be interchangeable"


def test_text_only_prompt():
    config = tiny_config()
    model = tiny_model(config)
    input_ids = torch.tensor([[1, 5, 6, 7]])
    out = model(input_ids=input_ids)
    assert out.image_hidden_states is None
    language_only = model.lm_head(model.model.language_model(input_ids=input_ids).last_hidden_state)
    torch.testing.assert_close(out.logits, language_only)
    assert model.generate(input_ids=input_ids, max_new_tokens=3).shape == (1, 7)


def test_placeholder_image_mismatch_names_both_numbers():
    tester = DenseConnectorModelTester("clip", "dci")
    model = tiny_model(tester.config)
    inputs = tester.inputs()
    with pytest.raises(ValueError, match=rf"{2 * tester.num_image_tokens} image placeholder tokens.*1 image"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:1]})


def test_training_step_gradients_flow(tester):
    model = tiny_model(tester.config).train()
    inputs = tester.inputs()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == tester.config.image_token_id, -100)
    out = model(**inputs, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name in ("connector.projector.0.weight", "language_model.layers.0.mlp.up_proj.weight"):
        grad = model.model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    first_tower_layer = model.model.vision_tower.get_parameter("encoder.layers.0.mlp.fc1.weight")
    assert first_tower_layer.grad.abs().sum() > 0


def test_gradient_checkpointing_same_loss_and_grads():
    tester = DenseConnectorModelTester("clip", "dci")
    inputs = tester.inputs()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == tester.config.image_token_id, -100)
    results = []
    for checkpointing in (False, True):
        model = tiny_model(tester.config).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.model.language_model.gradient_checkpointing
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.model.connector.projector[0].weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("tower", TOWERS)
def test_sdpa_matches_eager(tower, tmp_path):
    tester = DenseConnectorModelTester(tower, "dci")
    tiny_model(tester.config).save_pretrained(tmp_path)
    inputs = tester.inputs()
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = DenseConnectorForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation)
        assert model.model.language_model.config._attn_implementation == implementation
        outputs[implementation] = model.eval()(**inputs).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=1e-5, rtol=1e-4)


def test_resize_token_embeddings():
    tester = DenseConnectorModelTester("clip", "dci")
    model = tiny_model(tester.config)
    model.resize_token_embeddings(1024)
    assert model.config.text_config.vocab_size == 1024
    assert model.lm_head.weight.shape[0] == 1024
    assert model(**tester.inputs()).logits.shape[-1] == 1024


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_loading(dtype, tmp_path):
    tester = DenseConnectorModelTester("siglip", "dci")
    tiny_model(tester.config).save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=dtype).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = model(**tester.inputs())
    assert out.logits.dtype == dtype and torch.isfinite(out.logits.float()).all()


def test_tied_and_untied_heads():
    untied = tiny_model(tiny_config())
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    tied = tiny_model(tiny_config(tie_word_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()


def test_device_map_auto_keeps_layers_whole(tmp_path):
    from accelerate import infer_auto_device_map

    tester = DenseConnectorModelTester("clip", "dci")
    model = tiny_model(tester.config)
    no_split = set(model._no_split_modules)
    assert {"CLIPEncoderLayer", "LlamaDecoderLayer", "DenseConnector"} <= no_split
    # Three small devices force a split; accelerate must cut only between whole layers.
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(
        model, max_memory={0: size // 3, 1: size // 3, "cpu": size}, no_split_module_classes=list(no_split)
    )
    assert len(set(device_map.values())) > 1
    whole = {name for name, module in model.named_modules() if type(module).__name__ in no_split}
    for key in device_map:
        assert not any(key.startswith(name + ".") for name in whole), f"{key} splits a no-split module"
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto").eval()
    inputs = tester.inputs()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_logits_to_keep():
    tester = DenseConnectorModelTester("clip", "sti")
    model = tiny_model(tester.config)
    inputs = tester.inputs()
    full = model(**inputs).logits
    torch.testing.assert_close(model(**inputs, logits_to_keep=3).logits, full[:, -3:])


@pytest.mark.parametrize("tower", TOWERS)
def test_connector_none_matches_transformers_llava(tower):
    """With connector "none" the model is LLaVA-1.5: transformers' own Llava with the same weights is the reference."""
    tester = DenseConnectorModelTester(tower, "none")
    ours = tiny_model(tester.config)
    llava_config = LlavaConfig(
        vision_config=copy.deepcopy(tester.config.vision_config),
        text_config=copy.deepcopy(tester.config.text_config),
        image_token_index=tester.config.image_token_id,
        vision_feature_layer=tester.config.vision_feature_layer,
        vision_feature_select_strategy=tester.config.vision_feature_select_strategy,
        projector_hidden_act="gelu",
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    state = ours.state_dict()
    renamed = {
        "multi_modal_projector.linear_1": "connector.projector.0",
        "multi_modal_projector.linear_2": "connector.projector.2",
    }
    llava_state = {}
    for key in llava.state_dict():
        ours_key = key
        for theirs, mine in renamed.items():
            ours_key = ours_key.replace(theirs, mine)
        # Llava builds every tower layer; ours stops at the deepest one the connector reads.
        llava_state[key] = state.get(ours_key, llava.state_dict()[key])
    llava.load_state_dict(llava_state)
    inputs = tester.inputs()
    torch.testing.assert_close(ours(**inputs).logits, llava(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_tower_runs_only_needed_layers():
    config = tiny_config("clip", "dci")  # 4 layers, F = hs[3], groups hs[0..1] and hs[2..3]
    model = tiny_model(config)
    assert len(model.model.vision_tower.encoder.layers) == 3
    # The config describes the tower that is built, and the feature layer keeps naming the same state.
    assert config.vision_config.num_hidden_layers == 3 and config.vision_feature_layer == 3


# --- configuration -------------------------------------------------------------------------------------------


CLIP_L = {"model_type": "clip_vision_model", "num_hidden_layers": 24, "image_size": 336, "patch_size": 14}
SIGLIP_SO400M_26 = {
    "model_type": "siglip_vision_model",
    "num_hidden_layers": 26,
    "image_size": 384,
    "patch_size": 14,
    "hidden_size": 1152,
    "num_attention_heads": 16,
}


@pytest.mark.parametrize(
    "vision,connector,strategy,tokens",
    [
        (CLIP_L, "dci", "default", 576),
        (CLIP_L, "sti", "default", 720),
        (CLIP_L, "sci", "default", 576),
        (CLIP_L, "none", "default", 576),
        (SIGLIP_SO400M_26, "dci", "full", 729),
        (SIGLIP_SO400M_26, "sti", "full", 911),
    ],
)
def test_real_tower_token_counts(vision, connector, strategy, tokens):
    config = DenseConnectorConfig(
        vision_config=vision, dense_connector_type=connector, vision_feature_select_strategy=strategy
    )
    assert config.num_image_tokens() == tokens


def test_defaults_follow_spec():
    clip = DenseConnectorConfig(vision_config=CLIP_L, dense_connector_type="dci")
    assert clip.dense_connector_groups == [list(range(0, 12)), list(range(12, 24))]
    assert clip.feature_layer_index == 23 and clip.num_vision_layers_used == 23
    siglip = DenseConnectorConfig(vision_config=SIGLIP_SO400M_26, dense_connector_type="dci", vision_feature_layer=-1)
    assert siglip.dense_connector_groups == [list(range(0, 13)), list(range(13, 26))]
    assert siglip.num_vision_layers_used == 26
    for vision in (CLIP_L, SIGLIP_SO400M_26):
        for connector in ("sti", "sci"):
            config = DenseConnectorConfig(vision_config=vision, dense_connector_type=connector)
            assert config.dense_connector_layers == [7, 15]
    assert isinstance(DenseConnectorConfig().vision_config, CLIPVisionConfig)
    assert isinstance(DenseConnectorConfig(vision_config=SIGLIP_SO400M_26).vision_config, SiglipVisionConfig)


def test_config_round_trip(tmp_path):
    config = tiny_config("siglip", "sti", sti_pool_stride=4, projector_depth=3)
    config.save_pretrained(tmp_path)
    loaded = DenseConnectorConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"dense_connector_type": "dense"}, r"dense_connector_type='dense'.*\('sti', 'sci', 'dci', 'none'\)"),
        ({"vision_feature_select_strategy": "cls"}, r"vision_feature_select_strategy='cls'.*\('default', 'full'\)"),
        ({"vision_feature_layer": 9}, r"vision_feature_layer=9 is outside.*-5\.\.4"),
        ({"dense_connector_type": "sci", "dense_connector_layers": [1, 7]}, r"dense_connector_layers.*\[7\].*0\.\.4"),
        ({"dense_connector_type": "sci", "dense_connector_layers": []}, r"dense_connector_layers must name"),
        ({"dense_connector_groups": [[0, 1], []]}, r"dense_connector_groups=.*non-empty"),
        ({"dense_connector_groups": [[0, 12]]}, r"dense_connector_groups has hidden-state indices \[12\]"),
        ({"sti_pool_stride": 0}, r"sti_pool_stride=0 must be a positive integer"),
        ({"image_downsample_factor": 3}, r"image_downsample_factor=3 must divide the 8x8 patch grid"),
        ({"image_grid_pinpoints": [[32, 48]]}, r"image_grid_pinpoints must be \[height, width\] pairs"),
    ],
)
def test_invalid_config_is_rejected(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config("clip", "dci", **overrides)
