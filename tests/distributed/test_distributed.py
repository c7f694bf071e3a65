"""Two CPU processes (gloo) train the demo checkpoint with DDP, FSDP2 and DeepSpeed ZeRO-2/3, launched as users do
with `accelerate launch` and the configs of `examples/accelerate/`, on data where whole per-rank batches are text-only.

Each run's logged losses must equal a one-process run with the same global batch, and every full-model folder it saves
(final and `checkpoint-2`) must load as remote code, with the package blocked, holding the one-process run's weights.
FSDP and DeepSpeed go through `cpu_launch.py` (test-only; accelerate enables them only on GPU process groups).
Padding-free runs (DDP, FSDP2, ZeRO-3) must log the losses of the padded one-process run, and two `accelerate launch`es
as two machines of one process each (on loopback) those of one process, saving one folder.
Run with `make test-distributed`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import run_without_package


ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "dense_connector" / "demo" / "checkpoint"
ACCELERATE = Path(sys.executable).with_name("accelerate")
PATTERN = "IIII TTTT ITIT TTTT TTTT TITI"  # per-rank batches of 4: image-only, text-only and mixed
LORA = ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]

# (config, regime, activation checkpointing): every mode with and without checkpointing (the Trainer's or FSDP's own),
# every regime at least twice. LoRA under FSDP2/ZeRO-3 initialises its adapters on rank 0 from another random state
# than one process does, so that run is checked for training and saving, not for equal losses.
RUNS = [
    ("ddp", "projector+lm", "trainer"),
    ("ddp", "lora", None),
    ("fsdp", "projector+lm", "fsdp"),
    ("fsdp", "lora", "trainer"),
    ("deepspeed_zero2", "projector", None),
    ("deepspeed_zero3", "projector+lm", "trainer"),
    ("deepspeed_zero3", "lora", None),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    images = json.loads((ROOT / "examples" / "data" / "shapes_llava.json").read_text())
    texts = [
        {"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": str(2 * i)}]}
        for i in range(12)
    ]
    image_iter, text_iter = iter(images * 3), iter(texts * 2)
    records = [next(image_iter) if kind == "I" else next(text_iter) for kind in PATTERN.replace(" ", "")]
    path = tmp_path_factory.mktemp("data") / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def finetune_args(data: Path, output: Path, tune: str, batch: int) -> list[str]:
    return [
        str(ROOT / "examples" / "finetune.py"),
        "--model_name_or_path", str(CHECKPOINT),
        "--data_path", str(data), "--image_folder", str(ROOT / "examples" / "data"),
        "--tune", tune, "--output_dir", str(output),
        "--max_steps", "3", "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-3",
        "--train_sampling_strategy", "sequential", "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none", "--use_cpu", "--seed", "0",
        *(LORA if tune == "lora" else []),
    ]  # fmt: skip


def run(command: list[str], env_extra: dict | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def losses(output: Path) -> list[float]:
    history = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


_references: dict[str, Path] = {}


def reference(data: Path, tmp_path_factory, tune: str) -> Path:
    """One process, global batch 8 (cached per regime)."""
    if tune not in _references:
        output = tmp_path_factory.mktemp(f"reference-{tune.replace('+', '-')}")
        run([sys.executable, *finetune_args(data, output, tune, 8)])
        _references[tune] = output
    return _references[tune]


def model_files(folder: Path) -> list[str]:
    """The files of a saved model (weights, config, code, processor), not the trainer's state."""
    suffixes = (".json", ".safetensors", ".py", ".jinja")
    return sorted(p.name for p in folder.iterdir() if p.suffix in suffixes and p.name != "trainer_state.json")


COMPARE_WEIGHTS = """
import torch
from transformers import AutoModelForImageTextToText

for folder, expected in {pairs!r}:
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    want = AutoModelForImageTextToText.from_pretrained(expected, trust_remote_code=True).state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name in want:
        # 3 Adam steps of lr 1e-3 move weights by up to 3e-3 and the summation order differs by ~2e-5, which Adam's
        # normalisation can blow up to a step's size where a gradient is near zero: nearly every element within
        # 1e-4, none by more than the 3 steps could move it (a run without gradient sync differs almost everywhere)
        off = ~torch.isclose(got[name], want[name], atol=1e-4, rtol=1e-3)
        assert off.float().mean() < 1e-3, (folder, name, int(off.sum()), off.numel())
        torch.testing.assert_close(got[name], want[name], atol=3e-3, rtol=0, msg=lambda m: folder + " " + name + m)
"""


@pytest.mark.parametrize(("config", "tune", "checkpointing"), RUNS, ids=["-".join(map(str, r)) for r in RUNS])
def test_two_processes_train_like_one(config, tune, checkpointing, data, tmp_path, tmp_path_factory):
    output = tmp_path / "out"
    launch = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / f"{config}.yaml")]
    launch += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29517"]  # CPU: fp32
    if checkpointing == "fsdp":
        launch += ["--fsdp_activation_checkpointing", "true"]
    args = finetune_args(data, output, tune, 4)
    if checkpointing == "trainer":
        args.append("--activation_checkpointing")
    run([*launch, str(Path(__file__).with_name("cpu_launch.py")), *args])

    training_args = torch.load(output / "training_args.bin", weights_only=False)
    assert training_args.ddp_find_unused_parameters is False  # no extra graph pass
    if tune == "lora":
        for folder in (output, output / "checkpoint-2"):
            assert not list(folder.glob("_fsdp*.py")), folder
            adapter = load_file(folder / "adapter_model.safetensors")  # sharded runs must gather, not save shards
            assert all(tensor.dim() == 1 or min(tensor.shape) > 0 for tensor in adapter.values()), folder
            assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())
        if config != "ddp":
            return
    expected = reference(data, tmp_path_factory, tune)
    assert losses(output) == pytest.approx(losses(expected), rel=1e-3)
    if tune == "lora":
        return
    for folder, one_process in ((output, expected), (output / "checkpoint-2", expected / "checkpoint-2")):
        config_json = json.loads((folder / "config.json").read_text())
        assert config_json["auto_map"]["AutoModelForImageTextToText"] == (
            "modeling_dense_connector.DenseConnectorForConditionalGeneration"
        )
        assert not list(folder.glob("_fsdp*.py")), sorted(p.name for p in folder.iterdir())
        # The files of a one-process save (the kind `make test-vllm` serves), whatever wrote it; checkpoint folders may
        # add their writer's own (DeepSpeed's `zero_to_fp32.py`), never other weights.
        saved, expected_files = set(model_files(folder)), set(model_files(one_process))
        assert expected_files <= saved, (folder, expected_files - saved)
        assert not [name for name in saved - expected_files if name.endswith(".safetensors")], folder
        if folder == output:
            assert saved == expected_files, folder
        assert config_json == json.loads((one_process / "config.json").read_text())
    pairs = [(str(output), str(expected)), (str(output / "checkpoint-2"), str(expected / "checkpoint-2"))]
    run_without_package(COMPARE_WEIGHTS.format(pairs=pairs), tmp_path)


PADDING_FREE_RUNS = [("ddp", "trainer"), ("fsdp", "fsdp"), ("deepspeed_zero3", None)]


@pytest.mark.parametrize(("config", "checkpointing"), PADDING_FREE_RUNS, ids=[c for c, _ in PADDING_FREE_RUNS])
def test_padding_free_two_processes_train_like_one_padded(config, checkpointing, data, tmp_path, tmp_path_factory):
    """`--padding_free` under DDP, FSDP2 and ZeRO-3 (the sharded ones also with `--use_liger_kernel`, on CPUs the
    chunked loss, which calls the sharded head chunk by chunk): the losses of one process with padded batches."""
    output = tmp_path / "out"
    launch = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / f"{config}.yaml")]
    launch += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29517"]
    if checkpointing == "fsdp":
        launch += ["--fsdp_activation_checkpointing", "true"]
    args = [*finetune_args(data, output, "projector+lm", 4), "--padding_free"]
    if config != "ddp":
        args.append("--use_liger_kernel")
    if checkpointing == "trainer":
        args.append("--activation_checkpointing")
    run([*launch, str(Path(__file__).with_name("cpu_launch.py")), *args])
    assert losses(output) == pytest.approx(losses(reference(data, tmp_path_factory, "projector+lm")), rel=1e-3)


def test_two_machines_of_one_process_train_like_one(data, tmp_path, tmp_path_factory):
    """Two `accelerate launch`es as two machines (`--num_machines 2 --machine_rank 0|1`) of one process each, on
    loopback: the losses of one process, and one folder saved (by machine 0) that loads as remote code."""
    output = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launches = []
    for rank in (0, 1):
        command = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "ddp.yaml")]
        command += ["--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2"]
        command += ["--main_process_ip", "127.0.0.1", "--main_process_port", "29518", "--mixed_precision", "no"]
        command += finetune_args(data, output, "projector+lm", 4)
        launches.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for launch in launches:
        log = launch.communicate(timeout=600)[0].decode()
        assert launch.returncode == 0, log[-6000:]
    expected = reference(data, tmp_path_factory, "projector+lm")
    assert losses(output) == pytest.approx(losses(expected), rel=1e-3)
    assert set(model_files(output)) == set(model_files(expected))
    run_without_package(COMPARE_WEIGHTS.format(pairs=[(str(output), str(expected))]), tmp_path)
