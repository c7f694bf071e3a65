"""The web app driven through `gradio_client`, as scripts use a Space: answers, streaming, Stop, bad input.

The Space entry point (`python app.py`) serves the bundled demo; a tiny random checkpoint (`dense-connector web
--model`) gives answers long enough to watch them grow token by token and to stop them.
"""

import time

import pytest
from conftest import SAMPLE
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image


QUESTION = "How many shapes are there?"


def chat(client: Client, text: str, files=(), max_new_tokens: int = 8, temperature: float = 0.0):
    """Send one message; the conversation so far is the client's session's."""
    message = {"text": text, "files": [handle_file(str(path)) for path in files]}
    return client.submit(message, temperature, 1.0, max_new_tokens, api_name="/chat")


def answer_text(history: list[dict]) -> str:
    return "".join(item["text"] for item in history[-1]["content"] if item["type"] == "text")


@pytest.fixture(scope="module")
def space(space_server) -> Client:
    return Client(space_server.url, verbose=False)


def test_space_entry_point_answers_three(space, space_server):
    history = chat(space, QUESTION, [SAMPLE]).result()[0]
    assert history[-1]["role"] == "assistant"
    assert answer_text(history) == "3"
    assert space_server.startup_s < 60, space_server.startup_s  # "starts in seconds" (generous for a loaded CI)
    follow_up = chat(space, QUESTION).result()[0]  # the same image, a second turn
    assert answer_text(follow_up) == "3"
    assert sum(message["role"] == "assistant" for message in follow_up) == 2


def test_answers_stream_token_by_token(tiny_server):
    client = Client(tiny_server.url, verbose=False)
    job = chat(client, "Describe it.", [SAMPLE], max_new_tokens=12)
    partials = [answer_text(output[0]) for output in job]
    final = answer_text(job.result()[0])
    growing = [text for text in dict.fromkeys(partials) if text]
    assert len(growing) >= 4, partials  # the answer arrived in pieces, not at once
    assert all(final.startswith(text.strip()) for text in growing[:-1]), (growing, final)


def test_stop_ends_a_long_answer(tiny_server):
    client = Client(tiny_server.url, verbose=False)
    job = chat(client, "Describe it.", [SAMPLE], max_new_tokens=2048, temperature=1.0)
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    client.predict(api_name="/stop")
    stopped = time.monotonic()
    while not job.done() and time.monotonic() - stopped < 30:  # slack for a loaded machine; 2048 tokens take ~1 min
        time.sleep(0.1)
    assert job.done(), "the answer went on after Stop"
    assert len(job.outputs()) < 1024, len(job.outputs())  # one output per token: far from the 2048 asked for
    assert answer_text(chat(client, "Describe it.", max_new_tokens=3).result()[0])  # and it answers again


def test_bad_inputs_are_reported_and_the_app_keeps_answering(space, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    with pytest.raises(AppError, match="fake.png is not an image"):
        chat(space, QUESTION, [fake]).result()
    large = tmp_path / "large.png"
    Image.new("RGB", (4097, 4096)).save(large)
    with pytest.raises(AppError, match=r"large.png is 4097x4096 pixels, over the limit"):
        chat(space, QUESTION, [large]).result()
    with pytest.raises(AppError, match="message was empty"):
        chat(space, "   ", [SAMPLE]).result()
    with pytest.raises(AppError, match="Upload an image first"):
        space.predict(None, api_name="/attention_maps")
    assert answer_text(chat(space, QUESTION, [SAMPLE]).result()[0]) == "3"


def test_attention_maps_endpoint_returns_the_grid(space):
    with Image.open(space.predict(handle_file(str(SAMPLE)), api_name="/attention_maps")) as grid:
        assert grid.format == "PNG"
        assert grid.width == 3 * 224
