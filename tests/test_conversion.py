"""Conversion of original Dense Connector checkpoints: parity with the original's recorded outputs, and refusals.

The acceptance test converts every fixture in `../shared/fixtures/original/` and checks, in a Python where the
package cannot be imported (remote code only), that the converted folder reproduces the original's pixel values,
last-32 logits and greedy ids.
"""

import fnmatch
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import FIXTURE_NAMES, FIXTURES, REPO, run_without_package
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from dense_connector import DenseConnectorForConditionalGeneration, DenseConnectorProcessor
from dense_connector.chat_templates import CHAT_TEMPLATES
from dense_connector.conversion import (
    CheckpointError,
    build_parser,
    convert_checkpoint,
    convert_tokenizer,
    main,
    translate_config,
)
from dense_connector.conversion import convert as steps
from dense_connector.writing import sources
from dense_connector.writing import tensors as weights
from dense_connector.writing.folder import build_generation_config
from dense_connector.writing.tensors import TensorEntry, TensorPlan, plan_tensors, write_weights
from dense_connector.writing.tokenizer import default_conv_mode
from dense_connector.writing.verify import collapse_placeholders


def convert(name: str, output: Path, **kwargs) -> Path:
    """Convert fixture `name` with its own vision tower folder."""
    kwargs.setdefault("vision_tower", FIXTURES / name / "vision_tower")
    return convert_checkpoint(FIXTURES / name / "original", output, progress=False, **kwargs)


def original_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "original" / "config.json").read_text())


def tower_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "vision_tower" / "config.json").read_text())


def original_tensors(name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((FIXTURES / name / "original").iterdir()):
        if path.suffix == ".safetensors":
            tensors.update(load_file(path))
        elif path.suffix == ".bin":
            tensors.update(torch.load(path, weights_only=True))
    return tensors


def write_original(folder: Path, name: str, tensors: dict[str, torch.Tensor], config: dict, legacy_bin=False) -> Path:
    """An original-layout checkpoint in `folder`: fixture `name`'s tokenizer files, `config`, one weights file."""
    folder.mkdir(parents=True)
    for file in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(FIXTURES / name / "original" / file, folder / file)
    (folder / "config.json").write_text(json.dumps(config))
    if legacy_bin:  # the pre-zip torch format, which cannot be memory-mapped
        torch.save(tensors, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    else:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def leftovers(folder: Path) -> list[str]:
    """Hidden or partial entries a conversion may have left in `folder`."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(".") or "partial" in path.name)


# ----------------------------------------------------------------------------------------------------------------
# Parity with the original implementation (acceptance test)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`converted(name)`: fixture `name` converted (once per module and worker); clip_dci also with
    --verify-against."""
    root = tmp_path_factory.mktemp("converted")
    folders = {}

    def get(name: str) -> Path:
        if name not in folders:
            verify = FIXTURES / name if name == "clip_dci" else None
            folders[name] = convert(name, root / name, verify_against=verify)
        return folders[name]

    return get


REMOTE_PARITY = """
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

for name, folder in {folders}.items():
    fixture = Path({fixtures!r}) / name
    meta = json.loads((fixture / "meta.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    images = [Image.open(fixture / f"image{{i}}.png").convert("RGB") for i in range(meta["num_images"])]
    inputs = processor(images=images, text=meta["prompt"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[:, -32:, :1000]
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    torch.save(
        {{
            "input_ids": inputs["input_ids"],
            "pixel_values": inputs["pixel_values"],
            "logits": logits,
            "new_ids": generated[:, inputs["input_ids"].shape[1] :],
            "image_token_id": model.config.image_token_id,
        }},
        f"{{name}}.pt",
    )
"""


def test_converted_checkpoints_reproduce_the_original_as_remote_code(converted, tmp_path, subtests):
    """The acceptance test: every fixture, converted, loaded with the Auto classes where the package is hidden."""
    folders = {name: str(converted(name)) for name in FIXTURE_NAMES}
    run_without_package(REMOTE_PARITY.format(folders=folders, fixtures=str(FIXTURES)), tmp_path, timeout=600)
    for name in FIXTURE_NAMES:
        with subtests.test(fixture=name):
            golden = load_file(FIXTURES / name / "golden.safetensors")
            output = torch.load(tmp_path / f"{name}.pt")
            ids = collapse_placeholders(output["input_ids"][0].tolist(), output["image_token_id"])
            assert ids == golden["input_ids_original"][0].tolist()
            torch.testing.assert_close(output["pixel_values"], golden["pixel_values"], atol=1e-5, rtol=0)
            torch.testing.assert_close(output["logits"], golden["logits_last32"], atol=1e-4, rtol=0)
            assert output["new_ids"][0].tolist() == golden["generated_ids"][0, 1:].tolist()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_merged_embeddings_match_the_original(converted, name, attention):
    """The features that replace the placeholders, spliced into the text embeddings, are the original's merged
    `inputs_embeds` within the fixtures' 1e-4 (never bit for bit: other CPUs take other kernels)."""
    folder = converted(name)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attention).eval()
    processor = AutoProcessor.from_pretrained(folder)
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    images = [Image.open(FIXTURES / name / f"image{i}.png").convert("RGB") for i in range(meta["num_images"])]
    inputs = processor(images=images, text=meta["prompt"], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], image_sizes=inputs.get("image_sizes"))
        embeds = model.model._scatter_features(
            inputs["input_ids"],
            model.get_input_embeddings()(inputs["input_ids"]),
            features.pooler_output,
            model.config.image_token_id,
            "image",
        )
    golden = load_file(FIXTURES / name / "golden.safetensors")["inputs_embeds"]
    torch.testing.assert_close(embeds, golden, atol=1e-4, rtol=0)


def test_fixtures_cover_sharded_bin_and_safetensors_checkpoints():
    assert list((FIXTURES / "clip_dci" / "original").glob("pytorch_model-*.bin"))
    assert list((FIXTURES / "clip_sci" / "original").glob("model-*.safetensors"))


def test_verify_against_result_is_recorded_in_the_model_card(converted):
    card = (converted("clip_dci") / "README.md").read_text()
    assert "Converted from the original Dense Connector checkpoint" in card
    assert str(FIXTURES / "clip_dci" / "original") in card
    assert "clip_dci: input ids identical" in card and "greedy ids identical" in card


def test_vocabulary_gets_placeholders_and_mean_rows(converted):
    folder = converted("clip_dci")
    config = json.loads((folder / "config.json").read_text())
    assert (config["image_token_id"], config["video_token_id"]) == (1000, 1001)
    assert config["text_config"]["vocab_size"] == 1024  # 1002 tokens padded to a multiple of 64
    weights = load_file(folder / "model.safetensors")
    originals = original_tensors("clip_dci")
    for name, original_name in (("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),) + (
        ("lm_head.weight", "lm_head.weight"),
    ):
        rows = weights[name]
        assert rows.shape == (1024, 64)
        torch.testing.assert_close(rows[:1000], originals[original_name], rtol=0, atol=0)
        torch.testing.assert_close(rows[1000:], originals[original_name].mean(0).expand(24, -1))
    processor = DenseConnectorProcessor.from_pretrained(folder)
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [1000, 1001]
    assert processor.tokenizer.padding_side == "left" and processor.tokenizer.pad_token == "<unk>"


def test_chat_template_and_generation_config_follow_the_conversation_format(converted):
    processor = DenseConnectorProcessor.from_pretrained(converted("clip_dci"))
    for example in json.loads((FIXTURES / "chat_prompts.json").read_text()):
        if example["conv_mode"] != "vicuna_v1":
            continue
        messages = []
        for turn in example["turns"]:
            messages.append({"role": "user", "content": turn["user"]})
            if turn["assistant"] is not None:
                messages.append({"role": "assistant", "content": turn["assistant"]})
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == "<s>" + example["prompt"]  # the template writes BOS, as the original's ids start with it
    generation = json.loads((converted("clip_dci") / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 0)


def test_tower_layers_that_never_run_are_not_stored(converted):
    for name, layers in (("clip_dci", 23), ("siglip_dci", 26)):
        with safe_open(converted(name) / "model.safetensors", "pt") as f:
            stored = {int(key.split(".")[4]) for key in f.keys() if key.startswith("model.vision_tower.encoder.")}
        assert stored == set(range(layers)), name


# ----------------------------------------------------------------------------------------------------------------
# Other checkpoints: plain LLaVA-1.5, tower weights from the tower repository, Llama-3 tokenizer
# ----------------------------------------------------------------------------------------------------------------


def full_clip_tower(folder: Path) -> Path:
    """A tower folder laid out like the Hub's `openai/clip-vit-large-patch14-336` (a full CLIPModel)."""
    folder.mkdir()
    vision = {key: value for key, value in tower_config("clip_dci").items() if key != "architectures"}
    config = {"model_type": "clip", "architectures": ["CLIPModel"], "vision_config": vision, "text_config": {}}
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(
        FIXTURES / "clip_dci" / "vision_tower" / "preprocessor_config.json", folder / "preprocessor_config.json"
    )
    tensors = load_file(FIXTURES / "clip_dci" / "vision_tower" / "model.safetensors")
    tensors.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 4), "logit_scale": torch.ones(())})
    tensors["visual_projection.weight"] = torch.zeros(4, 32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def plain_llava(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LLaVA-1.5 checkpoint (no mm_dense_connector_type, projector over C channels, no tower weights, old `.bin`
    format) converted with a full-CLIPModel tower folder."""
    root = tmp_path_factory.mktemp("plain_llava")
    tensors = {k: v for k, v in original_tensors("clip_dci").items() if not k.startswith("model.vision_tower.")}
    tensors["model.mm_projector.0.weight"] = tensors["model.mm_projector.0.weight"][:, :32].clone()
    config = original_config("clip_dci")
    del config["mm_dense_connector_type"]
    config["mm_hidden_size"] = 32
    original = write_original(root / "original", "clip_dci", tensors, config, legacy_bin=True)
    folder = convert_checkpoint(
        original, root / "converted", vision_tower=full_clip_tower(root / "tower"), progress=False
    )
    return folder, tensors


def test_plain_llava_checkpoint_converts_to_connector_none(plain_llava, converted):
    folder, tensors = plain_llava
    config = json.loads((folder / "config.json").read_text())
    assert config["dense_connector_type"] == "none"
    weights = load_file(folder / "model.safetensors")
    torch.testing.assert_close(weights["model.connector.projector.0.weight"], tensors["model.mm_projector.0.weight"])
    assert not any(name.startswith(("text_model", "logit_scale", "visual_projection")) for name in weights)
    tower = load_file(FIXTURES / "clip_dci" / "vision_tower" / "model.safetensors")
    torch.testing.assert_close(
        weights["model.vision_tower.pre_layrnorm.weight"], tower["vision_model.pre_layrnorm.weight"]
    )
    assert "Vision tower weights from: `" in (folder / "README.md").read_text()

    # LLaVA-1.5 projects the final feature alone: the DCI checkpoint's tower, then the F columns of its projector.
    plain = DenseConnectorForConditionalGeneration.from_pretrained(folder).eval()
    dci = DenseConnectorForConditionalGeneration.from_pretrained(converted("clip_dci")).eval()
    pixels = load_file(FIXTURES / "clip_dci" / "golden.safetensors")["pixel_values"]
    with torch.no_grad():
        features = dci.model.vision_tower(pixels, output_hidden_states=True).hidden_states[23][:, 1:]
        projector = dci.model.connector.projector
        hidden = torch.nn.functional.gelu(features @ projector[0].weight[:, :32].T + projector[0].bias)
        expected = projector[2](hidden)
        actual = plain.get_image_features(pixels).pooler_output[0]
    torch.testing.assert_close(actual, expected[0], atol=1e-5, rtol=1e-5)


def test_siglip_tower_from_a_hub_style_folder_drops_the_last_layer_and_head(tmp_path):
    """The Hub's SigLIP repository holds 27 layers, the pooling head and a text model; only 26 layers are used."""
    tensors = {k: v for k, v in original_tensors("siglip_dci").items() if not k.startswith("model.vision_tower.")}
    checkpoint = tmp_path / "model.safetensors"
    save_file(tensors, checkpoint)
    tower = load_file(FIXTURES / "siglip_dci" / "vision_tower" / "model.safetensors")
    extra = {k.replace("layers.25.", "layers.26."): v.clone() for k, v in tower.items() if ".layers.25." in k}
    extra.update(
        {"vision_model.head.probe": torch.zeros(1, 1, 32), "text_model.final_layer_norm.weight": torch.ones(4)}
    )
    tower_file = tmp_path / "tower.safetensors"
    save_file({**tower, **extra}, tower_file)

    nested = {"model_type": "siglip", "vision_config": tower_config("siglip_dci"), "text_config": {}}
    translation = translate_config(original_config("siglip_dci"), nested, 1024, 1000, 1001, 0)
    assert translation.config.vision_config.num_hidden_layers == 26
    with torch.device("meta"):
        expected = DenseConnectorForConditionalGeneration(translation.config).state_dict()
    plan = plan_tensors(
        [checkpoint],
        lambda: [tower_file],
        "google/siglip",
        {k: tuple(v.shape) for k, v in expected.items()},
        26,
        torch.float32,
    )
    assert plan.tower_from == "google/siglip"
    assert sorted(entry.name for entry in plan.entries) == sorted(expected)
    assert not any(entry.original_name.startswith(("vision_model.head", "text_model")) for entry in plan.entries)
    assert not any(".layers.26." in entry.original_name for entry in plan.entries)


def llama_3_tokenizer(folder: Path) -> Path:
    """A tiny tokenizer.json tokenizer with Llama-3's special tokens (and no tokenizer.model)."""
    folder.mkdir()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = {token: index for index, token in enumerate(specials + ["[UNK]", "hello", "world", "!"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_llama_3_tokenizer_gets_the_llama_3_format_and_stop_tokens(tmp_path):
    tokenizer = convert_tokenizer(llama_3_tokenizer(tmp_path / "tokenizer"), {})
    assert default_conv_mode(tokenizer) == "llama_3"
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [9, 10]
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    generation = build_generation_config(tokenizer, "llama_3")
    assert generation.eos_token_id == [4, 1]  # <|eot_id|>, then <|end_of_text|>
    assert "<|start_header_id|>system<|end_header_id|>" in CHAT_TEMPLATES["llama_3"]


# ----------------------------------------------------------------------------------------------------------------
# Streaming writer, dtype, overwrite, push to hub
# ----------------------------------------------------------------------------------------------------------------


def test_weights_stream_into_shards_with_an_index(tmp_path):
    source = tmp_path / "source.safetensors"
    tensors = {
        "a": torch.randn(40, 30),
        "b": torch.arange(12, dtype=torch.int64),
        "lm_head.weight": torch.randn(5, 8),
        "c": torch.randn(3, 7, 2),
    }
    save_file(tensors, source)
    shapes = {"lm_head.weight": (8, 8)}
    entries = [
        TensorEntry(
            source, name, name, shapes.get(name, tuple(t.shape)), torch.bfloat16 if t.is_floating_point() else t.dtype
        )
        for name, t in tensors.items()
    ]
    out = tmp_path / "out"
    out.mkdir()
    names = write_weights(TensorPlan(entries, {}, "checkpoint"), out, max_shard_bytes=220, progress=False)

    assert len(names) == 3 and names[0] == "model-00001-of-00003.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == sum(
        e.nbytes for e in entries
    )
    written = {}
    for name in names:
        written.update(load_file(out / name))
    torch.testing.assert_close(written["a"], tensors["a"].to(torch.bfloat16), rtol=0, atol=0)
    assert written["b"].dtype == torch.int64 and written["b"].tolist() == list(range(12))
    head = written["lm_head.weight"]
    torch.testing.assert_close(head[:5], tensors["lm_head.weight"].to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(
        head[5:].float(), tensors["lm_head.weight"].to(torch.bfloat16).float().mean(0).expand(3, -1), atol=1e-2, rtol=0
    )


HUB = {"HuanjinYao/DenseConnector-tiny": "original", "openai/clip-tiny": "vision_tower"}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> dict:
    """clip_sci converted from (fake, offline) Hub ids to bfloat16 over a non-empty folder (--overwrite), with the
    downloads and the Hub upload captured."""
    root = tmp_path_factory.mktemp("pushed")
    output = root / "output"
    output.mkdir()
    (output / "stale.txt").write_text("from an earlier conversion")
    uploaded = root / "uploaded"
    calls = {"downloads": []}

    def snapshot_download(repo_id, allow_patterns, **kwargs):
        calls["downloads"].append((repo_id, allow_patterns))
        snapshot = root / "hub" / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in (FIXTURES / "clip_sci" / HUB[repo_id]).iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copyfile(path, snapshot / path.name)
        return str(snapshot)

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = (repo_id, folder_path, kwargs)
        shutil.copytree(folder_path, uploaded)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "snapshot_download", snapshot_download)
        patch.setattr(HfApi, "create_repo", create_repo)
        patch.setattr(HfApi, "upload_folder", upload_folder)
        convert_checkpoint(
            "HuanjinYao/DenseConnector-tiny",
            output,
            vision_tower="openai/clip-tiny",
            dtype="bfloat16",
            overwrite=True,
            push_to_hub="someone/dense-connector-tiny",
            progress=False,
        )
    return {"output": output, "uploaded": uploaded, "calls": calls}


def test_hub_sources_download_only_what_is_needed(pushed):
    downloads = pushed["calls"]["downloads"]
    original = [patterns for repo, patterns in downloads if repo == "HuanjinYao/DenseConnector-tiny"]
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for patterns in original for p in patterns)
    assert any(fnmatch.fnmatch("model-00001-of-00003.safetensors", p) for patterns in original for p in patterns)
    # The checkpoint holds the tower weights: only the tower's configs are fetched.
    assert [patterns for repo, patterns in downloads if repo == "openai/clip-tiny"] == [["*.json"]]


def test_dtype_bfloat16_writes_bfloat16_weights(pushed):
    with safe_open(pushed["output"] / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((pushed["output"] / "config.json").read_text())["dtype"] == "bfloat16"


def test_overwrite_replaces_a_non_empty_output(pushed):
    assert not (pushed["output"] / "stale.txt").exists()
    assert leftovers(pushed["output"].parent) == []


def test_push_to_hub_uploads_the_complete_folder(pushed):
    repo_id, folder, _ = pushed["calls"]["upload_folder"]
    assert repo_id == "someone/dense-connector-tiny" and Path(folder) == pushed["output"]
    uploaded = pushed["uploaded"]
    config = json.loads((uploaded / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("DenseConnectorForConditionalGeneration")
    for name in (
        "configuration_dense_connector.py",
        "connector_dense_connector.py",
        "modeling_dense_connector.py",
        "processing_dense_connector.py",
    ):
        assert (uploaded / name).is_file(), name
    processor_config = json.loads((uploaded / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"].endswith("DenseConnectorProcessor")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (uploaded / name).is_file(), name
    assert (uploaded / "chat_template.jinja").read_text() == CHAT_TEMPLATES["vicuna_v1"]
    card = (uploaded / "README.md").read_text()
    assert "Converted from the original Dense Connector checkpoint `HuanjinYao/DenseConnector-tiny`" in card
    assert "vision tower `openai/clip-tiny`" in card


# ----------------------------------------------------------------------------------------------------------------
# Refusals and failures leave nothing behind
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mm_dense_connector_type", "xyz"),
        ("mm_projector_type", "identity"),
        ("mm_vision_select_feature", "cls"),
        ("image_aspect_ratio", "anyres_max_9"),
        ("mm_patch_merge_type", "spatial_unpad_anyres_max_9"),
        ("mm_use_im_start_end", True),
        ("mm_hidden_size", 64),
        ("mm_resampler_type", "perceiver"),
        ("tokenizer_padding_side", "middle"),
    ],
)
def test_unsupported_config_values_are_refused_by_name(field, value):
    config = {**original_config("clip_dci"), field: value}
    with pytest.raises(CheckpointError, match=field):
        translate_config(config, tower_config("clip_dci"), 1024, 1000, 1001, 0)


@pytest.mark.parametrize(
    ("name", "connector", "projector", "expected"),
    [
        ("clip_dci", "sti", "mlp2x_gelu", {"layers": [7, 15], "width": 32, "tokens": 64 + 2 * 8, "depth": 2}),
        ("clip_dci", "sci", "linear", {"layers": [7, 15], "width": 96, "tokens": 64, "depth": 1}),
        ("clip_dci", "dci", "mlp3x_gelu", {"groups": [list(range(12)), list(range(12, 24))], "width": 96, "depth": 3}),
        ("siglip_dci", "dci", "mlp2x_gelu", {"groups": [list(range(13)), list(range(13, 26))], "width": 96}),
        ("siglip_dci", "sti", "mlp2x_gelu", {"layers": [7, 15], "width": 32, "tokens": 729 + 2 * 91}),
    ],
)
def test_connector_types_use_the_original_hidden_states(name, connector, projector, expected):
    """The original hard-codes the states it fuses (SPEC); other types than the fixtures' translate the same way."""
    width = expected["width"]
    config = {**original_config(name), "mm_dense_connector_type": connector, "mm_projector_type": projector}
    config["mm_hidden_size"] = width
    translated = translate_config(config, tower_config(name), 1024, 1000, 1001, 0).config
    assert translated.dense_connector_layers == expected.get("layers")
    assert translated.dense_connector_groups == expected.get("groups")
    assert translated.projector_depth == expected.get("depth", 2)
    assert translated.vision_config.hidden_size * translated.num_connector_states == width
    if "tokens" in expected:
        assert translated.num_image_tokens() == expected["tokens"]
    siglip = name.startswith("siglip")
    # The original reads hs[-1] of SigLIP's 26 layers and hs[-2] of CLIP's 24: the config names them by their
    # non-negative index and keeps only the layers up to them.
    assert (translated.vision_feature_layer, translated.vision_feature_select_strategy) == (
        (26, "full") if siglip else (23, "default")
    )
    assert translated.vision_config.num_hidden_layers == (26 if siglip else 23)


def test_anyres_needs_spatial_unpad():
    config = {**original_config("siglip_dci_anyres"), "mm_patch_merge_type": "flat"}
    with pytest.raises(CheckpointError, match="spatial_unpad"):
        translate_config(config, tower_config("siglip_dci_anyres"), 1024, 1000, 1001, 0)


@pytest.mark.parametrize("problem", ["unknown", "missing"])
def test_unknown_or_missing_tensors_stop_the_conversion_and_are_listed(problem, tmp_path):
    tensors = original_tensors("clip_sci")
    if problem == "unknown":
        tensors["model.vision_resampler.weight"] = torch.zeros(2)
        tensors["model.mm_projector.4.weight"] = torch.zeros(2)
    else:
        del tensors["model.norm.weight"]
    original = write_original(tmp_path / "original", "clip_sci", tensors, original_config("clip_sci"))
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(original, tmp_path / "out", vision_tower=FIXTURES / "clip_sci" / "vision_tower")
    names = (
        ["model.vision_resampler.weight", "model.mm_projector.4.weight"] if problem == "unknown" else ["norm.weight"]
    )
    assert all(name in str(error.value) for name in names)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_non_empty_output_is_refused_without_overwrite(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    argv = ["--original", str(FIXTURES / "clip_dci" / "original"), "--output", str(output), "--no-progress"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "not empty" in error and "--overwrite" in error
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_python_dash_m_runs_the_same_command_line(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    command = [
        sys.executable,
        "-m",
        "dense_connector.conversion",
        "--original",
        str(FIXTURES / "clip_dci" / "original"),
    ]
    result = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "not empty" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_interrupt_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "append_rows", interrupt)
    output = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(KeyboardInterrupt):
        convert("clip_dci", output)
    assert list(tmp_path.iterdir()) == []


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _writing(parent: Path) -> bool:
    """Whether a staging folder under `parent` already holds files."""
    try:
        return any(any(folder.iterdir()) for folder in parent.glob(".out.*.partial"))
    except FileNotFoundError:  # renamed into place or removed meanwhile
        return False


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_killed_conversion_leaves_no_output_and_the_original_untouched(signal_name, tmp_path):
    """A real `kill` while the converter writes: `--output` never appears half-written and the original is intact.
    SIGTERM also removes the hidden staging folder; SIGKILL cannot be caught, so only that `.partial` folder stays."""
    original = tmp_path / "original"
    shutil.copytree(FIXTURES / "clip_dci" / "original", original)
    before = _tree_digest(original)
    output = tmp_path / "out"
    script = REPO / "conversion_scripts" / "convert_dense_connector_to_hf.py"
    command = [sys.executable, str(script), "--original", str(original), "--output", str(output), "--no-progress"]
    command += ["--vision-tower", str(FIXTURES / "clip_dci" / "vision_tower")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # Kill once the staging folder holds files: the conversion is then surely writing.
    while process.poll() is None and time.monotonic() < deadline and not _writing(tmp_path):
        time.sleep(0.01)
    assert process.poll() is None, "the conversion ended before it could be interrupted"
    process.send_signal(getattr(signal, signal_name))
    assert process.wait(timeout=60) != 0
    assert not output.exists()
    assert _tree_digest(original) == before
    staging = list(tmp_path.glob(".out.*.partial"))
    assert staging == [] if signal_name == "SIGTERM" else len(staging) <= 1


def test_failed_check_keeps_the_previous_output_and_leaves_nothing_behind(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "previous.txt").write_text("an earlier conversion")
    with pytest.raises(CheckpointError, match="does not reproduce the original outputs"):
        convert("clip_sci", output, overwrite=True, verify_against=FIXTURES / "clip_dci")
    assert [p.name for p in output.iterdir()] == ["previous.txt"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("loader", ["package", "transformers"])
def test_verification_refuses_a_written_folder_with_missing_or_unexpected_tensors(loader, tmp_path, monkeypatch):
    """The check after writing refuses an incomplete folder by itself, naming the tensors, whether loading raises
    on them (the package's loader) or only reports them (transformers' own `from_pretrained`)."""

    def write_incomplete(plan, folder, *args, **kwargs):
        names = write_weights(plan, folder, *args, **kwargs)
        tensors = load_file(folder / "model.safetensors")
        del tensors["model.connector.projector.0.bias"]
        tensors["model.connector.extra.weight"] = torch.zeros(2)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return names

    monkeypatch.setattr(steps, "write_weights", write_incomplete)
    if loader == "transformers":
        lenient = PreTrainedModel.from_pretrained.__func__
        monkeypatch.setattr(DenseConnectorForConditionalGeneration, "from_pretrained", classmethod(lenient))
    with pytest.raises(CheckpointError) as error:
        convert("clip_sci", tmp_path / "out")
    assert "model.connector.projector.0.bias" in str(error.value)
    assert "model.connector.extra.weight" in str(error.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_parser_is_reusable_by_another_command():
    import argparse

    parent = argparse.ArgumentParser(prog="dense-connector")
    sub = parent.add_subparsers(dest="command").add_parser("convert")
    build_parser(sub)
    args = parent.parse_args(
        ["convert", "--original", "a/b", "--output", "out", "--dtype", "bfloat16", "--max-shard-size", "2GB"]
    )
    assert (args.command, args.original, args.dtype, args.max_shard_size) == ("convert", "a/b", "bfloat16", 2 * 10**9)
    assert args.vision_tower is None and not args.overwrite and args.conv_mode is None
    assert (
        build_parser().parse_args(["--original", "x", "--output", "y", "--max-shard-size", "1GiB"]).max_shard_size
        == 2**30
    )
