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
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
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
    Siglip2Config,
    Siglip2Model,
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


NAFLEX_MAX_PATCHES = 64  # the processor's patch budget per image; the tower's position grid is 8 x 8 (num_patches)


def siglip2_naflex_repo(folder: Path) -> Path:
    """A full `Siglip2Model` NaFlex repository (`google/siglip2-base-patch16-naflex`'s layout): a vision model that
    takes patch sequences (no fixed image size, `num_patches` positions resized per image), its pooling head, a text
    model, and the `Siglip2ImageProcessor` that resizes each image to its own grid within `max_num_patches`."""
    vision = {key: value for key, value in VISION.items() if key != "image_size"}
    config = Siglip2Config(
        text_config={**TEXT_TOWER, "vocab_size": 50, "max_position_embeddings": 16},
        vision_config={**vision, "num_hidden_layers": TOWER_LAYERS, "num_patches": 64},
    )
    save(Siglip2Model(config), folder, seed=13)
    preprocessor = {
        "image_processor_type": "Siglip2ImageProcessor",
        "patch_size": PATCH_SIZE,
        "max_num_patches": NAFLEX_MAX_PATCHES,
        "resample": 2,
        "rescale_factor": 1 / 255,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
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


def chatml_tokenizer(folder: Path) -> dict[str, int]:
    """Qwen2's tokenizer layout in `folder`: byte-level BPE `tokenizer.json`, no BOS, a ChatML chat template."""
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
    return backend.get_vocab(with_added_tokens=True)


def qwen2_repo(folder: Path) -> Path:
    """Qwen2's layout: byte-level BPE `tokenizer.json` without a BOS, tied embeddings, a ChatML chat template."""
    vocab = chatml_tokenizer(folder)
    config = Qwen2Config(**LM, vocab_size=len(vocab), eos_token_id=vocab["<|im_end|>"], tie_word_embeddings=True)
    save(Qwen2ForCausalLM(config), folder, seed=6)
    GenerationConfig(eos_token_id=[vocab["<|im_end|>"], vocab["<|endoftext|>"]]).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Today's towers and language models, saved by transformers as the Hub keeps them (`save_pretrained` writes the
# checkpoint layout: CLIP's `vision_model.` prefix, DINOv3's `layer.N`, one tensor per MoE expert).
# ----------------------------------------------------------------------------------------------------------------

# name -> (model_type, extra config, image processor class named in preprocessor_config.json)
TOWERS = {
    "metaclip_2": ("metaclip_2", {}, "CLIPImageProcessor"),
    "dinov2": ("dinov2", {}, "BitImageProcessor"),
    "dinov2_registers": ("dinov2_with_registers", {"num_register_tokens": 4}, "BitImageProcessor"),
    "dinov3": ("dinov3_vit", {"num_register_tokens": 4}, "DINOv3ViTImageProcessorFast"),
    "aimv2": ("aimv2_vision_model", {}, "CLIPImageProcessor"),
    "aimv2_model": ("aimv2", {}, "CLIPImageProcessor"),
    "mlcd": ("mlcd_vision_model", {}, "CLIPImageProcessor"),
    "internvit": (
        "internvl_vision",
        {"image_size": [IMAGE_SIZE] * 2, "patch_size": [PATCH_SIZE] * 2},
        "GotOcr2ImageProcessor",
    ),
}
# Leading tokens that are not patches, per tower above (CLS, registers): what a build must read off each tower.
NON_PATCH_TOKENS = {
    "metaclip_2": 1,
    "dinov2": 1,
    "dinov2_registers": 5,
    "dinov3": 5,
    "aimv2": 0,
    "aimv2_model": 0,
    "mlcd": 1,
    "internvit": 1,
}


def tower_repo(folder: Path, name: str, seed: int = 11) -> Path:
    """A tower of `TOWERS` (6 layers, 32 px, 4 px patches): vision-only, or a full model with a text half."""
    model_type, extra, processor = TOWERS[name]
    vision = {**VISION, "num_hidden_layers": TOWER_LAYERS, **extra}
    sub_configs = getattr(AutoConfig.for_model(model_type), "sub_configs", {})
    if "vision_config" in sub_configs:
        text = {**TEXT_TOWER, "vocab_size": 50, "max_position_embeddings": 16}
        config = AutoConfig.for_model(model_type, vision_config=vision, text_config=text, projection_dim=8)
    else:
        config = AutoConfig.for_model(model_type, **vision)
    save(AutoModel.from_config(config), folder, seed=seed)
    preprocessor = {
        "image_processor_type": processor,
        "size": {"shortest_edge": IMAGE_SIZE + 8},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
# name -> (model_type, extra config): MoE LMs whose Hub checkpoints keep one tensor per expert, a hybrid
# sliding-window LM with tied embeddings, a dense LM with the ChatML tokenizer (no BOS).
LANGUAGE_MODELS = {
    "qwen3_moe": ("qwen3_moe", {**MOE, "num_experts": 4}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "olmoe": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2}),
    "deepseek_v3": (
        "deepseek_v3",
        {
            **MOE,
            "n_routed_experts": 4,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "n_group": 1,
            "topk_group": 1,
        },
    ),
    "gemma3": (
        "gemma3_text",
        {"sliding_window": 4, "head_dim": 16, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "mistral": ("mistral", {"sliding_window": 4}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "smollm3": ("smollm3", {}),
    "gpt_oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 4}),
}


def language_model_repo(folder: Path, name: str, seed: int = 12, **overrides) -> Path:
    """A causal LM of `LANGUAGE_MODELS` (2 layers, width 64; `overrides` change its config) with the ChatML tokenizer
    (no BOS)."""
    model_type, extra = LANGUAGE_MODELS[name]
    extra = {**extra, **overrides}
    vocab = chatml_tokenizer(folder)
    config = AutoConfig.for_model(
        model_type,
        **{**LM, **extra},
        vocab_size=len(vocab),
        eos_token_id=vocab["<|im_end|>"],
        bos_token_id=None,
        pad_token_id=vocab["<|endoftext|>"],
    )
    save(AutoModelForCausalLM.from_config(config), folder, seed=seed)
    return folder
