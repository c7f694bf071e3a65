"""Tiny local stand-ins of the Hub repositories a Dense Connector is built from, laid out as the Hub has them.

Towers: a full `CLIPModel` (`openai/clip-vit-large-patch14-336`), a full `SiglipModel`
(`google/siglip-so400m-patch14-384`, pooling head included), vision-only `CLIPVisionModel` and `SiglipVisionModel`;
each has 6 vision layers (SigLIP 7, of which the original runs 6), 32 px images, 4 px patches. Language models:
Vicuna (Llama with the fixtures' SentencePiece `tokenizer.model`, `legacy: false`), Llama-3-Instruct
(`tokenizer.json` only, with `<|reserved_special_token_0|>`) and Qwen2 (byte-level BPE, tied embeddings, its own
ChatML chat template). Weights are random (seeded), saved with `save_pretrained` as the Hub's safetensors
repositories are.
"""

import json
import shutil
from pathlib import Path

import torch
from tiny import FIXTURES, llama_3_tokenizer_folder
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)


IMAGE_SIZE, PATCH_SIZE, TOWER_LAYERS = 32, 4, 6
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}
TEXT_TOWER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
LM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
LLAMA_3_PAD = "<|reserved_special_token_0|>"
QWEN2_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def save(model: torch.nn.Module, folder: Path, seed: int) -> Path:
    """`model` with seeded random weights (non-zero biases and norms, so that a swapped tensor shows), saved."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)
    return folder


def clip_model_repo(folder: Path) -> Path:
    """A full `CLIPModel` repository (text model, projections and `logit_scale` included)."""
    config = CLIPConfig(
        text_config={**TEXT_TOWER, "vocab_size": 50, "max_position_embeddings": 16},
        vision_config={**VISION, "num_hidden_layers": TOWER_LAYERS},
        projection_dim=8,
    )
    save(CLIPModel(config), folder, seed=1)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


def clip_vision_repo(folder: Path) -> Path:
    """A vision-only `CLIPVisionModel` repository."""
    save(CLIPVisionModel(CLIPVisionConfig(**VISION, num_hidden_layers=TOWER_LAYERS)), folder, seed=2)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


def siglip_model_repo(folder: Path) -> Path:
    """A full `SiglipModel` repository: one layer more than the original runs, the pooling head, a text model."""
    config = SiglipConfig(
        text_config={**TEXT_TOWER, "vocab_size": 50, "max_position_embeddings": 16},
        vision_config={**VISION, "num_hidden_layers": TOWER_LAYERS + 1},
    )
    save(SiglipModel(config), folder, seed=3)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def siglip_vision_repo(folder: Path) -> Path:
    """A vision-only `SiglipVisionModel` repository (all its layers and its pooling head, as on the Hub)."""
    save(SiglipVisionModel(SiglipVisionConfig(**VISION, num_hidden_layers=TOWER_LAYERS + 1)), folder, seed=7)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def vicuna_repo(folder: Path) -> Path:
    """Vicuna-7B-v1.5's layout: a Llama whose tokenizer is SentencePiece (`tokenizer.model`, `legacy: false`)."""
    config = LlamaConfig(**LM, vocab_size=1000, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    save(LlamaForCausalLM(config), folder, seed=4)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(FIXTURES / "clip_dci" / "original" / name, folder / name)
    return folder


def llama_3_repo(folder: Path) -> Path:
    """Llama-3-8B-Instruct's layout: `tokenizer.json` only (reserved special tokens included), eos `<|eot_id|>`."""
    llama_3_tokenizer_folder(folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens([LLAMA_3_PAD])
    backend.save(str(folder / "tokenizer.json"))
    vocab = backend.get_vocab(with_added_tokens=True)
    config = LlamaConfig(
        **LM,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        bos_token_id=vocab["<|begin_of_text|>"],
        eos_token_id=vocab["<|eot_id|>"],
    )
    save(LlamaForCausalLM(config), folder, seed=5)
    return folder


def qwen2_repo(folder: Path) -> Path:
    """Qwen2's layout: byte-level BPE `tokenizer.json` without a BOS, tied embeddings, a ChatML chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    prompts = [case["prompt"] for case in json.loads((FIXTURES / "chat_prompts.json").read_text())]
    backend.train_from_iterator(prompts, trainer)
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": QWEN2_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    vocab = backend.get_vocab(with_added_tokens=True)
    config = Qwen2Config(
        **LM,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        eos_token_id=vocab["<|im_end|>"],
        tie_word_embeddings=True,
    )
    save(Qwen2ForCausalLM(config), folder, seed=6)
    GenerationConfig(eos_token_id=[vocab["<|im_end|>"], vocab["<|endoftext|>"]]).save_pretrained(folder)
    return folder
