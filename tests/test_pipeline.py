"""`pipeline("image-text-to-text")`, `apply_chat_template` + `generate`, batches and streaming, as users call them."""

import functools
import http.server
import json
import threading

import pytest
import torch
from PIL import Image
from tiny import run_without_package
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer, pipeline


PROMPT = "USER: <image>\nWhat is shown here? ASSISTANT:"


def chat(question: str, *images) -> list[dict]:
    """One user message: image items (PIL images, or dicts such as `{"path": ...}`) then the question."""
    items = [image if isinstance(image, dict) else {"image": image} for image in images]
    return [
        {
            "role": "user",
            "content": [{"type": "image", **item} for item in items] + [{"type": "text", "text": question}],
        }
    ]


@pytest.fixture(scope="module")
def images(image_paths) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in image_paths]


@pytest.fixture(scope="module")
def pipe(folder):
    return pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForImageTextToText.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder)


def new_tokens(model, inputs, **generate_kwargs) -> list[list[int]]:
    """Greedy `generate` on processor outputs; the new ids of each row (padding and EOS kept out)."""
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, **generate_kwargs)
    rows = output[:, inputs["input_ids"].shape[1] :].tolist()
    pad = model.generation_config.pad_token_id
    return [[token for token in row if token != pad] for row in rows]


def chat_reference(model, processor, messages, max_new_tokens=6) -> str:
    """The answer of one conversation through `apply_chat_template` + `generate`, one conversation alone."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return processor.decode(new_tokens(model, inputs, max_new_tokens=max_new_tokens)[0], skip_special_tokens=True)


def answers(outputs) -> list[str]:
    """`generated_text` of a batched pipeline call (one list of candidates per input)."""
    return [candidates[0]["generated_text"] for candidates in outputs]


def test_images_and_text(pipe, model, processor, images):
    output = pipe(images=images[0], text=PROMPT, max_new_tokens=6)
    inputs = processor(images=images[0], text=PROMPT, return_tensors="pt")
    expected = processor.decode(new_tokens(model, inputs, max_new_tokens=6)[0], skip_special_tokens=True)
    assert expected
    assert output == [{"input_text": PROMPT, "generated_text": PROMPT + expected}]


def test_chat_with_pil_image_local_path_and_url(pipe, model, processor, images, image_paths):
    expected = chat_reference(model, processor, chat("What is shown here?", images[0]))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_paths[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{image_paths[0].name}"
    try:
        for image in (images[0], {"path": str(image_paths[0])}, {"url": url}):
            output = pipe(text=chat("What is shown here?", image), max_new_tokens=6, return_full_text=False)
            assert output[0]["generated_text"] == expected
    finally:
        server.shutdown()


def test_batch_equals_one_by_one(pipe, images):
    """Prompts of different lengths, left-padded in one batch, give the one-by-one greedy answers."""
    questions = ["What?", "Describe the picture in great detail, please, including every colour.", "Shapes?"]
    chats = [chat(question, image) for question, image in zip(questions, images)]
    one_by_one = [pipe(text=c, max_new_tokens=6, return_full_text=False)[0]["generated_text"] for c in chats]
    assert pipe.tokenizer.padding_side == "left"
    batched = pipe(text=chats, max_new_tokens=6, return_full_text=False, batch_size=3)
    assert answers(batched) == one_by_one
    assert len(set(one_by_one)) > 1

    prompts = [f"USER: <image>\n{question} ASSISTANT:" for question in questions]
    batched = pipe(images=images, text=prompts, max_new_tokens=6, return_full_text=False)
    singles = [pipe(images=i, text=p, max_new_tokens=6, return_full_text=False) for i, p in zip(images, prompts)]
    assert [o["generated_text"] for o in batched] == [s[0]["generated_text"] for s in singles]


def test_max_new_tokens(pipe, processor, images):
    messages = chat("What is shown here?", images[0])
    prompt_length = len(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[0])
    for max_new_tokens in (1, 5, 12):
        output = pipe(text=messages, max_new_tokens=max_new_tokens, return_tensors=True)
        assert len(output[0]["generated_token_ids"]) - prompt_length == max_new_tokens


def test_generation_stops_at_the_configured_stop_tokens(pipe, processor, images, monkeypatch):
    """`generation_config.eos_token_id` (the template's stop tokens) ends the answer, as the original stops."""
    messages = chat("What is shown here?", images[0])
    prompt_length = len(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[0])
    assert pipe.model.generation_config.eos_token_id == [processor.tokenizer.eos_token_id]
    free = pipe(text=messages, max_new_tokens=10, return_tensors=True)[0]["generated_token_ids"][prompt_length:]
    assert len(free) == 10 and processor.tokenizer.eos_token_id not in free.tolist()
    stop = int(free[3])
    monkeypatch.setattr(pipe.model.generation_config, "eos_token_id", [processor.tokenizer.eos_token_id, stop])
    # A new pipeline: before transformers 5.20 a pipeline keeps the generation config it was built with.
    stopping = pipeline("image-text-to-text", model=pipe.model, processor=pipe.processor)
    stopped = stopping(text=messages, max_new_tokens=10, return_tensors=True)[0]["generated_token_ids"][prompt_length:]
    assert stopped.tolist() == free[: free.tolist().index(stop) + 1].tolist()


def test_sampling_arguments(pipe, images):
    messages = chat("What is shown here?", images[0])

    def sample(seed, **kwargs):
        torch.manual_seed(seed)
        generate_kwargs = {"do_sample": True, **kwargs}
        return pipe(text=messages, max_new_tokens=8, return_full_text=False, generate_kwargs=generate_kwargs)

    greedy = pipe(text=messages, max_new_tokens=8, return_full_text=False)
    assert sample(0, top_k=1) == greedy
    hot = [sample(seed, temperature=5.0, top_k=0)[0]["generated_text"] for seed in range(3)]
    assert hot[0] == sample(0, temperature=5.0, top_k=0)[0]["generated_text"]
    assert len(set(hot)) == 3 and greedy[0]["generated_text"] not in hot


def test_return_full_text(pipe, images):
    messages = chat("What is shown here?", images[0])
    new = pipe(text=messages, max_new_tokens=6, return_full_text=False)[0]
    full = pipe(text=messages, max_new_tokens=6)[0]
    assert new["input_text"] == full["input_text"] == messages
    assert full["generated_text"] == messages + [{"role": "assistant", "content": new["generated_text"]}]


def test_multi_image_prompt_keeps_image_order(pipe, model, processor, images):
    messages = chat("Compare the two pictures.", images[0], images[1])
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["input_ids"][0].tolist().count(processor.image_token_id) == 2 * 64
    output = pipe(text=messages, max_new_tokens=6, return_tensors=True)[0]["generated_token_ids"]
    assert output[inputs["input_ids"].shape[1] :].tolist() == new_tokens(model, inputs, max_new_tokens=6)[0]
    swapped = processor.apply_chat_template(
        chat("Compare the two pictures.", images[1], images[0]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[0, -1], model(**swapped).logits[0, -1])


def test_text_only_and_image_prompts_in_one_batch(pipe, model, processor, images):
    chats = [chat("What is shown here?", images[0]), chat("Tell me a joke."), chat("Both?", images[1], images[2])]
    inputs = processor.apply_chat_template(
        chats,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    batched = processor.batch_decode(new_tokens(model, inputs, max_new_tokens=6), skip_special_tokens=True)
    assert batched == [chat_reference(model, processor, c) for c in chats]

    prompts = ["USER: <image>\nWhat? ASSISTANT:", "USER: Tell me a joke. ASSISTANT:"]
    batched = pipe(images=[images[0]], text=prompts, max_new_tokens=6, return_full_text=False)
    alone = [
        pipe(images=images[0], text=prompts[0], max_new_tokens=6, return_full_text=False),
        pipe(text=prompts[1], max_new_tokens=6, return_full_text=False),
    ]
    assert [o["generated_text"] for o in batched] == [a[0]["generated_text"] for a in alone]


def test_streaming_matches_non_streamed_output(pipe, images):
    messages = chat("What is shown here?", images[0])
    expected = pipe(text=messages, max_new_tokens=10, return_full_text=False)[0]["generated_text"]
    streamer = TextIteratorStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(
        target=pipe, kwargs={"text": messages, "max_new_tokens": 10, "generate_kwargs": {"streamer": streamer}}
    )
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) > 1
    assert "".join(pieces) == expected


REMOTE_CODE_CHECKS = """
import json, threading
import torch
from PIL import Image
from transformers import TextIteratorStreamer, pipeline

pipe = pipeline("image-text-to-text", model="{folder}", trust_remote_code=True)
assert "transformers_modules" in type(pipe.model).__module__, type(pipe.model).__module__
assert "transformers_modules" in type(pipe.processor).__module__, type(pipe.processor).__module__
images = [Image.open(path).convert("RGB") for path in {paths}]

def chat(question, *items):
    return [{{"role": "user", "content": [{{"type": "image", **item}} for item in items]
             + [{{"type": "text", "text": question}}]}}]

chats = [chat("What?", {{"image": images[0]}}), chat("Describe it all, in detail.", {{"path": {paths}[1]}}),
         chat("Compare.", {{"image": images[0]}}, {{"image": images[2]}})]
results = {{}}
prompt = "USER: <image>\\nWhat? ASSISTANT:"
results["single"] = pipe(images=images[0], text=prompt, max_new_tokens=5)[0]["generated_text"]
results["chats"] = [pipe(text=c, max_new_tokens=6, return_full_text=False)[0]["generated_text"] for c in chats]
results["batched"] = [o[0]["generated_text"] for o in pipe(text=chats, max_new_tokens=6, return_full_text=False,
                                                            batch_size=3)]
torch.manual_seed(0)
results["top_k_1"] = pipe(text=chats[0], max_new_tokens=6, return_full_text=False,
                          generate_kwargs={{"do_sample": True, "top_k": 1}})[0]["generated_text"]
streamer = TextIteratorStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
thread = threading.Thread(target=pipe, kwargs={{"text": chats[0], "max_new_tokens": 6,
                                                "generate_kwargs": {{"streamer": streamer}}}})
thread.start()
results["streamed"] = "".join(streamer)
thread.join()
print(json.dumps(results))
"""


def test_pipeline_from_remote_code_alone(pipe, folder, image_paths, tmp_path):
    """The same answers from the saved folder's own code in a process where `dense_connector` cannot be imported."""
    paths = [str(path) for path in image_paths]
    result = run_without_package(REMOTE_CODE_CHECKS.format(folder=folder, paths=paths), tmp_path)
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    images = [Image.open(path).convert("RGB") for path in paths]
    chats = [
        chat("What?", images[0]),
        chat("Describe it all, in detail.", images[1]),
        chat("Compare.", images[0], images[2]),
    ]
    local = [pipe(text=c, max_new_tokens=6, return_full_text=False)[0]["generated_text"] for c in chats]
    assert (
        remote["single"]
        == pipe(images=images[0], text="USER: <image>\nWhat? ASSISTANT:", max_new_tokens=5)[0]["generated_text"]
    )
    assert remote["chats"] == remote["batched"] == local
    assert remote["top_k_1"] == remote["streamed"] == local[0]
