"""`dense-connector eval` in the authors' LLaVA format, and the benchmark table, with the bundled demo checkpoint.

Answers must equal transformers' own `generate` run one question at a time; batch sizes must not change them. The
lmms-eval path runs in its own environment (`make test-eval`, tests/integrations/test_lmms_eval.py).
"""

import json
import shutil
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import REPO
from transformers import AutoModelForImageTextToText, AutoProcessor

from dense_connector.cli import main
from dense_connector.evaluation import load_pretrained
from dense_connector.evaluation.benchmarks import (
    REPORTED,
    cache_dir_for,
    identify_release,
    markdown_table,
    parse_benchmarks,
    scores_from_results,
)
from dense_connector.evaluation.demo_tasks import write_demo_data
from dense_connector.evaluation.llava_format import chunk, model_id


CHECKPOINT = REPO / "dense_connector" / "demo" / "checkpoint"
ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    folder = write_demo_data(tmp_path_factory.mktemp("demo"), num_images=12)[0]
    return folder, [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines()]


def reference_answers(questions: list[dict], image_folder) -> list[str]:
    """transformers' own generate, one question at a time, greedy, the image before the question."""
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT).eval()
    answers = []
    for record in questions:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["text"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(
            images=Image.open(image_folder / record["image"]).convert("RGB"), text=prompt, return_tensors="pt"
        )
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=128, do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers


def run_eval(demo_folder, answers_file, *extra: str) -> list[dict]:
    argv = ["eval", "--model", str(CHECKPOINT), "--question-file", str(demo_folder / "questions.jsonl")]
    argv += ["--image-folder", str(demo_folder / "images"), "--answers-file", str(answers_file), "--no-progress"]
    assert main([*argv, *extra]) == 0
    return [json.loads(line) for line in answers_file.read_text().splitlines()]


def test_answers_equal_generate_one_by_one_at_batch_sizes_1_and_8(demo_files, tmp_path):
    folder, questions = demo_files
    expected = reference_answers(questions, folder / "images")
    batched = run_eval(folder, tmp_path / "b8.jsonl", "--batch-size", "8")
    single = run_eval(folder, tmp_path / "b1.jsonl", "--batch-size", "1")
    assert [a["text"] for a in batched] == expected
    assert [a["text"] for a in single] == expected
    gold = [json.loads(line)["answer"] for line in (folder / "expected.jsonl").read_text().splitlines()]
    assert sum(a == g for a, g in zip(expected, gold)) >= len(gold) - 2  # the demo model knows these questions


def test_answer_file_has_the_original_format(demo_files, tmp_path):
    folder, questions = demo_files
    answers = run_eval(folder, tmp_path / "out" / "answers.jsonl")  # the parent folder is created
    assert [list(a) for a in answers] == [ANSWER_KEYS] * len(questions)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert [a["prompt"] for a in answers] == [q["text"] for q in questions]
    assert {a["model_id"] for a in answers} == {"checkpoint"}
    assert len({a["answer_id"] for a in answers}) == len(answers)
    assert all(a["metadata"] == {} for a in answers)


def test_chunks_split_like_the_original_and_merge_back(demo_files, tmp_path):
    folder, _ = demo_files
    whole = run_eval(folder, tmp_path / "all.jsonl")
    parts = [run_eval(folder, tmp_path / f"3_{k}.jsonl", "--num-chunks", "3", "--chunk-idx", str(k)) for k in range(3)]
    assert [len(part) for part in parts] == [4, 4, 4]
    merged = [a for part in parts for a in part]
    assert [(a["question_id"], a["text"]) for a in merged] == [(a["question_id"], a["text"]) for a in whole]


def test_chunk_sizes():
    assert [chunk(list(range(10)), 4, k) for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert chunk(list(range(2)), 4, 3) == []  # more chunks than questions: the last ones are empty
    with pytest.raises(ValueError, match="outside 0..3"):
        chunk([1], 4, 4)


def test_model_id_follows_the_original():
    assert model_id("/data/DenseConnector-v1.5-7B/") == "DenseConnector-v1.5-7B"
    assert model_id("runs/lora-7b/checkpoint-500") == "lora-7b_checkpoint-500"


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"question_id": 1}', "lacks text"), ("not json", "is not a JSON record")],
)
def test_bad_question_file_is_one_clear_error(tmp_path, capsys, line, message):
    questions = tmp_path / "q.jsonl"
    questions.write_text(line + "\n")
    argv = ["eval", "--model", str(CHECKPOINT), "--question-file", str(questions), "--answers-file", "a.jsonl"]
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_missing_answers_file_or_model_is_a_usage_error(tmp_path, capsys):
    assert main(["eval", "--question-file", "q.jsonl"]) == 1
    assert "give --model" in capsys.readouterr().err
    assert main(["eval", "--model", str(CHECKPOINT), "--question-file", "q.jsonl"]) == 1
    assert "give --answers-file" in capsys.readouterr().err


def test_incomplete_checkpoint_is_refused_not_scored(tmp_path, capsys):
    """transformers would only warn and initialise the missing tensor at random; eval and the lmms-eval model (both
    load through `load_pretrained`) refuse the checkpoint instead, naming the tensor."""
    incomplete = tmp_path / "incomplete"
    shutil.copytree(CHECKPOINT, incomplete)
    tensors = load_file(incomplete / "model.safetensors")
    del tensors["model.connector.projector.0.bias"]
    save_file(tensors, incomplete / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: model\.connector\.projector\.0\.bias"):
        load_pretrained(str(incomplete))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "Why?"}) + "\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    argv = ["eval", "--model", str(incomplete), "--question-file", str(questions), "--answers-file",
            str(tmp_path / "answers.jsonl"), "--image-folder", str(tmp_path)]  # fmt: skip
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dense-connector: error: ") and "is incomplete or does not match its config" in error
    assert not (tmp_path / "answers.jsonl").exists()


def test_releases_are_recognised_from_names_and_model_cards(tmp_path):
    assert identify_release("HuanjinYao/DenseConnector-v1.5-13B") == "DenseConnector-v1.5-13B"
    assert identify_release("x/DenseConnector-v1.5-SigLIP-7B-AnyRes") == "DenseConnector-v1.5-SigLIP-7B-AnyRes"
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "README.md").write_text(
        "Converted from the original Dense Connector checkpoint `HuanjinYao/DenseConnector-v1.5-8B`"
    )
    assert identify_release(str(converted)) == "DenseConnector-v1.5-8B"
    assert identify_release(str(CHECKPOINT)) is None
    assert identify_release(str(CHECKPOINT), "DenseConnector-v1.5-7B") == "DenseConnector-v1.5-7B"
    with pytest.raises(ValueError, match="not one of the authors' releases"):
        identify_release(str(CHECKPOINT), "LLaVA-1.5-7B")


def test_table_puts_reported_numbers_beside_ours():
    names = parse_benchmarks("gqa,mmmu,mme")
    results = {"results": {"gqa": {"exact_match,none": 0.6512}, "mmmu_val": {"mmmu_acc,none": 0.35}, "mme": {}}}
    scores = scores_from_results(results, names, ["gqa", "mmmu_val", "mme"])
    assert scores == {"GQA": 65.12, "MMMU": 35.0, "MME": None}
    table = markdown_table(scores, "dc-7b", "DenseConnector-v1.5-7B").splitlines()
    assert table[0] == "| model | GQA | MMMU | MME |"
    assert table[2] == "| dc-7b (this run) | 65.12 | 35 | – |"
    assert table[3] == "| DenseConnector-v1.5-7B (reported) | 64.4 | 36.7 | – |"
    assert len(markdown_table(scores, "demo", None).splitlines()) == 3
    assert all(len(numbers) == 8 for numbers in REPORTED.values())


def test_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match="unknown benchmark"):
        parse_benchmarks("gqa,vqav9")
    assert parse_benchmarks("paper")[:3] == ["textvqa", "sqa", "gqa"]


def test_gpus_run_one_process_per_chunk_and_merge_in_order(demo_files, tmp_path):
    """`--gpus 0,1`: two processes (on CPU here, CUDA_VISIBLE_DEVICES set for each), chunk files merged in order."""
    folder, _ = demo_files
    whole = run_eval(folder, tmp_path / "all.jsonl")
    merged = run_eval(folder, tmp_path / "merged.jsonl", "--gpus", "0,1")
    assert [(a["question_id"], a["text"]) for a in merged] == [(a["question_id"], a["text"]) for a in whole]
    assert sorted(path.name for path in (tmp_path / "merged.chunks").iterdir()) == ["2_0.jsonl", "2_1.jsonl"]


def test_each_copy_of_a_dataset_gets_its_own_cache(tmp_path):
    """`datasets` keys a local folder's cache by the folder's name: a stand-in `gqa` and the real one must not meet."""
    first, second = tmp_path / "a" / "gqa", tmp_path / "b" / "gqa"
    for folder, rows in ((first, "1\n"), (second, "1\n2\n")):
        (folder / "testdev_balanced_instructions").mkdir(parents=True)
        (folder / "testdev_balanced_instructions" / "testdev.csv").write_text(rows)
    tasks = tmp_path / "out" / "tasks"
    assert cache_dir_for(first, tasks) != cache_dir_for(second, tasks)
    assert cache_dir_for(first, tasks) == cache_dir_for(first, tasks)
    before = cache_dir_for(second, tasks)
    (second / "testdev_balanced_instructions" / "testdev.csv").write_text("1\n2\n3\n")
    assert cache_dir_for(second, tasks) != before  # rewritten in place: a new cache
    assert cache_dir_for(first, tasks).parent == tmp_path / "out" / "datasets-cache"


def test_benchmarks_without_lmms_eval_say_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as in an environment without the eval extra
    assert main(["eval", "--model", str(CHECKPOINT), "--benchmarks", "pope"]) == 1
    assert 'pip install -e ".[eval]"' in capsys.readouterr().err


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--question-file", "q.jsonl", "--answers-file", "a.jsonl"]) == 1
    assert "has no config.json" in capsys.readouterr().err


def test_nothing_half_written(demo_files, tmp_path, capsys):
    """A missing image is reported before the model loads; a run stopped midway (an unreadable image in the second
    batch) leaves no partial answer file, and an earlier complete one untouched: the file is written atomically."""
    folder, questions = demo_files
    images = tmp_path / "images"
    shutil.copytree(folder / "images", images)
    answers = tmp_path / "answers.jsonl"
    argv = ["eval", "--model", str(CHECKPOINT), "--question-file", str(folder / "questions.jsonl")]
    argv += ["--image-folder", str(images), "--answers-file", str(answers), "--no-progress", "--batch-size", "2"]
    (images / questions[5]["image"]).unlink()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"question {questions[5]['question_id']}: image" in err and "1 of 12" in err
    assert "loading" not in err and not answers.exists()
    (images / questions[5]["image"]).write_text("not an image")
    answers.write_text("an earlier, complete file\n")
    assert main(argv) == 1
    assert answers.read_text() == "an earlier, complete file\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["answers.jsonl", "images"]
