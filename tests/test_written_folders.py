"""Folders the package writes, used as an ecosystem tool uses them: in a fresh process that has not imported the
package (an evaluation harness, a data pipeline, vLLM's loader).

Every kind of folder: `dense-connector convert`'s output, the bundled demo checkpoint, `save_pretrained` of model and
processor, and `examples/finetune.py`'s output. The tokenizer and image processor load without remote code and
without any question on standard input (kept open, as in a terminal, so a question would show and wait); the model
and processor load as remote code. transformers 5.19-5.23's `AutoTokenizer` reads `config.json` before anything
else, and its `auto_map` names remote code: with `trust_remote_code` left unset it asks whether to run that code,
whatever the tokenizer files say, so the tokenizer is loaded with `trust_remote_code=False` (docs/inference.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from saved_checkpoint import finetune_with_script
from tiny import REPO, run_without_package
from transformers import AutoProcessor

from dense_connector.demo_data import demo_sample


FIXTURES = REPO.parent / "shared" / "fixtures" / "original"
DEMO = REPO / "dense_connector" / "demo" / "checkpoint"
TEXT = "USER: <image>\nWhat is it? ASSISTANT: A circle.</s>USER: And now? ASSISTANT:"
PROMPT = "Do you wish to run the custom code"

LOAD_PARTS = """
import json
import numpy as np
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{folder}", trust_remote_code=False)
image_processor = AutoImageProcessor.from_pretrained("{folder}")
try:
    AutoProcessor.from_pretrained("{folder}", trust_remote_code=False)
    processor_error = None
except ValueError as error:
    processor_error = str(error)
base = AutoModel.from_pretrained("{folder}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{folder}", trust_remote_code=True)
pixel_values = image_processor(Image.open("image.png"), return_tensors="np")["pixel_values"]
np.save("pixel_values.npy", pixel_values)
open("loaded.json", "w").write(json.dumps({{
    "tokenizer": type(tokenizer).__name__,
    "ids": tokenizer({text!r})["input_ids"],
    "image_processor": type(image_processor).__name__,
    "processor_error": processor_error,
    "processor": type(processor).__name__,
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


@pytest.fixture(scope="module")
def finetuned(folder, tmp_path_factory) -> Path:
    return finetune_with_script(folder, tmp_path_factory.mktemp("finetuned") / "out")


@pytest.fixture(params=["converted", "demo", "folder", "finetuned"], ids=["converted", "demo", "saved", "finetuned"])
def written(request) -> Path:
    """Each kind of folder the package writes (`folder`: `save_pretrained` of model and processor)."""
    return DEMO if request.param == "demo" else request.getfixturevalue(request.param)


def test_converted_config_maps_auto_model_to_the_base_model(converted):
    auto_map = json.loads((converted / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_dense_connector.DenseConnectorModel"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_dense_connector.DenseConnectorForConditionalGeneration"
    assert auto_map["AutoConfig"] == "configuration_dense_connector.DenseConnectorConfig"


def run_with_open_stdin(script: str, tmp_path: Path) -> str:
    """Run `script` without the package, standard input a pipe nobody writes to or closes; its whole output."""
    read_end, write_end = os.pipe()
    try:
        result = run_without_package(script, tmp_path, stdin=read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    return result.stdout + result.stderr


def test_tokenizer_and_image_processor_load_without_remote_code_or_question(written, tmp_path):
    image = demo_sample().image
    image.save(tmp_path / "image.png")
    output = run_with_open_stdin(LOAD_PARTS.format(folder=written, text=TEXT), tmp_path)
    assert PROMPT not in output
    loaded = json.loads((tmp_path / "loaded.json").read_text())
    expected = AutoProcessor.from_pretrained(written)  # in this process, with the package's classes
    assert loaded["tokenizer"] in ("TokenizersBackend", "LlamaTokenizer")
    assert loaded["ids"] == expected.tokenizer(TEXT)["input_ids"]
    assert loaded["ids"].count(expected.image_token_id) == 1 and loaded["ids"][0] == expected.tokenizer.bos_token_id
    assert loaded["image_processor"].startswith("Llava")
    pixel_values = torch.from_numpy(np.load(tmp_path / "pixel_values.npy"))
    torch.testing.assert_close(pixel_values, expected.image_processor(image, return_tensors="pt")["pixel_values"])
    assert "trust_remote_code=True" in loaded["processor_error"]  # the processor is remote code, and says so
    assert loaded["processor"] == "DenseConnectorProcessor"
    assert loaded["base"] == "DenseConnectorModel" and "transformers_modules" in loaded["base_module"]


def test_tokenizer_loads_with_trust_remote_code_unset_and_no_standard_input(converted, tmp_path):
    """What transformers does today with `trust_remote_code` unset: it asks (config.json's `auto_map`), and with no
    standard input to answer takes it as a no and loads the tokenizer anyway."""
    script = f"""
import json
from transformers import AutoTokenizer
ids = AutoTokenizer.from_pretrained({str(converted)!r})({TEXT!r})["input_ids"]
open("ids.json", "w").write(json.dumps(ids))
"""
    result = run_without_package(script, tmp_path)
    assert PROMPT in result.stdout
    expected = AutoProcessor.from_pretrained(converted).tokenizer(TEXT)["input_ids"]
    assert json.loads((tmp_path / "ids.json").read_text()) == expected
