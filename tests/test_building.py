"""Building new Dense Connector models from a vision tower and a causal LM laid out as on the Hub (tests/hub_parts.py):
the folder holds the parts' weights bit for bit and a freshly initialised projector, has everything a converted
folder has, loads as remote code through `pipeline`, and bad parts or options are refused leaving nothing behind.
"""

import fnmatch
import json
import shutil
import subprocess
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hub_parts import (
    LLAMA_3_PAD,
    TOWER_LAYERS,
    clip_model_repo,
    clip_vision_repo,
    llama_3_repo,
    qwen2_repo,
    siglip_model_repo,
    siglip_vision_repo,
    vicuna_repo,
)
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import load_file
from tiny import REPO, run_without_package
from transformers import AutoModelForImageTextToText, AutoProcessor

from dense_connector import DenseConnectorConfig, DenseConnectorForConditionalGeneration, DenseConnectorProcessor, cli
from dense_connector.building import BuildError, build_checkpoint, builder
from dense_connector.connector_dense_connector import DenseConnector
from dense_connector.writing import sources, tensors


CODE_FILES = ("configuration", "connector", "modeling", "processing")
# name -> (tower, language model, version)
BUILDS = {
    "clip_vicuna": ("clip_model", "vicuna", "v1"),
    "siglip_llama_3": ("siglip_model", "llama_3", "llama_3"),
    "vision_qwen2": ("clip_vision", "qwen2", "native"),
    "siglip_vision_vicuna": ("siglip_vision", "vicuna", "v1"),
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    makers = {
        "clip_model": clip_model_repo,
        "siglip_model": siglip_model_repo,
        "clip_vision": clip_vision_repo,
        "siglip_vision": siglip_vision_repo,
        "vicuna": vicuna_repo,
        "llama_3": llama_3_repo,
        "qwen2": qwen2_repo,
    }
    return {name: make(root / name) for name, make in makers.items()}


@pytest.fixture(scope="module")
def built(parts, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("built")
    return {
        name: build_checkpoint(parts[tower], parts[lm], root / name, version=version, progress=False)
        for name, (tower, lm, version) in BUILDS.items()
    }


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if path.name.startswith(".") or "partial" in path.name)


# ----------------------------------------------------------------------------------------------------------------
# The parts' weights, the fresh projector, the vocabulary
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDS)
def test_tower_weights_are_the_vision_model_up_to_the_deepest_layer_read(built, parts, name):
    tower = weights_of(parts[BUILDS[name][0]])
    ours = weights_of(built[name])
    layers_kept = config_of(built[name])["vision_config"]["num_hidden_layers"]
    # CLIP's final feature is hs[-2]: its last layer never runs. SigLIP's is the last of the layers the original keeps
    # (it cuts the repository's last one): TOWER_LAYERS of its TOWER_LAYERS + 1.
    assert layers_kept == (TOWER_LAYERS if name.startswith("siglip") else TOWER_LAYERS - 1)
    kept = 0
    for source_name, tensor in tower.items():
        vision_name = source_name.removeprefix("vision_model.")
        name_in_model = "model.vision_tower." + vision_name
        layer = vision_name.split(".")[2] if vision_name.startswith("encoder.layers.") else None
        text_half = source_name.startswith(("text_model.", "visual_projection", "text_projection", "logit_"))
        if text_half or vision_name.startswith("head.") or (layer is not None and int(layer) >= layers_kept):
            assert name_in_model not in ours, f"{source_name} should be left out"
            continue
        assert torch.equal(ours[name_in_model], tensor), source_name
        kept += 1
    assert kept == sum(name.startswith("model.vision_tower.") for name in ours)


def test_siglip_runs_as_the_original_runs_it_without_its_last_layer_and_head(built, parts):
    config = config_of(built["siglip_llama_3"])
    assert config["vision_config"]["vision_use_head"] is False
    # The final feature is the last state of the 6 layers run (hs[-1] of the cut tower), all patches (no CLS).
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (6, "full")
    assert config["dense_connector_groups"] == [[0, 1, 2], [3, 4, 5]]  # 7 layers in the repository, 6 run
    assert not any(".head." in name or ".layers.6." in name for name in weights_of(built["siglip_llama_3"]))
    assert "pooling head" in (built["siglip_llama_3"] / "README.md").read_text()


@pytest.mark.parametrize("name", BUILDS)
def test_language_model_weights_and_original_vocabulary_rows_are_kept_bit_for_bit(built, parts, name):
    lm, ours = weights_of(parts[BUILDS[name][1]]), weights_of(built[name])
    config = config_of(built[name])
    rows = json.loads((parts[BUILDS[name][1]] / "config.json").read_text())["vocab_size"]
    assert config["text_config"]["vocab_size"] % 64 == 0 and config["text_config"]["vocab_size"] >= rows + 2
    for source_name, tensor in lm.items():
        name_in_model = source_name if source_name == "lm_head.weight" else "model.language_model." + source_name[6:]
        if name_in_model.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(ours[name_in_model][:rows], tensor), source_name
            new_rows = ours[name_in_model][rows:]
            torch.testing.assert_close(new_rows, tensor.mean(0, keepdim=True).expand_as(new_rows))
        else:
            assert torch.equal(ours[name_in_model], tensor), source_name
    tied = name == "vision_qwen2"
    assert config["tie_word_embeddings"] is tied and ("lm_head.weight" in ours) is not tied


@pytest.mark.parametrize("name", BUILDS)
def test_projector_is_initialised_as_the_original_creates_it(built, name):
    config = DenseConnectorConfig.from_pretrained(built[name])
    torch.manual_seed(0)
    expected = DenseConnector(config).projector.state_dict()
    ours = {key.removeprefix("model.connector.projector."): value for key, value in weights_of(built[name]).items()}
    assert (
        sorted(expected)
        == sorted(key for key in ours if key in expected)
        == ["0.bias", "0.weight", "2.bias", "2.weight"]
    )
    for key, tensor in expected.items():
        assert torch.equal(ours[key], tensor), key
    assert "seed 0" in (built[name] / "README.md").read_text()


@pytest.mark.parametrize(
    ("name", "pad", "image_id"),
    [("clip_vicuna", "<unk>", 1000), ("siglip_llama_3", LLAMA_3_PAD, 401), ("vision_qwen2", "<|endoftext|>", 300)],
)
def test_tokenizer_gets_the_placeholders_and_the_original_pad_token(built, name, pad, image_id):
    processor = AutoProcessor.from_pretrained(built[name])
    tokenizer, config = processor.tokenizer, config_of(built[name])
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [image_id, image_id + 1]
    assert (config["image_token_id"], config["video_token_id"]) == (image_id, image_id + 1)
    assert tokenizer.pad_token == pad and config["text_config"]["pad_token_id"] == tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"


# ----------------------------------------------------------------------------------------------------------------
# The folder: remote code, auto_map, processor, chat template, model card; pipeline in a fresh process
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDS)
def test_folder_is_complete_like_a_converted_one(built, name):
    folder = built[name]
    config = config_of(folder)
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dense_connector.DenseConnectorConfig",
        "AutoModel": "modeling_dense_connector.DenseConnectorModel",
        "AutoModelForImageTextToText": "modeling_dense_connector.DenseConnectorForConditionalGeneration",
    }
    for code in CODE_FILES:
        shipped = (folder / f"{code}_dense_connector.py").read_text()
        assert shipped == (REPO / "dense_connector" / f"{code}_dense_connector.py").read_text()
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["image_processor"]["do_pad"] is True
    card = (folder / "README.md").read_text()
    assert "## How it was built" in card and "forward pass on a built-in image" in card


def test_chat_templates_follow_the_version(built):
    image_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    rendered = {}
    for name in BUILDS:
        processor = AutoProcessor.from_pretrained(built[name])
        rendered[name] = processor.apply_chat_template(image_turn, add_generation_prompt=True, tokenize=False)
    assert rendered["clip_vicuna"].startswith("<s>A chat between") and rendered["clip_vicuna"].endswith(
        "USER: <image>\nWhat is it? ASSISTANT:"
    )
    assert rendered["siglip_llama_3"].startswith("<|begin_of_text|><|begin_of_text|><|start_header_id|>system")
    # `native`: the LM's own template (no BOS: Qwen2 has none), the image placeholder first in its message.
    assert rendered["vision_qwen2"] == "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    for name in ("clip_vicuna", "siglip_llama_3"):
        assert "{%- generation -%}" in (built[name] / "chat_template.jinja").read_text()


def test_generation_stops_where_the_version_stops(built):
    configs = {name: json.loads((built[name] / "generation_config.json").read_text()) for name in BUILDS}
    assert configs["clip_vicuna"]["eos_token_id"] == 2
    tokenizer = AutoProcessor.from_pretrained(built["siglip_llama_3"]).tokenizer
    assert configs["siglip_llama_3"]["eos_token_id"] == tokenizer.convert_tokens_to_ids(
        ["<|eot_id|>", "<|end_of_text|>"]
    )
    qwen = AutoProcessor.from_pretrained(built["vision_qwen2"]).tokenizer
    assert configs["vision_qwen2"]["eos_token_id"] == qwen.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


PIPELINE = """
import json
import torch
from PIL import Image
from transformers import AutoModel, pipeline

answers = {{}}
for name, folder in {folders}.items():
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    assert "transformers_modules" in type(pipe.model).__module__, type(pipe.model).__module__
    assert "transformers_modules" in type(pipe.processor).__module__, type(pipe.processor).__module__
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    content = [{{"type": "image", "image": image}}, {{"type": "text", "text": "What is it?"}}]
    messages = [{{"role": "user", "content": content}}]
    out = pipe(text=messages, max_new_tokens=4, return_tensors=True)[0]["generated_token_ids"]
    answers[name] = out.tolist() if torch.is_tensor(out) else list(out)
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "DenseConnectorModel"
# Building is package code: the remote code does not carry it.
assert not hasattr(type(pipe.model), "from_vision_text_pretrained")
open("answers.json", "w").write(json.dumps(answers))
"""


def test_built_folders_run_as_remote_code_through_pipeline(built, tmp_path):
    folders = {name: str(folder) for name, folder in built.items()}
    run_without_package(PIPELINE.format(folders=folders), tmp_path)
    remote = json.loads((tmp_path / "answers.json").read_text())
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    for name, folder in built.items():
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        processor = AutoProcessor.from_pretrained(folder)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert remote[name] == generated[0].tolist(), name


# ----------------------------------------------------------------------------------------------------------------
# Python API, connector options
# ----------------------------------------------------------------------------------------------------------------


def test_from_vision_text_pretrained_gives_the_built_model_and_processor_in_memory(built, parts):
    model = DenseConnectorForConditionalGeneration.from_vision_text_pretrained(
        parts["clip_model"], parts["vicuna"], version="v1"
    )
    assert not model.training and model.generation_config.eos_token_id == 2
    ours, written = model.state_dict(), weights_of(built["clip_vicuna"])
    assert sorted(ours) == sorted(written)
    assert all(torch.equal(ours[name], written[name]) for name in written)

    processor = DenseConnectorProcessor.from_vision_text_pretrained(parts["clip_model"], parts["vicuna"], version="v1")
    saved = AutoProcessor.from_pretrained(built["clip_vicuna"])
    assert processor.chat_template == saved.chat_template
    text = "USER: What is it? ASSISTANT:"
    assert processor(text=text)["input_ids"] == saved(text=text)["input_ids"]

    other = DenseConnectorForConditionalGeneration.from_vision_text_pretrained(
        parts["clip_model"], parts["vicuna"], seed=1, projector_depth=1
    )
    assert other.config.projector_depth == 1 and len(other.model.connector.projector) == 1
    torch.manual_seed(1)
    expected = DenseConnector(other.config).projector[0].weight
    assert torch.equal(other.model.connector.projector[0].weight, expected)
    assert not torch.equal(expected, ours["model.connector.projector.0.weight"])  # another seed, another projector
    assert torch.equal(other.lm_head.weight, ours["lm_head.weight"])


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, {"dense_connector_type": "dci", "projector_depth": 2, "image_downsample_factor": 1}),
        (
            {"connector": "sti", "dense_connector_layers": [1, 3]},
            {"dense_connector_type": "sti", "dense_connector_layers": [1, 3]},
        ),
        (
            {"connector": "sci", "dense_connector_layers": [2]},
            {"dense_connector_type": "sci", "dense_connector_layers": [2]},
        ),
        ({"dense_connector_groups": [[0, 1], [2, 3, 4]]}, {"dense_connector_groups": [[0, 1], [2, 3, 4]]}),
        ({"connector": "none"}, {"dense_connector_type": "none"}),
        ({"projector_depth": 1}, {"projector_depth": 1}),
        ({"image_downsample_factor": 2}, {"image_downsample_factor": 2}),  # Efficient Dense Connector
        ({"vision_feature_layer": -3}, {"vision_feature_layer": 4}),  # hs[-3] of 6 layers, then 4 layers run
    ],
)
def test_connector_options_are_build_options(parts, options, expected):
    build = builder.prepare_build(
        parts["clip_model"], parts["vicuna"], "v1", None, builder.ConnectorOptions(**options)
    )
    config = build.config.to_dict()
    for key, value in expected.items():
        assert config[key] == value, key
    assert build.processor.dense_connector_type == build.config.dense_connector_type
    assert build.processor.image_downsample_factor == build.config.image_downsample_factor
    tokens = {"dci": 64, "sci": 64, "none": 64, "sti": 64 + 16}[build.config.dense_connector_type]
    assert build.config.num_image_tokens() == tokens // build.config.image_downsample_factor**2


# ----------------------------------------------------------------------------------------------------------------
# Command line, bad input, streaming
# ----------------------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dense_connector.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_build_command_writes_the_ablation_it_is_given(parts, tmp_path):
    output = tmp_path / "efficient"
    common = ["build", "--vision-tower", str(parts["clip_vision"]), "--language-model", str(parts["vicuna"])]
    result = run_cli(
        *common,
        "--connector", "dci", "--version", "v1", "--output", str(output), "--dense-connector-groups", "0-1", "2,3,4",
        "--image-downsample-factor", "2", "--projector-depth", "1", "--dtype", "bfloat16", "--seed", "3",
        "--max-shard-size", "100KB", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(output)
    config = config_of(output)
    assert (config["dense_connector_groups"], config["image_downsample_factor"]) == ([[0, 1], [2, 3, 4]], 2)
    assert config["projector_depth"] == 1 and config["dtype"] == "bfloat16"
    assert (
        len(list(output.glob("model-*-of-*.safetensors"))) > 1 and (output / "model.safetensors.index.json").is_file()
    )
    assert all(tensor.dtype == torch.bfloat16 for tensor in weights_of(output).values())
    assert "seed 3" in (output / "README.md").read_text()


def test_build_command_refuses_in_one_line(parts, tmp_path, capsys):
    argv = ["build", "--vision-tower", str(parts["clip_vision"]), "--language-model", str(parts["vicuna"])]
    assert cli.main([*argv, "--output", str(tmp_path / "l3"), "--version", "llama_3"]) == 1
    error = capsys.readouterr().err
    assert f"error: The tokenizer of {parts['vicuna']} has no {LLAMA_3_PAD} token, which the llama_3" in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "l3").exists() and leftovers(tmp_path) == []


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def copy_part(part: Path, folder: Path) -> Path:
    return Path(shutil.copytree(part, folder))


def without_tokenizer(parts: dict[str, Path], folder: Path) -> Path:
    folder = copy_part(parts["vicuna"], folder)
    for path in folder.glob("tokenizer*"):
        path.unlink()
    return folder


BAD_INPUTS = {
    "not a causal LM": (
        lambda p, t: edit_config(copy_part(p["vicuna"], t), model_type="bert", architectures=["BertModel"]),
        {},
        "needs a causal language model",
    ),
    "remote-code LM": (
        lambda p, t: edit_config(copy_part(p["vicuna"], t), auto_map={"AutoModelForCausalLM": "m.M"}),
        {},
        "needs remote code",
    ),
    "quantised LM": (
        lambda p, t: edit_config(copy_part(p["vicuna"], t), quantization_config={"quant_method": "bitsandbytes"}),
        {},
        "is quantized",
    ),
    "no tokenizer": (without_tokenizer, {}, "has no tokenizer"),
    "unknown version": (lambda p, t: p["vicuna"], {"version": "v2"}, "version='v2' is not one of"),
    "stage-1 format": (lambda p, t: p["vicuna"], {"version": "plain"}, "the format of stage-1 training"),
    "native without a template": (lambda p, t: p["vicuna"], {"version": "native"}, "has no chat template"),
    "unknown option": (lambda p, t: p["vicuna"], {"projector_type": "mlp"}, "Unknown build option"),
    "layer outside the tower": (
        lambda p, t: p["vicuna"],
        {"connector": "sti", "dense_connector_layers": [9]},
        "connector options do not fit",
    ),
    "unknown dtype": (lambda p, t: p["vicuna"], {"dtype": "int8"}, "dtype='int8' is not one of"),
}


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_bad_parts_and_options_are_refused_leaving_nothing_behind(parts, tmp_path, problem):
    make_lm, options, message = BAD_INPUTS[problem]
    language_model = make_lm(parts, tmp_path / "lm")
    output = tmp_path / "out" / "model"
    with pytest.raises(BuildError, match=message):
        build_checkpoint(parts["clip_model"], language_model, output, progress=False, **options)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_a_text_tower_is_refused(parts, tmp_path):
    with pytest.raises(BuildError, match="is not a vision encoder.*supports patch-token ViT encoders: CLIP"):
        build_checkpoint(parts["vicuna"], parts["vicuna"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_weights_stream_one_tensor_at_a_time(parts, tmp_path, monkeypatch):
    """The writer never holds the language model: at most one tensor read from the parts is alive at any time."""
    live, real_open = {"now": 0, "peak": 0}, tensors.open_tensors

    def released(nbytes: int) -> None:
        live["now"] -= nbytes

    @contextmanager
    def counting_open(path):
        with real_open(path) as get:

            def counted(name):
                tensor = get(name)
                live["now"] += tensor.nbytes
                live["peak"] = max(live["peak"], live["now"])
                weakref.finalize(tensor, released, tensor.nbytes)
                return tensor

            yield counted

    monkeypatch.setattr(tensors, "open_tensors", counting_open)
    monkeypatch.setattr(builder, "check_folder", lambda *args: ["not checked"])  # loading would hold it all
    output = build_checkpoint(
        parts["clip_model"], parts["vicuna"], tmp_path / "out", max_shard_size=50_000, progress=False
    )
    sizes = [tensor.nbytes for tensor in weights_of(parts["vicuna"]).values()]
    assert len(list(output.glob("model-*.safetensors"))) > 5
    assert live["peak"] <= max(sizes) < sum(sizes) / 3


def test_hub_ids_download_the_files_each_part_needs(parts, built, tmp_path, monkeypatch):
    hub = {"openai/clip-vit-large-patch14-336": parts["clip_model"], "lmsys/vicuna-7b-v1.5": parts["vicuna"]}

    def snapshot_download(repo_id, allow_patterns, **kwargs):
        snapshot = tmp_path / "hub" / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in hub[repo_id].iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copyfile(path, snapshot / path.name)
        return str(snapshot)

    monkeypatch.setattr(sources, "snapshot_download", snapshot_download)
    output = build_checkpoint(*hub, tmp_path / "out", progress=False)  # a Vicuna tokenizer: version v1
    written, local = weights_of(output), weights_of(built["clip_vicuna"])
    assert sorted(written) == sorted(local) and all(torch.equal(written[name], local[name]) for name in local)
    assert "`openai/clip-vit-large-patch14-336`" in (output / "README.md").read_text()
    downloaded = {
        repo: sorted(path.name for path in (tmp_path / "hub").glob(f"{repo}/*"))
        for repo in ("openai--clip-vit-large-patch14-336", "lmsys--vicuna-7b-v1.5")
    }
    assert "tokenizer.model" in downloaded["lmsys--vicuna-7b-v1.5"]
    assert "preprocessor_config.json" in downloaded["openai--clip-vit-large-patch14-336"]


def test_native_keeps_the_language_models_own_bos_once(parts, tmp_path):
    """Llama-3-Instruct's own template writes the BOS itself: the processor must not add a second one."""
    folder = copy_part(parts["llama_3"], tmp_path / "llama_3_instruct")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = (
        "{{- bos_token -}}{%- for message in messages -%}{{- '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    processor = builder.prepare_build(
        parts["clip_vision"], folder, "native", None, builder.ConnectorOptions()
    ).processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?")
    ids = processor(images=[Image.new("RGB", (32, 32))], text=prompt)["input_ids"][0]
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos


def test_push_to_hub_uploads_the_built_folder(parts, tmp_path, monkeypatch, capsys):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, commit_message, **kwargs):
        calls["upload_folder"] = (repo_id, sorted(path.name for path in Path(folder_path).iterdir()), commit_message)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    output = tmp_path / "out"
    argv = ["build", "--vision-tower", str(parts["clip_vision"]), "--language-model", str(parts["qwen2"])]
    argv += ["--output", str(output), "--push-to-hub", "someone/dc-qwen2", "--private", "--no-progress"]
    assert cli.main(argv) == 0
    assert calls["create_repo"] == ("someone/dc-qwen2", {"private": True, "exist_ok": True})
    repo_id, files, message = calls["upload_folder"]
    assert repo_id == "someone/dc-qwen2" and files == sorted(path.name for path in output.iterdir())
    assert "config.json" in files and message.startswith("Dense Connector built from")
    assert capsys.readouterr().out.strip() == str(output)


@pytest.mark.parametrize(
    ("lm_config", "tied"),
    [
        ({"model_type": "llama"}, False),
        ({"model_type": "gemma"}, True),
        ({"model_type": "llama", "tie_word_embeddings": True}, True),
    ],
)
def test_tied_embeddings_follow_the_language_models_config_or_its_class_default(lm_config, tied):
    assert builder.tied_embeddings(lm_config) is tied
