"""Servers for the web tests, started the way docs/web.md tells users to start them (as subprocesses)."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from saved_checkpoint import save_tiny_checkpoint


REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "dense_connector" / "demo" / "sample.png"
IMAGES = REPO / "docs" / "images"  # the screenshots the docs show are written by these tests
CLI = str(Path(sys.executable).parent / "dense-connector")
STARTUP_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running app: its URL, and its output so far (read after it stops)."""

    def __init__(self, command: list[str], port: int, log: Path, env: dict | None = None):
        self.url = f"http://127.0.0.1:{port}/"
        self.log = log
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        with log.open("w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=out, stderr=subprocess.STDOUT)
        self.started = time.perf_counter()
        self.wait_until_up()
        self.startup_s = time.perf_counter() - self.started

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the app exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"the app did not answer within {STARTUP_TIMEOUT} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory) -> Iterator[Server]:
    """`dense-connector web --port P`: the bundled demo checkpoint, as the docs start it."""
    port = free_port()
    server = Server([CLI, "web", "--port", str(port)], port, tmp_path_factory.mktemp("demo") / "log.txt")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def space_server(tmp_path_factory) -> Iterator[Server]:
    """`python app.py` with the port in Gradio's environment variable, as a Hugging Face Space runs it."""
    port = free_port()
    env = {"GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    server = Server([sys.executable, "app.py"], port, tmp_path_factory.mktemp("space") / "log.txt", env)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random checkpoint: it never says EOS early, so its answers are long enough to watch them stream."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_folder) -> Iterator[Server]:
    port = free_port()
    command = [CLI, "web", "--model", str(tiny_folder), "--port", str(port), "--device", "cpu"]
    server = Server(command, port, tmp_path_factory.mktemp("tiny-server") / "log.txt")
    yield server
    server.stop()
