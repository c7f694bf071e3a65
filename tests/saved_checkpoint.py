"""A tiny Dense Connector saved with `save_pretrained` (model + processor + chat template), a folder fine-tuned from a
checkpoint by `examples/finetune.py`, and sample images."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tiny import REPO, tiny_config, tiny_model, tiny_processor

from dense_connector.chat_templates import CHAT_TEMPLATES, stop_token_ids


def save_tiny_checkpoint(path: Path, conv_mode: str = "vicuna_v1", seed: int = 0) -> Path:
    """Write a randomly initialised tiny model, its processor and the `conv_mode` chat template to `path`."""
    config = tiny_config()
    model = tiny_model(config, seed=seed)
    processor = tiny_processor(config, chat_template=CHAT_TEMPLATES[conv_mode])
    model.generation_config.eos_token_id = stop_token_ids(processor.tokenizer, conv_mode)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def finetune_with_script(base: Path, output: Path, steps: int = 1) -> Path:
    """Fine-tune `base` for `steps` steps on the README's example records with `examples/finetune.py`, run as a user
    runs it (its own process, on CPU); `output` then holds what the script saves (model, processor, remote code)."""
    data = REPO / "examples" / "data"
    command = [sys.executable, str(REPO / "examples" / "finetune.py"), "--model_name_or_path", str(base)]
    command += ["--data_path", str(data / "shapes_llava.json"), "--image_folder", str(data)]
    command += ["--output_dir", str(output)]
    command += ["--max_steps", str(steps), "--per_device_train_batch_size", "2", "--save_strategy", "no"]
    command += ["--report_to", "none", "--use_cpu", "--seed", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"examples/finetune.py failed:\n{result.stdout}\n{result.stderr[-5000:]}"
    return output


def save_images(folder: Path, count: int = 3) -> list[Path]:
    """`count` random RGB PNGs of different, non-square sizes."""
    paths = []
    for index in range(count):
        pixels = np.random.RandomState(index).randint(0, 256, (30 + 7 * index, 41 - 5 * index, 3), dtype=np.uint8)
        path = folder / f"image{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
