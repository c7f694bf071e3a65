"""A saved or pushed folder must work with `trust_remote_code=True` where the package is not installed."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image
from tiny import run_without_package, tiny_config, tiny_model, tiny_processor
from transformers import AutoModelForImageTextToText, AutoProcessor


CODE_FILES = (
    "configuration_dense_connector.py",
    "connector_dense_connector.py",  # imported relatively by the modeling file, so save_pretrained copies it too
    "modeling_dense_connector.py",
    "processing_dense_connector.py",
)

LOAD_AND_RUN = """
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{folder}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{folder}", trust_remote_code=True)
assert type(model).__name__ == "DenseConnectorForConditionalGeneration", type(model)
assert "transformers_modules" in type(model).__module__, type(model).__module__
inputs = processor(images=Image.open("image.png"), text="USER: <image>\\nWhat is it? ASSISTANT:", return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
torch.save({{"input_ids": inputs["input_ids"], "logits": logits, "generated": generated}}, "out.pt")
"""


def _save_image(path: Path) -> Image.Image:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    image.save(path)
    return Image.open(path)


def _in_process(folder: Path, image: Image.Image) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=image, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return {"input_ids": inputs["input_ids"], "logits": logits, "generated": generated}


def _check_complete_folder(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("DenseConnectorForConditionalGeneration")
    assert config["auto_map"]["AutoConfig"].endswith("DenseConnectorConfig")
    for name in CODE_FILES:
        assert (folder / name).is_file(), name
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"].endswith("DenseConnectorProcessor")
    assert (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    card = (folder / "README.md").read_text()
    assert "DenseConnectorForConditionalGeneration" in card and "**dci** connector" in card


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_saved_folder_loads_as_remote_code_with_identical_logits(tower, tmp_path):
    config = tiny_config(tower, "dci")
    folder = tmp_path / "checkpoint"
    tiny_model(config).save_pretrained(folder)
    tiny_processor(config).save_pretrained(folder)
    _check_complete_folder(folder)
    image = _save_image(tmp_path / "image.png")

    run_without_package(LOAD_AND_RUN.format(folder=folder), tmp_path)
    remote = torch.load(tmp_path / "out.pt")
    local = _in_process(folder, image)
    assert (remote["input_ids"] == config.image_token_id).sum() == config.num_image_tokens()
    torch.testing.assert_close(remote["input_ids"], local["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(remote["logits"], local["logits"])
    torch.testing.assert_close(remote["generated"], local["generated"], rtol=0, atol=0)


def test_push_to_hub_uploads_a_complete_folder(tmp_path, monkeypatch):
    """Capture what `push_to_hub` would upload (no network) and load it back as remote code."""
    uploaded = tmp_path / "uploaded"

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            target = uploaded / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(operation.path_or_fileobj, target)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    load_card = ModelCard.load

    def load_uploaded_card(repo_id, **kwargs):
        if not (uploaded / "README.md").exists():
            raise EntryNotFoundError("no model card yet")
        return load_card(uploaded / "README.md")

    monkeypatch.setattr(ModelCard, "load", load_uploaded_card)

    config = tiny_config("clip", "dci")
    model = tiny_model(config)
    processor = tiny_processor(config)
    model.push_to_hub("someone/dense-connector-tiny")
    processor.push_to_hub("someone/dense-connector-tiny")
    _check_complete_folder(uploaded)

    image = _save_image(tmp_path / "image.png")
    run_without_package(LOAD_AND_RUN.format(folder=uploaded), tmp_path)
    remote = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(remote["logits"], _in_process(uploaded, image)["logits"], rtol=0, atol=0)
