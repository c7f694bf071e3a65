"""llama.cpp itself runs `dense-connector export --to gguf` files (`make test-llamacpp`).

`make test-llamacpp` builds `llama-mtmd-cli` from the llama.cpp source that the llama-cpp-python 0.3.36 sdist vendors
and passes its path (`LLAMA_MTMD_CLI`) and the source folder (`LLAMA_CPP_DIR`, whose `convert_hf_to_gguf.py`
converts the language model). On a reference fixture llama.cpp's greedy answer starts as transformers' does; it may
part later, because llama.cpp resizes images its own way (pad to square first, then its own bicubic resize, where
the original resizes the shortest edge, crops, and pads with the mean colour; see docs/export.md). The bundled demo,
asked its question, answers as it does in transformers.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import FIXTURES
from transformers import AutoModelForImageTextToText, AutoProcessor

from dense_connector.conversion import convert_checkpoint


REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "dense_connector" / "demo"
CLI = os.environ.get("LLAMA_MTMD_CLI", "")
LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR", "")
pytestmark = pytest.mark.skipif(
    not (Path(CLI).is_file() and Path(LLAMA_CPP_DIR).is_dir()),
    reason="needs LLAMA_MTMD_CLI and LLAMA_CPP_DIR: run `make test-llamacpp`, which builds them",
)


def export_gguf(model: Path, output: Path) -> Path:
    """`dense-connector export --to gguf` as a user runs it, the language model converted by llama.cpp's script."""
    command = [sys.executable, "-m", "dense_connector.cli", "export", "--model", str(model), "--to", "gguf"]
    command += ["--output", str(output), "--llama-cpp", LLAMA_CPP_DIR, "--outtype", "f32", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return output


def llama_answer(folder: Path, image: Path, question: str, tokens: int) -> str:
    """llama-mtmd-cli's greedy answer: the GGUF's own chat template (jinja), the image where `<image>` goes."""
    command = [CLI, "-m", str(folder / "model-f32.gguf"), "--mmproj", str(folder / "mmproj-model-f32.gguf")]
    command += ["--image", str(image), "-p", f"<__media__>\n{question}", "--temp", "0", "-n", str(tokens)]
    command += ["--jinja", "--seed", "0", "-t", "1", "--no-warmup"]
    # a byte-fallback token on its own is not UTF-8; transformers decodes it as U+FFFD too
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def transformers_answer(folder: Path, image: Path, question: str, tokens: int) -> tuple[list[int], str]:
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image).convert("RGB")], text=text, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    ids = output[0, inputs["input_ids"].shape[1] :].tolist()
    return ids, processor.decode(ids, skip_special_tokens=True).strip()


def test_fixture_greedy_answer_starts_as_transformers(tmp_path):
    """clip_dci: llama.cpp's answer begins with transformers' first greedy tokens (7 of 12 measured with llama.cpp
    0.3.36's source); where they part is printed."""
    fixture = FIXTURES / "clip_dci"
    converted = convert_checkpoint(
        fixture / "original", tmp_path / "converted", vision_tower=fixture / "vision_tower", progress=False
    )
    # llama.cpp tokenises SentencePiece vocabularies with the piece scores of tokenizer.model (docs/export.md)
    shutil.copyfile(fixture / "original" / "tokenizer.model", converted / "tokenizer.model")
    folder = export_gguf(converted, tmp_path / "gguf")
    question = json.loads((fixture / "meta.json").read_text())["prompt"].split("<image>\n")[1].split(" ASSISTANT")[0]
    ids, expected = transformers_answer(converted, fixture / "image0.png", question, 12)
    answer = llama_answer(folder, fixture / "image0.png", question, 12)
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    agreed = next((n for n in range(len(ids), 0, -1) if answer.startswith(processor.decode(ids[:n]).strip())), 0)
    print(f"llama.cpp: {answer!r}; transformers: {expected!r}; the first {agreed} of {len(ids)} tokens agree")
    assert agreed >= 5


def test_bundled_demo_answers_its_question_from_gguf_files(tmp_path):
    folder = export_gguf(DEMO / "checkpoint", tmp_path / "gguf")
    question = "How many shapes are there?"
    _, expected = transformers_answer(DEMO / "checkpoint", DEMO / "sample.png", question, 16)
    answer = llama_answer(folder, DEMO / "sample.png", question, 16)
    assert answer.split(".")[0].strip() == expected.split(".")[0].strip(), (answer, expected)
