"""lmms-eval with the `dense_connector` model, offline, on the bundled demo checkpoint and synthetic local tasks.

Runs in lmms-eval's own environment (`make test-eval`: .venv-eval with the eval extra), never in `make test`.
Every answer lmms-eval records must equal transformers' own `generate` run one question at a time, at batch sizes 1
and 8, and the scores must be what those answers earn; the stock POPE and GQA task files run against local stand-ins;
and the demo commands of docs/evaluation.md run as written.
"""

import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager
from transformers import AutoModelForImageTextToText, AutoProcessor

from dense_connector.evaluation.demo_tasks import write_demo_data
from dense_connector.evaluation.shapes_task import TASK
from dense_connector.integrations.lmms_eval import DenseConnectorLMM


REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "dense_connector" / "demo" / "checkpoint"
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # the stock POPE and GQA tasks' post_prompt
LOCAL_TASKS = (TASK, "pope_local", "gqa_local")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """Nothing here may reach the Hub (fail instead of downloading), and no dataset comes from an older run's cache
    (`datasets` can hand back a cached table for a regenerated local folder)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets-cache")))
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval-data")
    write_demo_data(folder, num_images=8)
    return folder


@pytest.fixture(scope="module")
def lm():
    return DenseConnectorLMM(pretrained=str(CHECKPOINT), batch_size=1)


def reference(docs, suffix: str, max_new_tokens: int) -> list[str]:
    """transformers' own generate, one question at a time, greedy, image first, cut at lmms-eval's default `until`."""
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT).eval()
    answers = []
    for doc in docs:
        text = doc["question"] + suffix
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=doc["image"].convert("RGB"), text=prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        decoded = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(decoded.split("\n\n")[0].strip())
    return answers


@pytest.fixture(scope="module")
def expected(data) -> dict[str, list[str]]:
    gqa = load(data / "gqa", "testdev_balanced_instructions", "testdev")
    images = load(data / "gqa", "testdev_balanced_images", "testdev")
    images = dict(zip(images["id"], images["image"]))
    return {
        TASK: reference(load(data / TASK), "", max_new_tokens=8),
        "pope_local": reference(load(data / "pope"), SHORT_ANSWER, max_new_tokens=128),
        "gqa_local": reference([{**doc, "image": images[doc["imageId"]]} for doc in gqa], SHORT_ANSWER, 16),
    }


def plain(text: str) -> str:
    """GQA's exact match ignores case and punctuation."""
    return text.lower().translate(str.maketrans("", "", string.punctuation))


def load(folder: Path, config: str | None = None, split: str = "test"):
    return datasets.load_dataset(str(folder), config, split=split, cache_dir=os.environ["HF_DATASETS_CACHE"])


def evaluate(lm, data: Path) -> dict:
    manager = TaskManager(include_path=str(data / "tasks"), include_defaults=False)
    return simple_evaluate(model=lm, tasks=list(LOCAL_TASKS), task_manager=manager, log_samples=True)


def responses(output: dict, task: str) -> list[str]:
    return [sample["resps"][0][0] for sample in sorted(output["samples"][task], key=lambda s: s["doc_id"])]


def test_the_entry_point_registers_the_model():
    assert get_model("dense_connector") is DenseConnectorLMM


def test_unknown_model_args_are_refused():
    with pytest.raises(ValueError, match="Unknown model_args for dense_connector: revison"):
        DenseConnectorLMM(pretrained=str(CHECKPOINT), revison="main")


def test_answers_and_scores_equal_generate_one_by_one_at_batch_sizes_1_and_8(lm, data, expected):
    gold = load(data / TASK)["answer"]
    pope_gold = load(data / "pope")["answer"]
    for batch_size in (1, 8):
        lm.batch_size_per_device = batch_size
        output = evaluate(lm, data)
        for task in LOCAL_TASKS:
            assert responses(output, task) == expected[task], f"{task}, batch size {batch_size}"
        score = output["results"][TASK]["exact_match,none"]
        assert score == pytest.approx(sum(a == g for a, g in zip(expected[TASK], gold)) / len(gold))
        assert score >= 0.75  # the demo model answers most of its own questions
        pope_accuracy = sum(a.lower() == g for a, g in zip(expected["pope_local"], pope_gold)) / len(pope_gold)
        assert output["results"]["pope_local"]["pope_accuracy,none"] == pytest.approx(pope_accuracy)
        gqa_hits = [
            plain(a) == plain(g) for a, g in zip(expected["gqa_local"], gold)
        ]  # the same questions as dc_shapes
        gqa_accuracy = sum(gqa_hits) / len(gold)
        assert output["results"]["gqa_local"]["exact_match,none"] == pytest.approx(gqa_accuracy)


def documented_evaluation_commands() -> list[str]:
    """The bash blocks of docs/evaluation.md that run on the demo checkpoint (those naming it)."""
    blocks = re.findall(r"```bash\n(.*?)```", REPO.joinpath("docs", "evaluation.md").read_text(), flags=re.S)
    return [block for block in blocks if "dense_connector/demo/checkpoint" in block]


def test_documented_commands_run_offline_as_written(tmp_path):
    commands = documented_evaluation_commands()
    assert commands, "docs/evaluation.md lost its demo evaluation commands"
    (tmp_path / "dense_connector").symlink_to(REPO / "dense_connector")  # commands are written for the repo root
    env = {**os.environ, **OFFLINE, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        run = subprocess.run(
            ["bash", "-eo", "pipefail", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, f"{command}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    table = (tmp_path / "eval-results" / "scores.md").read_text().splitlines()
    assert table[0] == "| model | Shapes (demo) | POPE | GQA |"
    assert re.fullmatch(r"\| checkpoint \(this run\)( \| [\d.]+){3} \|", table[2])
    assert (tmp_path / "eval-results" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = (tmp_path / "eval-data" / "llava" / "answers-demo.jsonl").read_text().splitlines()
    assert len(answers) == len((tmp_path / "eval-data" / "llava" / "questions.jsonl").read_text().splitlines())


def test_data_parallel_processes_split_the_questions_and_give_the_same_answers(data, expected, tmp_path):
    """Two CPU processes under torchrun (as `accelerate launch` runs one per GPU): each answers half."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lmms_eval"]
    command += ["--model", "dense_connector", "--model_args", f"pretrained={CHECKPOINT}", "--batch_size", "4"]
    command += ["--tasks", ",".join(LOCAL_TASKS), "--include_path", str(data / "tasks"), "--log_samples"]
    command += ["--output_path", str(tmp_path)]
    run = subprocess.run(
        command, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Running on rank 1" in run.stdout + run.stderr
    for task in LOCAL_TASKS:
        (samples,) = tmp_path.rglob(f"*_samples_{task}.jsonl")
        records = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
        assert [r["filtered_resps"] for r in records] == expected[task]
