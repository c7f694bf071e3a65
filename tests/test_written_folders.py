"""Folders the command-line tools write, used as an ecosystem tool uses them: in a fresh process that has not
imported the package, with no standard input (an evaluation harness, a data pipeline, vLLM's loader)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import run_without_package


FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "original"

LOAD_PARTS = """
import json
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{folder}")
image_processor = AutoImageProcessor.from_pretrained("{folder}")
base = AutoModel.from_pretrained("{folder}", trust_remote_code=True)
open("loaded.json", "w").write(json.dumps({{
    "tokenizer": type(tokenizer).__name__,
    "image_token": tokenizer.convert_tokens_to_ids("<image>"),
    "image_processor": type(image_processor).__name__,
    "base": type(base).__name__,
    "base_module": type(base).__module__,
}}))
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """`dense-connector convert` run as a user runs it, on an original-format fixture."""
    output = tmp_path_factory.mktemp("converted") / "clip_dci"
    command = Path(sys.executable).parent / "dense-connector"
    fixture = FIXTURES / "clip_dci"
    result = subprocess.run(
        [command, "convert", "--original", fixture / "original", "--vision-tower", fixture / "vision_tower"]
        + ["--output", output, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return output


def test_converted_config_maps_auto_model_to_the_base_model(converted):
    auto_map = json.loads((converted / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_dense_connector.DenseConnectorModel"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_dense_connector.DenseConnectorForConditionalGeneration"
    assert auto_map["AutoConfig"] == "configuration_dense_connector.DenseConnectorConfig"


@pytest.mark.parametrize("which", ["converted", "saved"])
def test_tokenizer_and_image_processor_load_without_remote_code(which, converted, folder, tmp_path):
    path = converted if which == "converted" else folder
    run_without_package(LOAD_PARTS.format(folder=path), tmp_path)
    loaded = json.loads((tmp_path / "loaded.json").read_text())
    assert loaded["tokenizer"] in ("TokenizersBackend", "LlamaTokenizer") and loaded["image_token"] > 0
    assert loaded["image_processor"].startswith("Llava")
    assert loaded["base"] == "DenseConnectorModel" and "transformers_modules" in loaded["base_module"]
