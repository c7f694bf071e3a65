"""vLLM serves Dense Connector checkpoints (through its Transformers modeling backend) with transformers' outputs.

Runs in .venv-vllm (`make test-vllm`). Every comparison is greedy, 12 new tokens, EOS ignored, against
`generate()` of the same checkpoint in transformers. vLLM's CPU attention needs heads of at least 32 channels, so the
converted fixtures' language model (4 heads of 16) is read as 2 heads of 32, in vLLM and transformers alike.

Prompts given as text or chat messages are tokenised by vLLM as a whole; the converted tokenizers reproduce the
original's chunk-wise ids that way (the `▁` after each image included), so those prompt ids are compared too.
"""

import base64
import gc
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from vllm import LLM, SamplingParams

from dense_connector.conversion import convert_checkpoint
from dense_connector.demo_data import make_examples
from dense_connector.integrations.vllm import token_prompt


REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "dense_connector" / "demo" / "checkpoint"
FIXTURES = REPO.parent / "shared" / "fixtures" / "original"
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
# Small engines: the model runs in the engine's process (no separate worker process to start), a fixed KV cache
# instead of a share of the machine's memory, no graph compilation, no profiling run. The engine stays out of this
# process: vLLM patches the language model's class there, which would break the transformers references.
ENGINE = {
    "distributed_executor_backend": "uni",
    "trust_remote_code": True,
    "dtype": "float32",
    "kv_cache_memory_bytes": 256 * 2**20,
    "enforce_eager": True,
    "skip_mm_profiling": True,
    "limit_mm_per_prompt": {"image": 2},
}


def convert_fixture(name: str, output: Path) -> Path:
    """Convert a reference fixture, then read its language model's 4 heads of 16 as 2 heads of 32."""
    convert_checkpoint(
        FIXTURES / name / "original", output, vision_tower=FIXTURES / name / "vision_tower", progress=False
    )
    config = json.loads((output / "config.json").read_text())
    config["text_config"].update(num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    (output / "config.json").write_text(json.dumps(config, indent=2))
    return output


def fixture_images(name: str) -> list[Image.Image]:
    """The fixture's image, then a second one (another fixture's) for two-image prompts."""
    other = "siglip_dci" if name == "clip_dci" else "clip_dci"
    return [Image.open(FIXTURES / fixture / "image0.png").convert("RGB") for fixture in (name, other)]


class Reference:
    """The checkpoint in transformers: processor ids and greedy continuations, EOS ignored."""

    def __init__(self, folder: Path):
        self.model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        self.model.generation_config.eos_token_id = None  # vLLM's `ignore_eos`: keep going past EOS
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    def prompt_ids(self, text: str, images: list[Image.Image]) -> list[int]:
        return self.processor(text=text, images=images or None)["input_ids"][0]

    def generate(self, prompt_ids: list[int], images: list[Image.Image]) -> list[int]:
        """Greedy ids after `prompt_ids` (which hold each image's placeholders, expanded)."""
        input_ids = torch.tensor([prompt_ids])
        pixel_values = None
        if images:
            pixel_values = self.processor(text="<image>" * len(images), images=images, return_tensors="pt")[
                "pixel_values"
            ]
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=pixel_values,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        return output[0, input_ids.shape[1] :].tolist()


@pytest.fixture(scope="module", params=["demo", "clip_dci", "siglip_dci"])
def served(request, tmp_path_factory):
    """(name, vLLM engine, transformers reference, prompt, images) for each checkpoint, one engine at a time."""
    name = request.param
    if name == "demo":
        folder, images = DEMO, [Image.open(DEMO.parent / "sample.png").convert("RGB")] * 2
        prompt = "USER: <image>\nHow many shapes are there? ASSISTANT:"
    else:
        folder, images = convert_fixture(name, tmp_path_factory.mktemp(name) / "hf"), fixture_images(name)
        prompt = json.loads((FIXTURES / name / "meta.json").read_text())["prompt"]
    llm = LLM(model=str(folder), seed=0, **ENGINE)
    yield name, llm, Reference(folder), prompt, images
    del llm
    gc.collect()


def two_images(prompt: str) -> str:
    return prompt.replace("<image>\n", "<image>\n<image>\n", 1)


def cases(name: str, prompt: str, images: list[Image.Image]) -> list[tuple[str, list[Image.Image]]]:
    """The prompt with one image; for `clip_dci` also with two."""
    return [(prompt, images[:1])] + ([(two_images(prompt), images)] if name == "clip_dci" else [])


def test_processor_ids_give_transformers_outputs(served):
    name, llm, reference, prompt, images = served
    for text, case_images in cases(name, prompt, images):
        expected_ids = reference.prompt_ids(text, case_images)
        output = llm.generate(token_prompt(reference.processor, text, case_images), GREEDY)[0]
        assert output.prompt_token_ids == expected_ids
        assert list(output.outputs[0].token_ids) == reference.generate(expected_ids, case_images)


def test_text_prompt_gives_transformers_outputs(served):
    name, llm, reference, prompt, images = served
    for text, case_images in cases(name, prompt, images):
        output = llm.generate({"prompt": text, "multi_modal_data": {"image": case_images}}, GREEDY)[0]
        assert list(output.outputs[0].token_ids) == reference.generate(output.prompt_token_ids, case_images)


def test_text_prompt_ids_are_the_processors(served):
    _, llm, reference, prompt, images = served
    output = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images[:1]}}, GREEDY)[0]
    assert output.prompt_token_ids == reference.prompt_ids(prompt, images[:1])


def chat(question: str, num_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}]


def vllm_chat(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """`messages` with vLLM's image items (the PIL images themselves)."""
    images = iter(images)
    return [
        {
            **message,
            "content": [
                {"type": "image_pil", "image_pil": next(images)} if item["type"] == "image" else item
                for item in message["content"]
            ],
        }
        for message in messages
    ]


def chat_output(llm, messages, images):
    # A default chat request: the chat template writes the BOS the original's prompt starts with.
    return llm.chat(vllm_chat(messages, images), GREEDY)[0]


def test_chat_messages_give_transformers_outputs(served):
    name, llm, reference, _, images = served
    for count in (1, 2) if name == "clip_dci" else (1,):
        output = chat_output(llm, chat("Describe the pictures in detail.", count), images[:count])
        assert list(output.outputs[0].token_ids) == reference.generate(output.prompt_token_ids, images[:count])


def test_chat_prompt_ids_are_the_processors(served):
    _, llm, reference, _, images = served
    messages = chat("Describe the picture in detail.")
    output = chat_output(llm, messages, images[:1])
    expected = reference.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert output.prompt_token_ids == reference.prompt_ids(expected, images[:1])


def test_concurrent_requests_each_equal_their_own_transformers_run(served):
    _, llm, reference, prompt, _ = served
    images = [example.image for example in make_examples(8, seed=7)]  # 8 different scenes
    outputs = llm.generate([token_prompt(reference.processor, prompt, [image]) for image in images], GREEDY)
    for output, image in zip(outputs, images):  # one call: the engine schedules the 8 requests together
        expected_ids = reference.prompt_ids(prompt, [image])
        assert output.prompt_token_ids == expected_ids
        assert list(output.outputs[0].token_ids) == reference.generate(expected_ids, [image])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """vLLM's OpenAI-compatible server on the demo checkpoint, on 127.0.0.1 and a free port; always stopped."""
    folder = tmp_path_factory.mktemp("demo") / "checkpoint"
    shutil.copytree(DEMO, folder)
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "demo", "--seed", "0"]
    command += ["--trust-remote-code", "--dtype", "float32", "--enforce-eager", "--skip-mm-profiling"]
    command += ["--kv-cache-memory-bytes", str(256 * 2**20), "--distributed-executor-backend", "uni"]
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the vLLM server did not start:\n{log.read()[-5000:]}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def server_chat(server: str, image: Image.Image, question: str) -> dict:
    """/v1/chat/completions with the image as a base64 data URL; returns the response with its token ids."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {
        "model": "demo",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
            }
        ],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,  # a default request otherwise: no extra_body, the template writes BOS
    }
    return post(f"{server}/v1/chat/completions", body)


@pytest.fixture(scope="module")
def demo_reference():
    return Reference(DEMO)


def test_openai_server_answers_as_transformers(server, demo_reference):
    image = make_examples(1, seed=11)[0].image
    response = server_chat(server, image, "How many shapes are there?")
    choice = response["choices"][0]
    expected = demo_reference.generate(response["prompt_token_ids"], [image])
    assert choice["token_ids"] == expected
    decode = demo_reference.processor.decode  # vLLM detokenises the answer in context, after the prompt
    prompt_text = decode(response["prompt_token_ids"], skip_special_tokens=True)
    answer_text = decode(response["prompt_token_ids"] + expected, skip_special_tokens=True)[len(prompt_text) :]
    assert choice["message"]["content"] == answer_text


def test_openai_server_prompt_ids_are_the_processors(server, demo_reference):
    image = make_examples(1, seed=11)[0].image
    response = server_chat(server, image, "How many shapes are there?")
    text = demo_reference.processor.apply_chat_template(chat("How many shapes are there?"), add_generation_prompt=True)
    assert response["prompt_token_ids"] == demo_reference.prompt_ids(text, [image])
