"""Tiny Dense Connector configs, tokenizer, processor and models shared by the tests (no downloads)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlavaImageProcessorPil, LlavaNextImageProcessorPil

from dense_connector import DenseConnectorConfig, DenseConnectorForConditionalGeneration, DenseConnectorProcessor


REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "original"
FIXTURE_NAMES = ("clip_dci", "clip_sci", "siglip_dci", "siglip_dci_anyres")
IMAGE_SIZE, PATCH_SIZE = 32, 4  # an 8x8 patch grid: 64 tokens per image (80 with STI)


def tiny_tokenizer():
    """The fixtures' 1000-piece SentencePiece Llama tokenizer with `<image>` (1000) and `<video>` (1001) added."""
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "clip_dci" / "original")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def llama_3_tokenizer_folder(folder: Path) -> Path:
    """A tiny Llama-3-style tokenizer as an original checkpoint holds it (only `tokenizer.json`): byte-level BPE
    trained on the fixtures' chat prompts, Llama-3's special tokens, a post-processor that adds `<|begin_of_text|>`."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    prompts = [case["prompt"] for case in json.loads((FIXTURES / "chat_prompts.json").read_text())]
    backend.train_from_iterator(prompts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", backend.token_to_id(specials[0]))]
    )
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": "<|eot_id|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_config(tower: str = "clip", connector: str = "dci", **overrides) -> DenseConnectorConfig:
    """A 4-layer CLIP or SigLIP tower, a 2-layer Llama, vocabulary 1002 (the tiny tokenizer's)."""
    vision_config = {
        "model_type": "clip_vision_model" if tower == "clip" else "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }
    if tower == "siglip":
        vision_config["vision_use_head"] = False
    text_config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1002,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    kwargs = {
        "vision_config": vision_config,
        "text_config": text_config,
        "image_token_id": 1000,
        "video_token_id": 1001,
        "dense_connector_type": connector,
        "vision_feature_layer": -2 if tower == "clip" else -1,
        "vision_feature_select_strategy": "default" if tower == "clip" else "full",
    }
    kwargs.update(overrides)
    return DenseConnectorConfig(**kwargs)


def tiny_model(config: DenseConnectorConfig, seed: int = 0) -> DenseConnectorForConditionalGeneration:
    torch.manual_seed(seed)
    return DenseConnectorForConditionalGeneration(config).eval()


def tiny_processor(config: DenseConnectorConfig, chat_template: str | None = None) -> DenseConnectorProcessor:
    """`pad` preprocessing (pad to square with the mean colour) for the config's tower size."""
    size = config.vision_config.image_size
    if config.vision_config.model_type.startswith("siglip"):
        image_processor = LlavaImageProcessorPil(
            do_pad=True,
            size={"height": size, "width": size},
            do_center_crop=False,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
    else:
        image_processor = LlavaImageProcessorPil(
            do_pad=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    return DenseConnectorProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        chat_template=chat_template,
        patch_size=config.vision_config.patch_size,
        dense_connector_type=config.dense_connector_type,
        sti_pool_stride=config.sti_pool_stride,
        image_downsample_factor=config.image_downsample_factor,
        video_pool_stride=config.video_pool_stride,
    )


HIDE_PACKAGE = """
import importlib.abc, sys


class _HideDenseConnector(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dense_connector" or name.startswith("dense_connector."):
            raise ImportError(f"{name} is hidden: this process must work from remote code alone")


sys.meta_path.insert(0, _HideDenseConnector())
try:
    import dense_connector  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("dense_connector is still importable")
"""


def anyres_processor(config: DenseConnectorConfig) -> DenseConnectorProcessor:
    """AnyRes preprocessing for the config's `image_grid_pinpoints` and a 32 px SigLIP-style tower (patch 4)."""
    square = {"height": 32, "width": 32}
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=config.image_grid_pinpoints,
        do_pad=True,
        size=square,
        crop_size=square,
        do_center_crop=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return DenseConnectorProcessor(
        image_processor=image_processor,
        tokenizer=tiny_processor(config).tokenizer,
        patch_size=4,
        dense_connector_type=config.dense_connector_type,
    )


def run_without_package(
    script: str, tmp_path: Path, timeout: int = 300, stdin=subprocess.DEVNULL
) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python where `import dense_connector` fails, offline, with its own HF cache.

    `stdin` defaults to none at all, as a harness or server runs it (a remote-code prompt then fails, not waits);
    pass the read end of a pipe kept open to catch a prompt that would block an interactive user."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, "-c", HIDE_PACKAGE + script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=stdin,
    )
    assert result.returncode == 0, f"remote-code subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result
