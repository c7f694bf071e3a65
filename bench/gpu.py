"""Real-size runs of the comparisons on one GPU, bfloat16 + SDPA: CLIP-L/336 (24 layers) and Llama-7B widths.

bench/gpu.sh                    # on a GPU machine (< 5 minutes on one H100)
bench/gpu.sh --lm-layers 8      # a shallower language model
bench/gpu.sh --tiny             # smoke test: tiny widths on the CPU (compilation takes a minute or two)
bench/gpu.sh --no-compile       # without the compiled static-cache decoding comparison

The training part ends with `bench_training.py --mix` at 7B widths (8 layers): an epoch of the instruction mix,
padded vs padding-free, with flash-attention's variable-length kernels when `flash-attn` is installed (else SDPA over
the whole row and SDPA record by record, as `--padding_free` runs without flash-attention).

vLLM serving (`bench_vllm.py`, `bench_vllm_split.py`) is not part of it: vLLM cannot be installed on the GPU machine
(no network there), so those run on the CPU in `.venv-vllm`.
"""

import argparse
import copy
import importlib.util
import time

import bench_compile
import bench_encoding
import bench_feature_memory
import bench_generate
import bench_training
import torch
from common import setup


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-layers", type=int, default=32, help="Llama-7B decoder layers (the real model: 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed generate")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per model (after one warm-up)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU, to check the script runs")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decoding comparison")
    options = parser.parse_args()
    device = "cpu" if options.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not options.tiny:
        parser.error("no GPU found; use --tiny to smoke-test on the CPU")

    if options.tiny:  # a few seconds: shallow, short, one repetition, one thread
        options.lm_layers, options.new_tokens, options.reps = 2, 4, 1
    common = argparse.Namespace(
        tower_layers=24, image_size=336, lm_layers=options.lm_layers, dtype="bfloat16", device=device,
        reps=options.reps, threads=1, tiny=options.tiny,
    )  # fmt: skip
    setup(common)
    start = time.perf_counter()
    bench_encoding.run(argparse.Namespace(**vars(copy.copy(common)), batch=8))
    print()
    bench_generate.run(argparse.Namespace(**vars(copy.copy(common)), new_tokens=options.new_tokens))
    print()
    frames = 32 if options.tiny else 14  # 14 CLIP-L/336 frames take 4032 of Llama-7B's 4096 positions
    bench_feature_memory.run(argparse.Namespace(**vars(copy.copy(common)), batch=8, frames=frames))
    print()
    bench_training.run(argparse.Namespace(**vars(copy.copy(common)), batch=1 if options.tiny else 2))
    print()
    # the instruction-mix epoch: padded vs padding-free, with flash-attention's varlen kernels where flash-attn is
    # installed; 8 Llama-7B layers (a full fine-tune of all 32 with AdamW does not fit one GPU)
    attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") and device == "cuda" else "sdpa"
    mix = {**vars(common), "lm_layers": min(options.lm_layers, 8), "batch": 8, "vocab": 32000, "attn": attention,
           "records": 16 if options.tiny else 96, "mix_width": 128 if options.tiny else 4096,
           "peak_only": False}  # fmt: skip
    bench_training.run_mix(argparse.Namespace(**mix))
    if not options.no_compile:
        print()
        bench_compile.run(argparse.Namespace(**vars(copy.copy(common)), new_tokens=options.new_tokens))
    print(f"\nTotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
