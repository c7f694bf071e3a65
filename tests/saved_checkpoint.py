"""A tiny Dense Connector saved with `save_pretrained` (model + processor + chat template), and sample images."""

from pathlib import Path

import numpy as np
from PIL import Image
from tiny import tiny_config, tiny_model, tiny_processor

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


def save_images(folder: Path, count: int = 3) -> list[Path]:
    """`count` random RGB PNGs of different, non-square sizes."""
    paths = []
    for index in range(count):
        pixels = np.random.RandomState(index).randint(0, 256, (30 + 7 * index, 41 - 5 * index, 3), dtype=np.uint8)
        path = folder / f"image{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
