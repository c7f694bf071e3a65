"""`dense-connector train` (also as `python -m dense_connector.training`) and `check-data` as users run them: bad
records listed one line each before anything is written, `--skip_bad_records`, recipes (bundled, and one with a
weighted mixture of a JSON file and a local parquet dataset made with `datasets`), Hub-style datasets with embedded
images (also streamed) or image paths, a text-only language model refused in one line, the length check, progress
metrics, the loss curve and an evaluation task while training."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_training import CONFIG, save_tiny_checkpoint, write_dataset
from tiny import REPO, tiny_processor

from dense_connector.chat_templates import CHAT_TEMPLATES
from dense_connector.checkpoints import UsageError
from dense_connector.training import command
from dense_connector.training.options import bundled_recipes, parse_options
from dense_connector.training.sources import Mixture


COMMON = ["--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--save_strategy", "no", "--report_to",
          "none", "--use_cpu", "--seed", "0", "--logging_steps", "1", "--disable_tqdm", "true"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "base"
    save_tiny_checkpoint(folder, tiny_processor(CONFIG, chat_template=CHAT_TEMPLATES["vicuna_v1"]))
    return folder


def run_command(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    """`dense-connector ARGS`, or with `module` `python -m dense_connector.training ARGS[1:]` (what `accelerate
    launch -m dense_connector.training` runs)."""
    if module:
        command = [sys.executable, "-m", "dense_connector.training", *args[1:]]
    else:
        command = [str(Path(sys.executable).with_name("dense-connector")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def bad_dataset(folder: Path) -> Path:
    """Two good records and one of each kind of mistake, all with ids."""
    data = write_dataset(folder, 2)
    good = json.loads(data.read_text())
    (folder / "broken.png").write_bytes(b"not a png")
    caption = good[0]["conversations"]
    records = [
        {"id": "good-0", **good[0]},
        {"id": "typo-key", "image": "0.png", "conversation": caption},
        {"id": "typo-image", "imgae": "0.png", "conversations": caption},
        {"id": "missing-file", "image": "nowhere.png", "conversations": caption},
        {"id": "not-an-image", "image": "broken.png", "conversations": caption},
        {"id": "bad-speaker", "image": "0.png", "conversations": [caption[0], {"from": "bot", "value": "x"}]},
        {"id": "no-reply", "image": "0.png", "conversations": caption[:1]},
        {"id": "two-images", "image": ["0.png", "1.png"], "conversations": caption},
        {"id": "good-1", **good[1]},
    ]
    data.write_text(json.dumps(records))
    return data


EXPECTED_LINES = [
    "record 1 (id='typo-key'): `conversations`: missing (is `conversation` a typo of `conversations`?)",
    "record 2 (id='typo-image'): `image`: missing (is `imgae` a typo of `image`?), but the text has 1 <image>",
    "record 3 (id='missing-file'): `image`: ",
    "record 4 (id='not-an-image'): `image`: ",
    "record 5 (id='bad-speaker'): `conversations[1].from`: 'bot' is not a speaker; use human, gpt or system",
    "record 6 (id='no-reply'): `conversations`: has no `gpt` turn to train on",
    "record 7 (id='two-images'): `image`: 2 image(s) but 1 <image> placeholder(s) in the text",
]


def test_bad_records_are_named_one_line_each_and_nothing_is_written(base, tmp_path, capsys):
    data = bad_dataset(tmp_path / "data")
    output = tmp_path / "out"
    args = ["--model_name_or_path", str(base), "--data_path", str(data), "--image_folder", str(data.parent)]
    result = run_command("train", *args, "--output_dir", str(output), "--max_steps", "1", *COMMON)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if " record " in line and "`" in line]
    assert len(lines) == len(EXPECTED_LINES), lines
    for line, expected in zip(lines, EXPECTED_LINES):
        assert line.startswith(f"{data} {expected}"), line
    assert "nowhere.png is not found; check --image_folder" in lines[2]
    assert "broken.png is not an image Pillow can read" in lines[3]
    assert result.stderr.strip().splitlines()[-1] == (
        "dense-connector train: error: 7 of 9 records cannot be trained on (listed above); fix them, or pass "
        "--skip_bad_records to train on the others"
    )
    assert "Traceback" not in result.stderr and not output.exists()

    # check-data: the same lines on stdout, exit code 1
    assert command.main([*args, "--check_workers", "1"], "check-data") == 1
    captured = capsys.readouterr()
    assert [line.removeprefix(f"{data} ") for line in captured.out.splitlines()] == [
        line.removeprefix(f"{data} ") for line in lines
    ]
    assert "9 records checked" in captured.err and "7 bad" in captured.err


def test_skip_bad_records_trains_on_the_rest_and_lists_them(base, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = bad_dataset(tmp_path / "data")
    output = tmp_path / "out"
    args = ["--model_name_or_path", str(base), "--data_path", str(data), "--image_folder", str(data.parent)]
    trainer = command.train([*args, "--output_dir", str(output), "--max_steps", "2", "--skip_bad_records", *COMMON])
    assert len(trainer.train_dataset) == 2 and trainer.state.global_step == 2
    skipped = (output / "skipped_records.txt").read_text().splitlines()
    assert len(skipped) == len(EXPECTED_LINES)
    for line, expected in zip(skipped, EXPECTED_LINES):
        assert line.startswith(f"{data} {expected}"), line
    assert "skipped 7 bad records" in caplog.text and "skipped " + skipped[0] in caplog.text
    # progress in the logs, the loss curve in the output folder
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["tokens_per_second"] > 0 and entry["samples_per_second"] > 0
        assert entry["image_tokens_per_second"] > 0 and entry["text_tokens_per_second"] > 0
        assert entry["tokens_per_second"] == pytest.approx(
            entry["text_tokens_per_second"] + entry["image_tokens_per_second"], abs=0.2
        )
    assert logs[-1]["eta_seconds"] == 0 and "ETA 0:00:00" in caplog.text
    with Image.open(output / "loss_curve.png") as curve:
        assert curve.size[0] > 300


def test_a_failed_run_leaves_no_output_folder_and_a_text_only_model_is_pointed_at_build(base, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", 2)
    output = tmp_path / "out"
    args = ["--data_path", str(data), "--image_folder", str(data.parent), "--output_dir", str(output), *COMMON]
    missing = str(tmp_path / "no-checkpoint")
    assert command.main(["--model_name_or_path", str(base), *args, "--resume_from_checkpoint", missing]) == 1
    assert "Can't find a valid checkpoint" in capsys.readouterr().err and not output.exists()

    from transformers import LlamaConfig

    LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "llama"
    )
    assert command.main(["--model_name_or_path", str(tmp_path / "llama"), *args]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is a text-only language model (llama); make a Dense Connector model" in error[0]
    assert (
        f"dense-connector build --vision-tower openai/clip-vit-large-patch14-336 --language-model {tmp_path}"
        in (error[0])
    )
    assert not output.exists()


def test_bundled_recipes_and_flags_overriding_them(tmp_path, capsys):
    assert set(bundled_recipes()) == {"stage1", "stage2"}
    assert command.main(["--list_recipes"]) == 0
    assert "stage1\t" in capsys.readouterr().out
    cpu = ["--use_cpu", "--bf16", "false", "--tf32", "false", "--output_dir", str(tmp_path / "o")]
    model_args, data_args, training_args, _ = parse_options(
        ["--config", "stage1", *cpu, "--learning_rate", "5e-4"], "t"
    )
    assert (model_args.tune, data_args.version, training_args.save_projector_only) == ("projector", "plain", True)
    assert training_args.learning_rate == 5e-4 and training_args.per_device_train_batch_size == 32
    model_args, data_args, training_args, _ = parse_options(["--config", "stage2", *cpu], "t")
    assert (model_args.tune, data_args.version, training_args.learning_rate) == ("projector+lm", "v1", 2e-5)
    assert training_args.group_by_modality_length and training_args.lr_scheduler_type == "cosine"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1.0e-3\nlerning_rate: 2\n")
    with pytest.raises(UsageError, match="`lerning_rate` is not an option of this command"):
        parse_options(["--config", str(recipe), *cpu], "t")


def test_a_mixture_draws_in_proportion_to_the_weights():
    mixture = Mixture([list(range(100)), list(range(1000, 1030))], [0.7, 0.3], seed=0)
    assert len(mixture) == 130 and mixture.counts() == [91, 39]
    drawn = [mixture[index] for index in range(len(mixture))]
    assert len(set(drawn[:0] + [x for x in drawn if x < 1000])) == 91  # fewer than it has: no repeats
    assert set(x for x in drawn if x >= 1000) == set(range(1000, 1030))  # more than it has: all, then repeats


def chat_parquet(folder: Path, count: int = 4) -> Path:
    """TRL's `messages` + `images` columns with the images embedded, written as parquet by `datasets`."""
    from datasets import Dataset, Features, Image, List, Value

    item = {"type": Value("string"), "text": Value("string")}
    features = Features({"messages": List({"role": Value("string"), "content": List(item)}), "images": List(Image())})
    rows = {"messages": [], "images": []}
    for index in range(count):
        rows["messages"].append([
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": ("red", "blue")[index % 2]}]},
        ])  # fmt: skip
        rows["images"].append([Image().encode_example(PILImage.new("RGB", (40, 32), (200, 30 * index, 30)))])
    folder.mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(folder / "train.parquet")
    return folder


PILImage = Image


def test_a_recipe_with_a_mixture_of_a_json_file_and_a_parquet_dataset(base, tmp_path):
    data = write_dataset(tmp_path / "data", 6)
    parquet = chat_parquet(tmp_path / "parquet")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""# a mixture
model_name_or_path: {base}
tune: projector
max_steps: 50
datasets:
  - {{data_path: {data}, image_folder: {data.parent}, weight: 0.7}}
  - {{dataset_name: {parquet}, weight: 0.3}}
""")
    output = tmp_path / "out"
    args = ["--config", str(recipe), "--max_steps", "2", "--output_dir", str(output), *COMMON]
    result = run_command("train", *args, module=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixture of 10 records an epoch" in result.stderr and f"{parquet}: 3" in result.stderr
    assert f"{parquet}: 4 records checked" in result.stderr
    state = (
        json.loads((output / "trainer_state.json").read_text()) if (output / "trainer_state.json").exists() else None
    )
    assert (output / "model.safetensors").is_file() and (output / "loss_curve.png").is_file(), state
    assert "step 2/2:" in result.stderr and "tokens/s (text" in result.stderr


def test_hub_style_datasets_llava_columns_streaming_and_the_shapes_eval_task(base, tmp_path):
    from datasets import Dataset, Features, Image, Value

    conversation = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]
    rows = {"id": [f"r{i}" for i in range(4)], "conversations": [conversation] * 4,
            "image": [PILImage.new("RGB", (32, 32), (200, 10 * i, 30)) for i in range(4)]}  # fmt: skip
    features = Features({"id": Value("string"), "conversations": [{"from": Value("string"), "value": Value("string")}],
                         "image": Image()})  # fmt: skip
    Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "saved")
    args = ["--model_name_or_path", str(base), "--max_steps", "2", *COMMON]
    trainer = command.train([*args, "--dataset_name", str(tmp_path / "saved"), "--output_dir", str(tmp_path / "a"),
                             "--eval_task", "shapes", "--eval_steps", "2", "--eval_samples", "4"])  # fmt: skip
    scores = [
        entry["eval_shapes_exact_match"] for entry in trainer.state.log_history if "eval_shapes_exact_match" in entry
    ]
    assert len(scores) == 1 and 0 <= scores[0] <= 1
    assert any("eval_loss" in entry for entry in trainer.state.log_history)

    parquet = chat_parquet(tmp_path / "parquet")
    trainer = command.train(
        [*args, "--dataset_name", str(parquet), "--streaming", "--output_dir", str(tmp_path / "b")]
    )
    assert trainer.state.global_step == 2
    with pytest.raises(UsageError, match="--streaming needs --max_steps"):
        command.train([*args[:1], str(base), *COMMON, "--dataset_name", str(parquet), "--streaming",
                       "--output_dir", str(tmp_path / "c")])  # fmt: skip
    with pytest.raises(UsageError, match="has no `messages` .* or `conversations`"):
        Dataset.from_dict({"text": ["a"]}).to_parquet(tmp_path / "text" / "train.parquet")
        command.train([*args, "--dataset_name", str(tmp_path / "text"), "--output_dir", str(tmp_path / "d")])
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_the_length_check_refuses_records_whose_images_or_first_reply_do_not_fit():
    from dense_connector.training.checks import RecordChecker, check_records

    processor = tiny_processor(CONFIG, chat_template=CHAT_TEMPLATES["vicuna_v1"])
    picture = PILImage.new("RGB", (32, 32))
    short = {
        "image": picture,
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}],
    }
    long_question = {"conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "Yo"}]}
    long_reply = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "word " * 200}]}
    records = [short, long_question, long_reply]
    fits = check_records(records, RecordChecker(processor, 1000), "mix", workers=1)
    assert not fits.bad and fits.truncated == 0
    report = check_records(records, RecordChecker(processor, 140), "mix", workers=1)
    assert [(bad.index, bad.field) for bad in report.bad] == [(0, "image"), (1, "conversations")]
    # the system prompt and 64 placeholders: about 148 tokens
    assert "its image placeholders end at about token" in report.bad[0].message
    assert "its first reply starts at about token" in report.bad[1].message
    assert report.truncated == 1  # the long reply: truncated, still trained
    # the estimate is close to what the collator makes
    from dense_connector.training import DenseConnectorDataCollator

    actual = DenseConnectorDataCollator(processor)([short])["input_ids"].shape[1]
    assert not check_records([short], RecordChecker(processor, actual + 3), "s", workers=1).bad
    assert check_records([short], RecordChecker(processor, actual - 12), "s", workers=1).bad


def test_check_data_on_a_dataset_whose_images_are_paths(base, tmp_path, capsys):
    from datasets import Dataset

    data = write_dataset(tmp_path / "data", 3)
    rows = json.loads(data.read_text())
    Dataset.from_list(rows).to_parquet(tmp_path / "paths" / "train.parquet")
    args = ["--model_name_or_path", str(base), "--dataset_name", str(tmp_path / "paths")]
    assert command.main([*args, "--image_folder", str(data.parent)], "check-data") == 0
    assert "3 records checked" in capsys.readouterr().err
    assert command.main([*args, "--image_folder", str(tmp_path)], "check-data") == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and f"{tmp_path / 'paths'} record 0: `image`: {tmp_path / '0.png'} is not found" in lines[0]


def test_streamed_bad_records_are_skipped_into_the_skipped_file(base, tmp_path):
    from datasets import Dataset

    good = [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "red"}]
    no_reply = [{"from": "human", "value": "Color?"}]
    folder = tmp_path / "data"
    folder.mkdir()
    Dataset.from_dict({"conversations": [good, no_reply, good, good, good]}).to_parquet(folder / "train.parquet")
    args = ["--model_name_or_path", str(base), "--max_steps", "2", *COMMON, "--dataset_name", str(folder),
            "--streaming"]  # fmt: skip
    with pytest.raises(command.DataError, match="record 1: .* no `gpt` turn .*--skip_bad_records skips such records"):
        command.train([*args, "--output_dir", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()
    trainer = command.train([*args, "--skip_bad_records", "--output_dir", str(tmp_path / "b")])
    assert trainer.state.global_step == 2
    lines = (tmp_path / "b" / "skipped_records.txt").read_text().splitlines()
    assert len(lines) == 1 and "record 1" in lines[0], lines
