"""Plug and play: Dense Connector models built from today's towers and language models, laid out as on the Hub
(tests/hub_parts.py), run as remote code end to end.

The matrix: every tower with one language model (Qwen3), and one tower (CLIP) with every language model (the
mixture-of-experts ones as the Hub keeps them, one tensor per expert). Each cell is built with `dense-connector build`
(DCI, `--version native`), then one fresh process without the package loads every folder as remote code and, for
each: generates from a batch of two prompts with one image each (different aspect ratios: a NaFlex tower encodes each
at its own, a fixed-resolution one pads both to a square), takes one training step and checks that it reaches the
projector, compares the text-only logits with the language model's own and the tower's hidden states with the tower's
own (the proof that every weight arrived). One subprocess for the whole matrix keeps it fast.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_parts import (
    LANGUAGE_MODELS,
    NON_PATCH_TOKENS,
    TOWER_LAYERS,
    TOWERS,
    clip_model_repo,
    clip_vision_repo,
    language_model_repo,
    qwen2_repo,
    siglip2_naflex_repo,
    siglip_model_repo,
    tower_repo,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import run_without_package
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from dense_connector import DenseConnectorForConditionalGeneration
from dense_connector.building import BuildError, build_checkpoint
from dense_connector.building.builder import prepare_build
from dense_connector.training.regimes import prepare_for_training
from dense_connector.web.attention import layer_attention
from dense_connector.writing.sources import CheckpointError


ONE_LM = "qwen3"
ONE_TOWER = "clip_vision"
TOWER_NAMES = ["clip_model", "siglip_model", "siglip2_naflex", *TOWERS]
LM_NAMES = [*LANGUAGE_MODELS, "qwen2"]
CELLS = sorted({(tower, ONE_LM) for tower in TOWER_NAMES} | {(ONE_TOWER, lm) for lm in LM_NAMES})


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    made = {
        "clip_model": clip_model_repo(root / "clip_model"),
        "siglip_model": siglip_model_repo(root / "siglip_model"),
        "clip_vision": clip_vision_repo(root / "clip_vision"),
        "qwen2": qwen2_repo(root / "qwen2"),
        "siglip2_naflex": siglip2_naflex_repo(root / "siglip2_naflex"),
    }
    made.update({name: tower_repo(root / name, name) for name in TOWERS})
    made.update({name: language_model_repo(root / name, name) for name in LANGUAGE_MODELS})
    return made


@pytest.fixture(scope="module")
def built(parts, tmp_path_factory) -> dict[str, dict]:
    """Every cell built with `dense-connector build`: its folder and the parts it was built from."""
    root = tmp_path_factory.mktemp("built")
    cells = {}
    for tower, lm in CELLS:
        folder = build_checkpoint(parts[tower], parts[lm], root / f"{tower}+{lm}", version="native", progress=False)
        cells[f"{tower}+{lm}"] = {"folder": str(folder), "tower": str(parts[tower]), "lm": str(parts[lm])}
    return cells


@pytest.fixture(scope="module")
def matrix(built, tmp_path_factory) -> dict[str, dict]:
    """Every cell run in one fresh process as remote code; the per-cell measurements."""
    work = tmp_path_factory.mktemp("remote")
    run_without_package(RUN_CELLS.replace("CELLS", json.dumps(built)), work, timeout=900)
    return json.loads((work / "matrix.json").read_text())


RUN_CELLS = r"""
import json
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

torch.manual_seed(0)
images = [Image.new("RGB", (40, 30), (200, 40, 40)), Image.new("RGB", (24, 48), (40, 160, 60))]  # wide, tall
results = {}
for name, cell in json.loads('''CELLS''').items():
    model = AutoModelForImageTextToText.from_pretrained(cell["folder"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(cell["folder"], trust_remote_code=True)
    result = results[name] = {}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=[prompt] * 2, padding=True, padding_side="left", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    result["new_tokens"] = generated.shape[1] - inputs["input_ids"].shape[1]
    result["placeholders"] = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    # A NaFlex tower's images give one feature per valid patch; a fixed-resolution tower's, the config's count.
    naflex = {key: inputs[key] for key in ("pixel_attention_mask", "spatial_shapes") if key in inputs}
    valid = inputs["pixel_attention_mask"].sum(1).tolist() if naflex else [None, None]
    result["valid_patches"] = valid
    result["config_tokens"] = [model.config.num_image_tokens(num_patches=count) for count in valid]

    # The tower's hidden states as the tower itself computes them (its vision model when the repository is full).
    tower = AutoModel.from_pretrained(cell["tower"]).eval()
    tower = getattr(tower, "vision_model", tower)
    with torch.no_grad():
        pixels = inputs["pixel_values"]
        ours = model.model.get_image_features(pixels, output_hidden_states=True, **naflex).hidden_states
        own = tower(pixel_values=pixels, output_hidden_states=True, **naflex).hidden_states
    result["tower_states"] = len(ours)
    result["tower_diff"] = max(float((a - b).abs().max()) for a, b in zip(ours, own))

    # Text only: the language model's own logits, over its own vocabulary.
    lm = AutoModelForCausalLM.from_pretrained(cell["lm"]).eval()
    ids = processor.tokenizer("A red square on a table.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[..., : lm.config.vocab_size]
        expected = lm(input_ids=ids).logits
    result["lm_diff"] = float((logits - expected).abs().max())
    result["lm_scale"] = float(expected.abs().max())

    # One training step on an image record: the loss reaches the projector, which the step changes.
    model.train()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    projector = model.model.connector.projector
    before = [p.detach().clone() for p in projector.parameters()]
    optimizer = torch.optim.SGD(projector.parameters(), lr=0.1)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    result["loss"] = float(loss)
    result["projector_grad"] = float(sum(p.grad.abs().sum() for p in projector.parameters()))
    optimizer.step()
    result["projector_moved"] = any(not torch.equal(a, p) for a, p in zip(before, projector.parameters()))
open("matrix.json", "w").write(json.dumps(results))
"""


@pytest.mark.parametrize("cell", [f"{tower}+{lm}" for tower, lm in CELLS])
def test_built_model_runs_end_to_end_as_remote_code(matrix, cell):
    result = matrix[cell]
    assert result["new_tokens"] == 3
    assert result["placeholders"] == result["config_tokens"] and min(result["placeholders"]) > 0
    assert result["projector_grad"] > 0 and result["projector_moved"]
    assert math.isfinite(result["loss"])


@pytest.mark.parametrize("cell", [f"{tower}+{lm}" for tower, lm in CELLS])
def test_every_weight_arrived(matrix, cell):
    """Text-only logits equal the language model's own; the tower's hidden states equal the tower's own."""
    result = matrix[cell]
    assert result["lm_diff"] <= 1e-4 * max(result["lm_scale"], 1.0), result
    assert result["tower_states"] >= TOWER_LAYERS  # every state up to the deepest layer read
    assert result["tower_diff"] <= 1e-4, result


@pytest.mark.parametrize("tower", ["dinov2_registers", "dinov3", "aimv2", "siglip_model", "clip_model"])
def test_attention_maps_cover_the_patch_grid_with_or_without_cls(built, tower):
    """A tower with a CLS token maps its attention to the patches (registers left out); one without, the mean
    attention each patch receives (docs/web.md)."""
    folder = built[f"{tower}+{ONE_LM}"]["folder"]
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    result = layer_attention(model, AutoProcessor.from_pretrained(folder), Image.new("RGB", (40, 30), (200, 40, 40)))
    assert len(result.maps) == model.config.vision_config.num_hidden_layers
    assert all(tuple(m.shape) == (8, 8) for m in result.maps)
    with_cls = NON_PATCH_TOKENS.get(tower, 1 if tower == "clip_model" else 0) > 0
    assert result.reduction == ("CLS-to-patch" if with_cls else "mean received")
    total = result.maps[0].sum().item()
    # The CLS row leaves out what CLS gives itself and the registers; every query row sums to 1.
    assert (0 < total < 1) if with_cls else total == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("tower", sorted(NON_PATCH_TOKENS))
def test_non_patch_tokens_are_read_off_the_tower(parts, tower, tmp_path):
    """CLS and register tokens are not image features: the config says how many lead the sequence."""
    config = prepare_build(parts[tower], parts[ONE_LM]).config
    expected = NON_PATCH_TOKENS[tower]
    assert config.vision_prefix_tokens == expected
    assert config.vision_feature_select_strategy == ("default" if expected else "full")


# ----------------------------------------------------------------------------------------------------------------
# Parts that are not supported: one line naming what is, nothing written
# ----------------------------------------------------------------------------------------------------------------


def saved_config(folder: Path, model_type: str, **settings) -> Path:
    AutoConfig.for_model(model_type, **settings).save_pretrained(folder)
    return folder


UNSUPPORTED_TOWERS = {
    "convnext": ("convnext", {}),
    "swin": ("swin", {"embed_dim": 32, "depths": [1, 1], "num_heads": [2, 2]}),
}


@pytest.mark.parametrize("tower", UNSUPPORTED_TOWERS)
def test_towers_without_a_patch_token_grid_are_refused(parts, tower, tmp_path):
    model_type, settings = UNSUPPORTED_TOWERS[tower]
    folder = saved_config(tmp_path / tower, model_type, **settings)
    with pytest.raises(BuildError, match=r"supports patch-token ViT encoders: CLIP, .*DINOv2") as refused:
        build_checkpoint(folder, parts[ONE_LM], tmp_path / "out", progress=False)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_an_encoder_decoder_language_model_is_refused(parts, tmp_path):
    folder = saved_config(tmp_path / "t5", "t5", d_model=32, num_layers=1, num_heads=2)
    with pytest.raises(BuildError, match="needs a causal language model") as refused:
        build_checkpoint(parts[ONE_TOWER], folder, tmp_path / "out", progress=False)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_an_unknown_expert_layout_is_refused(parts, tmp_path):
    """Per-expert tensors under names transformers does not convert fit nothing; nothing is written."""
    folder = tmp_path / "renamed_experts"
    folder.mkdir()
    for path in parts["qwen3_moe"].iterdir():
        if path.suffix == ".safetensors":
            tensors = {name.replace(".experts.", ".expert_list."): t for name, t in load_file(path).items()}
            save_file(tensors, folder / path.name, metadata={"format": "pt"})
        else:
            (folder / path.name).write_bytes(path.read_bytes())
    with pytest.raises(BuildError, match=r"tensor\(s\) fit nothing .*expert_list") as refused:
        build_checkpoint(parts[ONE_TOWER], folder, tmp_path / "out", progress=False)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_build_prints_the_layers_it_chose(parts, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dense_connector.cli",
            "build",
            "--vision-tower",
            str(parts["dinov2_registers"]),
            "--language-model",
            str(parts[ONE_LM]),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # 6 layers: final feature hs[5] (the second-to-last layer's output), groups the two halves of hs[0..5].
    assert "dci connector reads the final feature hs[5] and groups hs[0..2], hs[3..5]" in result.stderr
    assert "5 non-patch token(s) dropped" in result.stderr


def test_from_vision_text_pretrained_fuses_experts_in_memory_too(parts):
    """The in-memory build reads the same plan: per-expert tensors fused, logits equal to the language model's."""
    model = DenseConnectorForConditionalGeneration.from_vision_text_pretrained(parts["dinov3"], parts["qwen3_moe"])
    lm = AutoModelForCausalLM.from_pretrained(parts["qwen3_moe"]).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., : lm.config.vocab_size]
        torch.testing.assert_close(ours, lm(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert model.config.vision_prefix_tokens == NON_PATCH_TOKENS["dinov3"]


@pytest.mark.parametrize("tune", ["projector+lm", "lora"])
@pytest.mark.parametrize("cell", ["dinov2_registers+qwen3", "clip_vision+qwen3_moe", "clip_vision+gemma3"])
def test_stage_2_and_lora_train_built_models(built, cell, tune):
    """Stage 2 (projector and LM) and LoRA, the tower trained too (under LoRA a copy saved with the adapter): the
    gradient of an image record reaches the projector, the tower and the LM's weights or adapters."""
    folder = built[cell]["folder"]
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    model = prepare_for_training(model.train(), tune, freeze_vision_tower=False, lora_r=4, lora_alpha=8)
    if tune == "lora":  # LoRA's B starts at zero; make the adapters non-trivial
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(std=0.02)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "A red square."
    inputs = processor(images=[Image.new("RGB", (40, 30), (200, 40, 40))], text=prompt, return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    model(**inputs, labels=labels).loss.backward()
    reached = {name for name, param in model.named_parameters() if param.grad is not None and param.grad.any()}
    assert any("projector" in name for name in reached)
    assert any("vision_tower" in name for name in reached)
    language = [name for name in reached if "language_model" in name]
    assert language and all(("lora_" in name) == (tune == "lora") for name in language)


def test_missing_experts_are_refused_leaving_nothing_behind(parts, tmp_path):
    """A fused tensor whose parts do not make the config's shape (an expert missing) stops the build."""
    folder = tmp_path / "three_of_four_experts"
    folder.mkdir()
    for path in parts["qwen3_moe"].iterdir():
        if path.suffix == ".safetensors":
            tensors = {name: t for name, t in load_file(path).items() if ".experts.3." not in name}
            save_file(tensors, folder / path.name, metadata={"format": "pt"})
        else:
            (folder / path.name).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"experts\.down_proj, made from 3 tensor\(s\).*needs \[4, 64, 32\]"):
        build_checkpoint(parts[ONE_TOWER], folder, tmp_path / "out", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["three_of_four_experts"]
