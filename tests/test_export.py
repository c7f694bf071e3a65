"""`dense-connector export`: a converted checkpoint as a stock transformers Llava / LLaVA-NeXT folder (loaded where the
package is hidden, without trust_remote_code, it gives our logits and the original's greedy ids on every reference
fixture), refusals of what no stock LLaVA computes, and the GGUF mmproj llama.cpp reads.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file
from tiny import FIXTURE_NAMES, FIXTURES, run_without_package

from dense_connector.conversion import convert_checkpoint
from dense_connector.export import export_gguf, export_llava
from dense_connector.export.folding import REFERENCE_COSTS


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`converted(name)`: reference fixture `name` converted with `dense-connector convert`'s API, once per module."""
    root = tmp_path_factory.mktemp("converted")
    folders = {}

    def get(name: str) -> Path:
        if name not in folders:
            fixture = FIXTURES / name
            folders[name] = convert_checkpoint(
                fixture / "original", root / name, vision_tower=fixture / "vision_tower", progress=False
            )
        return folders[name]

    return get


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dense_connector.cli", *args], capture_output=True, text=True, timeout=600
    )


STOCK_PARITY = """
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

for name, (stock, ours) in {folders}.items():
    fixture = Path({fixtures!r}) / name
    meta = json.loads((fixture / "meta.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(stock).eval()
    processor = AutoProcessor.from_pretrained(stock)
    assert type(model).__module__.startswith("transformers.models.llava"), type(model).__module__
    images = [Image.open(fixture / f"image{{i}}.png").convert("RGB") for i in range(meta["num_images"])]
    inputs = processor(images=images, text=meta["prompt"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[:, -32:, :1000]
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    output = {{"logits": logits, "new_ids": generated[:, inputs["input_ids"].shape[1] :], "classes": [
        type(model).__name__, type(processor).__name__]}}
    ours_model = AutoModelForImageTextToText.from_pretrained(ours, trust_remote_code=True).eval()
    ours_processor = AutoProcessor.from_pretrained(ours, trust_remote_code=True)
    ours_inputs = ours_processor(images=images, text=meta["prompt"], return_tensors="pt")
    with torch.no_grad():
        output["ours"] = ours_model(**ours_inputs).logits[:, -32:, :1000]
    output["same_ids"] = ours_inputs["input_ids"].tolist() == inputs["input_ids"].tolist()
    torch.save(output, f"{{name}}.pt")
"""


def test_exported_folders_run_as_stock_llava_with_our_logits_and_the_originals_ids(converted, tmp_path, subtests):
    """The acceptance test: every fixture exported (clip_dci through the command line), loaded by plain transformers
    in a process where the package is hidden and remote code is off: logits within 1e-4 of ours, the original's ids."""
    folders = {}
    for name in FIXTURE_NAMES:
        stock = tmp_path / f"{name}-llava"
        if name == "clip_dci":
            result = run_cli("export", "--model", str(converted(name)), "--to", "llava", "--output", str(stock))
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == str(stock)
        else:
            export_llava(converted(name), stock, progress=False)
        folders[name] = (str(stock), str(converted(name)))
        assert not list(stock.glob("*.py"))
        assert "auto_map" not in (stock / "config.json").read_text()
        for file in ("processor_config.json", "tokenizer_config.json"):
            assert "auto_map" not in (stock / file).read_text() and "DenseConnector" not in (stock / file).read_text()
    run_without_package(STOCK_PARITY.format(folders=folders, fixtures=str(FIXTURES)), tmp_path, timeout=600)
    for name in FIXTURE_NAMES:
        with subtests.test(fixture=name):
            golden = load_file(FIXTURES / name / "golden.safetensors")
            output = torch.load(tmp_path / f"{name}.pt")
            anyres = name.endswith("anyres")
            assert output["classes"] == (
                ["LlavaNextForConditionalGeneration", "LlavaNextProcessor"]
                if anyres
                else ["LlavaForConditionalGeneration", "LlavaProcessor"]
            )
            assert output["same_ids"]
            torch.testing.assert_close(output["logits"], output["ours"], atol=1e-4, rtol=0)
            torch.testing.assert_close(output["logits"], golden["logits_last32"], atol=1e-4, rtol=0)
            assert output["new_ids"][0].tolist() == golden["generated_ids"][0, 1:].tolist()


def test_folded_projector_sums_the_blocks_of_each_hidden_state(converted, tmp_path):
    """DCI on a 24-layer tower: hs[0..11] and hs[12..23] averaged, F = hs[23]; the folded weight's block of layer 23
    is F's block plus the second group's block / 12, computed in float64."""
    stock = export_llava(converted("clip_dci"), tmp_path / "stock", progress=False)
    config = json.loads((stock / "config.json").read_text())
    assert config["vision_feature_layer"] == list(range(24))
    ours = load_file(converted("clip_dci") / "model.safetensors")["model.connector.projector.0.weight"].double()
    folded = load_file(stock / "model.safetensors")["model.multi_modal_projector.linear_1.weight"].double()
    c = 32
    final, first, second = ours[:, :c], ours[:, c : 2 * c], ours[:, 2 * c :]
    torch.testing.assert_close(folded[:, :c], first / 12, atol=1e-7, rtol=0)
    torch.testing.assert_close(folded[:, 23 * c :], final + second / 12, atol=1e-7, rtol=0)
    card = (stock / "README.md").read_text()
    assert f"{REFERENCE_COSTS.params_before:,} -> {REFERENCE_COSTS.params_after:,} parameters" in card
    assert "from 96 to 768 inputs" in card


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"dense_connector_type": "sti", "dense_connector_layers": [7, 15], "dense_connector_groups": None}, "STI"),
        ({"image_downsample_factor": 2}, "Efficient Dense Connector"),
        ({"image_grid_pinpoints": [[56, 56], [56, 112]]}, "AnyRes"),
        ({"vision_prefix_tokens": 5}, "5 non-patch tokens"),  # DINOv2 with registers
    ],
)
@pytest.mark.parametrize("target", ["llava", "gguf"])
def test_what_no_stock_llava_computes_is_refused_in_one_line_with_nothing_written(
    converted, tmp_path, change, reason, target
):
    model = tmp_path / "model"
    shutil.copytree(converted("clip_dci"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    output = tmp_path / "out" / "stock"
    result = run_cli("export", "--model", str(model), "--to", target, "--output", str(output))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and reason in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_gguf_mmproj_holds_the_tower_feature_layers_and_the_folded_projector(converted, tmp_path):
    """The mmproj llama.cpp's CLIP reads: LLaVA `mlp` projector, the ascending feature layers, the cut tower without
    its final layer norm, the folded weight (as in the stock folder), the original's normalisation; and the language
    model as a transformers folder (llama.cpp's converter turns it into the text GGUF)."""
    output = export_gguf(converted("clip_dci"), tmp_path / "gguf", outtype="f32", progress=False)
    reader = gguf.GGUFReader(output / "mmproj-model-f32.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "clip" and fields["clip.projector_type"] == "mlp"
    assert fields["clip.vision.feature_layer"] == list(range(24))
    assert fields["clip.vision.block_count"] == 23 and fields["clip.use_gelu"] is False
    assert fields["clip.vision.image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert not any("post_ln" in name for name in tensors)
    assert {f"v.blk.{i}.attn_q.weight" for i in range(23)} <= set(tensors)
    stock = export_llava(converted("clip_dci"), tmp_path / "stock", progress=False)
    folded = load_file(stock / "model.safetensors")["model.multi_modal_projector.linear_1.weight"]
    mmproj = torch.from_numpy(tensors["mm.0.weight"].data.copy()).reshape(folded.shape)
    torch.testing.assert_close(mmproj, folded, atol=0, rtol=0)
    lm = json.loads((output / "language-model" / "config.json").read_text())
    assert lm["architectures"] == ["LlamaForCausalLM"] and (output / "language-model" / "tokenizer.json").is_file()
    tokenizer_config = (output / "language-model" / "tokenizer_config.json").read_text()
    assert "auto_map" not in tokenizer_config and "DenseConnector" not in tokenizer_config
    assert "ASSISTANT:" in (output / "language-model" / "chat_template.jinja").read_text()
