"""`dense-connector web --openai-base-url`: the same UI as a client of an OpenAI-compatible server.

A small stand-in server (the standard library's, in this process) streams chat-completion chunks the way
`vllm serve` does and records what it was sent; `dense-connector web` runs as a subprocess in front of it.
"""

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import CLI, REPO, SAMPLE, Server, free_port
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError


class FakeOpenAI(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.reply(200, "application/json", json.dumps({"data": [{"id": "served-dc"}]}).encode())

    def do_POST(self) -> None:
        FakeOpenAI.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        chunks = [{"choices": [{"delta": {"content": piece}}]} for piece in ("Th", "ree", ".")]
        events = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
        self.reply(200, "text/event-stream", events.encode())

    def reply(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_ui_answers_through_the_server_and_reports_when_it_is_gone(fake_server, tmp_path):
    base_url = f"http://127.0.0.1:{fake_server.server_address[1]}/v1"
    port = free_port()
    app = Server([CLI, "web", "--openai-base-url", base_url, "--port", str(port)], port, tmp_path / "log.txt")
    try:
        client = Client(app.url, verbose=False)
        message = {"text": "How many shapes are there?", "files": [handle_file(str(SAMPLE))]}
        history = client.predict(message, 0.0, 1.0, 16, api_name="/chat")[0]
        assert history[-1]["content"][0]["text"] == "Three."
        sent = FakeOpenAI.requests[-1]
        assert sent["model"] == "served-dc" and sent["stream"] is True and sent["max_tokens"] == 16
        content = sent["messages"][-1]["content"]
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert content[1] == {"type": "text", "text": "How many shapes are there?"}

        fake_server.shutdown()
        fake_server.server_close()
        with pytest.raises(AppError, match="cannot reach"):
            client.predict({"text": "And now?", "files": []}, 0.0, 1.0, 16, api_name="/chat")
        assert app.process.poll() is None  # still serving
    finally:
        app.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/folder"], "no such folder"),
        (["--model", str(REPO / "docs")], "has no config.json"),
        (["--model", "x", "--openai-base-url", "http://127.0.0.1:1/v1"], "not both"),
    ],
)
def test_a_model_that_does_not_load_is_one_line_on_the_command_line(args, message):
    result = subprocess.run([CLI, "web", *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
