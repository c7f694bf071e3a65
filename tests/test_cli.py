"""The `dense-connector` command line: chat, interactive chat, demo, convert delegation, one-line errors, a fast
`--help`, `--version`, descriptions for every subcommand."""

import contextlib
import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import FIXTURES
from transformers import AutoModelForImageTextToText, AutoProcessor

import dense_connector
from dense_connector import chat_command, checkpoints, cli
from dense_connector.conversion import convert_checkpoint


@pytest.fixture(scope="module")
def reply(folder):
    """The reference answer to a conversation: `apply_chat_template` + greedy `generate`, stripped."""
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)

    def answer(messages: list[dict], max_new_tokens: int = 6) -> str:
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    return answer


def user(text: str, *paths: Path) -> dict:
    images = [{"type": "image", "image": Image.open(path).convert("RGB")} for path in paths]
    return {"role": "user", "content": images + [{"type": "text", "text": text}]}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_prints_the_answer_and_progress(capsys, folder, image_paths, reply):
    code, out, err = run(capsys, "chat", "--model", folder, "--image", image_paths[0], "--max-new-tokens", 6, "What?")
    assert code == 0
    assert out.strip() == reply([user("What?", image_paths[0])]) != ""
    assert f"loading {folder} ..." in err and "loaded in" in err


def test_chat_on_a_converted_original_checkpoint_answers_like_the_original(capsys, tmp_path):
    """Convert the clip_dci fixture, ask its recorded question: the original's greedy answer, word for word."""
    fixture = FIXTURES / "clip_dci"
    meta = json.loads((fixture / "meta.json").read_text())
    converted = convert_checkpoint(
        fixture / "original", tmp_path / "converted", vision_tower=fixture / "vision_tower", progress=False
    )
    question = meta["prompt"].split("<image>\n")[1].removesuffix(" ASSISTANT:")
    argv = ["chat", "--model", converted, "--image", fixture / "image0.png", "--max-new-tokens", 12, question]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert out == meta["generated_text"] + "\n"


def test_chat_with_several_images_in_order(capsys, folder, image_paths, reply):
    images = ["--image", image_paths[1], "--image", image_paths[2]]
    code, out, _ = run(capsys, "chat", "--model", folder, *images, "--max-new-tokens", 6, "Compare them.")
    assert code == 0
    assert out.strip() == reply([user("Compare them.", image_paths[1], image_paths[2])])


def test_chat_with_an_image_url(capsys, folder, image_paths):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_paths[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{image_paths[0].name}"
    try:
        answers = [
            run(capsys, "chat", "--model", folder, "--image", image, "--max-new-tokens", 4, "What?")[1]
            for image in (url, image_paths[0])
        ]
    finally:
        server.shutdown()
    assert answers[0] == answers[1]


def test_temperature_samples(capsys, folder, image_paths):
    def answer(seed: int, temperature: float) -> str:
        torch.manual_seed(seed)
        argv = ["chat", "--model", folder, "--image", image_paths[0], "--max-new-tokens", 8]
        return run(capsys, *argv, "--temperature", temperature, "What?")[1]

    greedy = answer(0, 0)
    sampled = [answer(seed, 5.0) for seed in range(2)]
    assert answer(0, 5.0) == sampled[0]
    assert len({greedy, *sampled}) == 3


def test_interactive_keeps_the_conversation(capsys, monkeypatch, folder, image_paths, reply):
    monkeypatch.setattr(sys, "stdin", io.StringIO("And the colour?\nexit\nignored?\n"))
    argv = ["chat", "--model", folder, "--image", image_paths[0], "--max-new-tokens", 6, "--interactive", "What?"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    messages = [user("What?", image_paths[0])]
    first = reply(messages)
    messages += [{"role": "assistant", "content": first}, user("And the colour?")]
    assert out.splitlines() == [first, reply(messages)]


@pytest.mark.parametrize(
    ("first", "lines", "expected"),
    [
        ("Hi?", "a\nexit\nb\n", ["Hi?", "a"]),
        (None, "a\n QUIT \nb\n", ["a"]),
        (None, "a\n\nb\n", ["a"]),
        ("Hi?", "a\nb", ["Hi?", "a", "b"]),
    ],
    ids=["exit", "quit", "empty_line", "eof"],
)
def test_interactive_questions_end_at_exit_empty_line_or_eof(monkeypatch, first, lines, expected):
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert list(chat_command.read_questions(first)) == expected


@contextlib.contextmanager
def fake_bundle(checkpoint: Path, sample: Path):
    yield checkpoint, sample


def test_demo_uses_the_bundled_checkpoint_and_image(capsys, monkeypatch, folder, image_paths, reply):
    monkeypatch.setattr(chat_command, "bundled_demo", lambda: fake_bundle(folder, image_paths[2]))
    code, out, err = run(capsys, "demo")
    assert code == 0
    # Without --max-new-tokens the checkpoint's generation config (max_new_tokens=8) decides.
    assert out.strip() == reply([user(chat_command.DEMO_QUESTION, image_paths[2])], max_new_tokens=8)
    assert out.strip() != reply([user(chat_command.DEMO_QUESTION, image_paths[2])], max_new_tokens=6)
    assert "asking" in err


def test_demo_overrides_and_missing_bundle(capsys, monkeypatch, tmp_path, folder, image_paths, reply):
    missing = tmp_path / "checkpoint", tmp_path / "sample.png"
    monkeypatch.setattr(chat_command, "bundled_demo", lambda: fake_bundle(*missing))
    code, _, err = run(capsys, "demo")
    assert code == 1
    expected = f"the demo checkpoint is not bundled with this install (expected {tmp_path / 'checkpoint'})"
    assert err == f"dense-connector: error: {expected}\n"
    argv = ["demo", "--model", folder, "--image", image_paths[1], "--max-new-tokens", 6, "Which shape?"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.strip() == reply([user("Which shape?", image_paths[1])])


def test_bundled_demo_is_package_data():
    with chat_command.bundled_demo() as (checkpoint, sample):
        package = Path(dense_connector.__file__).parent
        assert (checkpoint, sample) == (package / "demo" / "checkpoint", package / "demo" / "sample.png")


def test_convert_runs_the_conversion_command_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: dense-connector convert [-h] --original ORIGINAL")
    code, out, err = run(capsys, "convert", "--original", tmp_path / "missing", "--output", tmp_path / "out")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("dense-connector: error: ") and str(tmp_path / "missing") in err
    with pytest.raises(chat_command.UsageError, match="neither a local folder nor a Hub repository id"):
        cli.main(["convert", "--debug", "--original", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_image", "image not found: {tmp}/missing.png"),
        ("not_an_image", "{tmp}/notes.txt is not an image that Pillow can read"),
        ("no_config", "{tmp} is not a Hugging Face checkpoint folder (it has no config.json)"),
        ("missing_folder", "no such folder: {tmp}/nowhere"),
        ("mistyped_folder", "no such folder: dense-connector-7b (and not a Hub id, owner/name)"),
        ("image_folder", "{tmp} is a folder; give one image file per --image"),
        ("blank_question", "the question is blank"),
        ("original_checkpoint", "is an original Dense Connector checkpoint; convert it first with"),
        ("other_model", "is a 'clip_vision_model' checkpoint, not a Dense Connector one"),
        (
            "incomplete",
            "is incomplete or does not match its config (missing tensors: model.connector.projector.0.bias",
        ),
        ("no_question", "give a question (or use --interactive)"),
    ],
)
def test_errors_are_one_clear_line(capsys, tmp_path, folder, image_paths, case, message):
    (tmp_path / "notes.txt").write_text("not an image")
    model, image, question = folder, image_paths[0], ["Why?"]
    if case == "missing_image":
        image = tmp_path / "missing.png"
    elif case == "not_an_image":
        image = tmp_path / "notes.txt"
    elif case == "no_config":
        model = tmp_path
    elif case == "missing_folder":
        model = tmp_path / "nowhere"
    elif case == "original_checkpoint":
        model = FIXTURES / "clip_dci" / "original"
    elif case == "other_model":
        model = FIXTURES / "clip_dci" / "vision_tower"
    elif case == "incomplete":  # transformers would only warn and initialise the missing tensor at random
        model = tmp_path / "incomplete"
        shutil.copytree(folder, model)
        tensors = load_file(model / "model.safetensors")
        del tensors["model.connector.projector.0.bias"]
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    elif case == "no_question":
        question = []
    elif case == "mistyped_folder":  # no ./ in front: not an owner/name Hub id either, so refused at once
        model = "dense-connector-7b"
    elif case == "image_folder":
        image = tmp_path
    elif case == "blank_question":
        question = ["   "]
    code, out, err = run(capsys, "chat", "--model", model, "--image", image, *question)
    assert code == 1 and out == ""
    *progress, error = err.splitlines()
    assert error.startswith("dense-connector: error: ") and message.format(tmp=tmp_path) in error
    progress = [line for line in progress if line and not line.startswith("Loading weights")]  # transformers' bar
    assert all(line.startswith("dense-connector: loading ") for line in progress), progress


def test_hub_checkpoint_in_the_original_format_gets_the_conversion_hint(capsys, monkeypatch, image_paths):
    downloads = []

    def fake_download(repo_id, filename):
        downloads.append((repo_id, filename))
        return str(FIXTURES / "clip_dci" / "original" / filename)

    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_download)
    code, out, err = run(
        capsys, "chat", "--model", "HuanjinYao/DenseConnector-v1.5-7B", "--image", image_paths[0], "Q"
    )
    assert code == 1 and out == ""
    assert downloads == [("HuanjinYao/DenseConnector-v1.5-7B", "config.json")]
    assert err.splitlines()[-1] == (
        "dense-connector: error: HuanjinYao/DenseConnector-v1.5-7B is an original Dense Connector checkpoint; convert "
        "it first with `dense-connector convert` and chat with the converted folder"
    )


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(chat_command.UsageError, match="image not found"):
        cli.main(["chat", "--debug", "--model", str(tmp_path), "--image", str(tmp_path / "missing.png"), "Why?"])


def test_installed_command_reports_an_unreachable_hub_id(tmp_path, image_paths):
    """The console script exists; an unreachable Hub id gives one line, exit code 1, no traceback."""
    command = Path(sys.executable).with_name("dense-connector")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [command, "chat", "--model", "no-such-org/no-such-model", "--image", image_paths[0], "What?"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "dense-connector: error: cannot load no-such-org/no-such-model from the Hugging Face Hub: "
    )


def test_help_imports_neither_torch_nor_transformers():
    """`dense-connector --help` and `--version` run without importing torch or transformers (the console script loads
    cli.py without the package); the time is printed, not asserted."""
    command = str(Path(sys.executable).with_name("dense-connector"))
    for flag in ("--help", "--version"):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-X", "importtime", command, flag], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        assert result.returncode == 0, result.stderr[-2000:]
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
        assert not imported & {"torch", "transformers", "dense_connector"}, sorted(imported)
        print(f"dense-connector {flag}: {seconds:.2f} s")
    assert result.stdout.strip() == f"dense-connector {metadata.version('dense-connector')}"
    help_text = subprocess.run([command, "--help"], capture_output=True, text=True).stdout
    for name, entry in cli.COMMANDS.items():
        assert f"    {name}" in help_text and entry.help.split()[0] in help_text


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_a_plain_description(capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dense-connector {name} ")
    description = " ".join(out.split("\n\n")[1].split())
    assert description == " ".join(cli.COMMANDS[name].description.split()), description
    # the training commands' own --debug is TrainingArguments'; theirs is --traceback (or `dense-connector --debug`)
    assert ("--traceback" if cli.COMMANDS[name].own_parser else "--debug") in out and "`" not in description


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "--model", "{missing}", "Why?"],
        ["demo", "--model", "{missing}"],
        ["eval", "--model", "{missing}"],
        ["web", "--model", "{missing}"],
        ["attention-maps", "--model", "{missing}", "--image", "{image}", "--output", "{tmp}/maps.png"],
        ["convert", "--original", "{missing}", "--output", "{tmp}/out"],
        ["build", "--vision-tower", "{missing}", "--language-model", "{missing}", "--output", "{tmp}/out"],
    ],
    ids=lambda argv: argv[0],
)
def test_a_missing_local_folder_is_refused_at_once_everywhere(capsys, monkeypatch, tmp_path, image_paths, argv):
    """A mistyped folder, with or without ./ (`runs/typo` under an existing `runs/`), is not taken for a Hub id:
    one line at once, no download attempt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(checkpoints, "hf_hub_download", lambda *a, **k: pytest.fail("tried the Hub"))
    for missing in ("dense-connector-7b", "runs/typo"):
        values = {"missing": missing, "image": image_paths[0], "tmp": tmp_path}
        code, out, err = run(capsys, *(arg.format(**values) for arg in argv))
        assert code == 1 and out == ""
        error = err.splitlines()[-1]
        assert error.startswith("dense-connector: error: ") and missing in error, err
        assert "neither a local folder nor a Hub repository id" in error or "no such folder" in error, error


def test_missing_extras_get_the_same_install_hint(capsys, monkeypatch):
    """The package is not on PyPI: every hint says to install the extra from the clone, in one form."""
    monkeypatch.setitem(sys.modules, "gradio", None)  # as without the web extra
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as without the eval extra
    with chat_command.bundled_demo() as (checkpoint, _):
        for argv, extra in ((["web"], "web"), (["eval", "--model", str(checkpoint)], "eval")):
            code, _, err = run(capsys, *argv)
            assert code == 1
            assert err.strip().endswith(f'pip install -e ".[{extra}]" in a clone of the repository'), err
