"""Shared pieces of the benchmarks: model building with shared weights, options, and the description of the run.

Every benchmark builds transformers' own `LlavaForConditionalGeneration` with random weights, then our models with
the *same* tower weights and the *same* language-model modules (shared, not copied), so that the only differences
measured are the connector, the projector's width and the tower layers we skip. The measurements themselves (timing,
peak memory) are `dense_connector.measurement`, which the tests use too.
"""

import argparse
import os
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights

from dense_connector import DenseConnectorConfig, DenseConnectorForConditionalGeneration
from dense_connector.measurement import clock


IMAGE_TOKEN_ID = 31999  # inside the Llama vocabulary, so both models embed it without resizing
VIDEO_TOKEN_ID = 31998


def add_model_arguments(
    parser: argparse.ArgumentParser, tower_layers: int, lm_layers: int, image_size: int, reps: int = 3
) -> None:
    """Options shared by the benchmarks; defaults are the CPU sizes each script documents."""
    parser.add_argument("--tower-layers", type=int, default=tower_layers, help="vision tower depth (CLIP-L: 24)")
    parser.add_argument("--image-size", type=int, default=image_size, help="tower input size (CLIP-L/336: 336)")
    parser.add_argument("--lm-layers", type=int, default=lm_layers, help="Llama-7B-width decoder layers (7B: 32)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=reps, help="timed repetitions per model (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: time is this process's CPU time)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths, to smoke-test the script in seconds")


def vision_config(args) -> dict:
    """CLIP ViT-L/14 widths (1024 wide, 16 heads, MLP 4096, patch 14) at the chosen depth and input size."""
    widths = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "patch_size": 14}
    if args.tiny:
        widths = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "patch_size": 4}
    image_size = 32 if args.tiny else args.image_size
    return {
        "model_type": "clip_vision_model",
        "num_hidden_layers": args.tower_layers,
        "image_size": image_size,
        **widths,
    }


def text_config(args, vocab_size: int = 32000) -> dict:
    """Llama-2-7B widths (4096 wide, 32 heads, MLP 11008) at the chosen depth."""
    widths = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}
    if args.tiny:
        widths = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}
    return {
        "model_type": "llama",
        "num_hidden_layers": args.lm_layers,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        **widths,
    }


def build_llava(args, vocab_size: int = 32000) -> LlavaForConditionalGeneration:
    """transformers' LLaVA-1.5 (feature layer -2, CLS dropped), random weights; the baseline and the weight source."""
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=vision_config(args),
        text_config=text_config(args, vocab_size),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with torch.device(args.device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=args.dtype, attn_implementation="sdpa")
    return model.eval()


def build_dense_connector(args, llava: LlavaForConditionalGeneration, connector: str, **overrides):
    """Our model with `llava`'s tower weights and *its* language model and head (shared modules, no copy)."""
    config = DenseConnectorConfig(
        vision_config=vision_config(args),
        text_config=llava.config.text_config.to_dict(),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        dense_connector_type=connector,
        **overrides,
    )
    with no_init_weights(), torch.device("meta"):
        model = DenseConnectorForConditionalGeneration._from_config(
            config, dtype=args.dtype, attn_implementation="sdpa"
        )
    model.model.language_model = llava.model.language_model
    model.lm_head = llava.lm_head
    model.model.vision_tower.to_empty(device=args.device)
    model.model.connector.to_empty(device=args.device)
    missing, _ = model.model.vision_tower.load_state_dict(llava.model.vision_tower.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"tower weights missing from the LLaVA tower: {missing}")
    # Non-persistent buffers (CLIP's position_ids) are not in state dicts: rebuild them as the tower's __init__ does.
    for name, buffer in list(model.model.vision_tower.named_buffers()):
        source = dict(llava.model.vision_tower.named_buffers())[name]
        buffer.copy_(source)
    torch.manual_seed(1)
    for layer in model.model.connector.projector:
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    return model.eval()


def setup(args) -> None:
    """Thread count and the clock the timings use (see `clock`)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def describe_machine(args) -> str:
    if args.device.startswith("cuda"):
        where = torch.cuda.get_device_name()
    else:
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        timer = "CPU time" if clock(args.device, args.threads) is time.process_time else "wall time"
        where = f"{os.cpu_count()} cores, {torch.get_num_threads()} thread(s), {timer}, load average {load}"
    return f"torch {torch.__version__}, {args.device} ({where}), {args.dtype}"


def describe_tower(vision) -> str:
    return f"{vision.num_hidden_layers}-layer {vision.hidden_size}-wide CLIP tower at {vision.image_size} px"


def describe_language_model(text) -> str:
    return f"{text.num_hidden_layers}-layer {text.hidden_size}-wide Llama"
