"""Peak memory of converting an original Dense Connector checkpoint, against the checkpoint and its shards.

Builds a synthetic checkpoint in the original layout (Llama-7B width: hidden 4096, MLP 11008, vocabulary 32000, but
only a few layers; a CLIP-L/336 tower; a DCI projector; random bfloat16 weights, `.bin` shards like the original
releases), converts it in a child process that samples its own memory, and prints the peak resident set size (RSS)
while the weights are streamed and while the written folder is loaded for the check, next to the checkpoint size
and the largest input shard.

    python bench/bench_conversion_memory.py                 # 4 LM layers, ~2.9 GB, 1 GB shards
    python bench/bench_conversion_memory.py --layers 8 --shard-size 2GB --format safetensors
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM


FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "original" / "clip_dci" / "original"
GB = 10**9

CHILD = r"""
import json, sys, threading, time
from dense_connector.conversion import convert

phase = {"name": "setup"}
stats = {}

def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields

def sample():
    while phase["name"] != "done":
        current = status()
        peak = stats.setdefault(phase["name"], {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "seconds": 0.0})
        for key, value in current.items():
            if key != "VmHWM":
                peak[key] = max(peak[key], value)
        time.sleep(0.01)

def timed_phase(name, function):
    def wrapper(*args, **kwargs):
        stats.setdefault(phase["name"], {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "seconds": 0.0})
        stats[phase["name"]]["high_water_after"] = status()["VmHWM"]
        phase["name"] = name
        start = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            entry = stats.setdefault(name, {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "seconds": 0.0})
            entry["seconds"] += time.time() - start
            stats[name]["high_water_after"] = status()["VmHWM"]
            phase["name"] = "finishing"
    return wrapper

convert.write_weights = timed_phase("streaming weights", convert.write_weights)
convert.load_converted = timed_phase("loading for the check", convert.load_converted)
convert.run_probe = timed_phase("check forward pass", convert.run_probe)
threading.Thread(target=sample, daemon=True).start()
convert.convert_checkpoint(sys.argv[1], sys.argv[2], vision_tower=sys.argv[3], progress=False)
phase["name"] = "done"
stats["whole conversion"] = {"high_water_after": status()["VmHWM"]}
print("STATS " + json.dumps(stats))
"""


def original_names_and_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a LLaVA-layout Dense Connector checkpoint (DCI, CLIP-L/336, Llama-7B width)."""
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32, vocab_size=32000
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    with torch.device("meta"):
        language = LlamaForCausalLM(text).state_dict()
        tower = CLIPVisionModel(vision).state_dict()
    entries = [(name, tuple(t.shape)) for name, t in language.items() if name != "lm_head.weight"]
    entries += [(f"model.vision_tower.vision_tower.vision_model.{name}", tuple(t.shape)) for name, t in tower.items()]
    entries += [("model.mm_projector.0.weight", (4096, 3 * 1024)), ("model.mm_projector.0.bias", (4096,))]
    entries += [("model.mm_projector.2.weight", (4096, 4096)), ("model.mm_projector.2.bias", (4096,))]
    entries += [("lm_head.weight", (32000, 4096))]
    return entries


def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Initialised as the models are: norms at 1, biases at 0, other weights N(0, 0.02), in bfloat16."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if "norm" in name or "layrnorm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape) * 0.02).to(torch.bfloat16)


def write_checkpoint(folder: Path, layers: int, shard_bytes: int, fmt: str) -> list[int]:
    """Write the synthetic checkpoint shard by shard; returns the shard sizes in bytes."""
    entries = original_names_and_shapes(layers)
    shards, size = [[]], 0
    for name, shape in entries:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    suffix = "bin" if fmt == "bin" else "safetensors"
    prefix = "pytorch_model" if fmt == "bin" else "model"
    weight_map = {}
    for index, shard in enumerate(shards):
        file_name = f"{prefix}-{index + 1:05d}-of-{len(shards):05d}.{suffix}"
        tensors = {name: random_tensor(name, shape) for name, shape in shard}
        if fmt == "bin":
            torch.save(tensors, folder / file_name)
        else:
            save_file(tensors, folder / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    total = sum(2 * torch.Size(shape).numel() for _, shape in entries)
    index_name = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))

    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        mm_hidden_size=3 * 1024,
        torch_dtype="bfloat16",
    )
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(FIXTURE / name, folder / name)
    return [sum(2 * torch.Size(shape).numel() for _, shape in shard) for shard in shards]


def write_tower(folder: Path) -> None:
    """The tower repository's config and preprocessing (its weights are in the checkpoint)."""
    config = {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    }
    (folder / "config.json").write_text(json.dumps(config))
    preprocessing = {
        "crop_size": {"height": 336, "width": 336},
        "size": {"shortest_edge": 336},
        "do_center_crop": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessing))


def parse_size(text: str) -> int:
    units = {"GB": GB, "MB": 10**6}
    return int(float(text[:-2]) * units[text[-2:].upper()]) if text[-2:].upper() in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="language-model layers (Llama-7B width)")
    parser.add_argument("--shard-size", type=parse_size, default=GB, help="input shard size, e.g. 1GB")
    parser.add_argument("--format", choices=["bin", "safetensors"], default="bin")
    parser.add_argument("--workdir", type=Path, help="where to build the checkpoint (default: a temporary folder)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dc-bench-", dir=args.workdir))
    try:
        original, tower = workdir / "original", workdir / "tower"
        original.mkdir()
        tower.mkdir()
        start = time.time()
        shard_sizes = write_checkpoint(original, args.layers, args.shard_size, args.format)
        write_tower(tower)
        print(
            f"synthetic checkpoint: {sum(shard_sizes) / GB:.2f} GB in {len(shard_sizes)} {args.format} shards "
            f"(largest {max(shard_sizes) / GB:.2f} GB), written in {time.time() - start:.0f} s"
        )

        start = time.time()
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(original), str(workdir / "converted"), str(tower)],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            raise SystemExit(f"conversion failed:\n{child.stderr[-4000:]}")
        stats = json.loads(child.stdout.split("STATS ", 1)[1])
        print(f"conversion finished in {time.time() - start:.0f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    checkpoint, largest = sum(shard_sizes), max(shard_sizes)
    print(
        f"\n{'phase':<24}{'seconds':>8}{'peak RSS GB':>13}{'anon GB':>9}{'file GB':>9}{'/ checkpoint':>14}"
        f"{'/ largest shard':>17}"
    )
    for name in ("setup", "streaming weights", "loading for the check", "check forward pass"):
        phase = stats[name]
        peak = phase["VmRSS"]
        seconds = f"{phase['seconds']:.1f}" if name != "setup" else "-"
        print(
            f"{name:<24}{seconds:>8}{peak / GB:>13.2f}{phase['RssAnon'] / GB:>9.2f}"
            f"{phase['RssFile'] / GB:>9.2f}{peak / checkpoint:>14.2f}{peak / largest:>17.2f}"
        )
    streaming_high_water = stats["streaming weights"]["high_water_after"]
    whole = stats["whole conversion"]["high_water_after"]
    print(
        f"\nhigh-water RSS up to the end of streaming: {streaming_high_water / GB:.2f} GB "
        f"= {streaming_high_water / checkpoint:.2f} x checkpoint, {streaming_high_water / largest:.2f} x largest shard"
    )
    print(
        f"high-water RSS of the whole conversion (incl. the check): {whole / GB:.2f} GB "
        f"= {whole / checkpoint:.2f} x checkpoint"
    )


if __name__ == "__main__":
    main()
