"""Prefill, finely: a one-token `generate`, one forward and image encoding of DCI vs transformers' Llava.

`bench_generate.py` reads prefill off the first step of a long `generate`; this script times only the prefill work,
interleaved over many rounds (`--reps`), and with `--profile` adds the GPU kernel time of each model's one-token
`generate` (torch profiler), which no Python or launch overhead enters.

    .venv/bin/python bench/bench_prefill.py --tiny            # CPU smoke test
    python bench/bench_prefill.py --device cuda --dtype bfloat16 --tower-layers 24 --image-size 336 --lm-layers 32 \
        --reps 10 --profile
"""

import argparse

import torch
from bench_generate import prompt
from common import add_model_arguments, build_dense_connector, build_llava, describe_machine, setup
from torch.profiler import ProfilerActivity, profile

from dense_connector.measurement import clock, interleaved_times


def kernel_seconds(function, device: str) -> float:
    """Total time of the GPU kernels `function` launches (0 on a CPU)."""
    if not device.startswith("cuda"):
        return 0.0
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        function()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in profiler.key_averages()) / 1e6


def run(args) -> dict[str, dict[str, float]]:
    llava = build_llava(args).eval()
    models = {"llava": llava, "dci": build_dense_connector(args, llava, "dci").eval()}
    size = models["dci"].config.vision_config.image_size
    dtype = getattr(torch, args.dtype)
    pixel_values = torch.randn(1, 3, size, size, device=args.device, dtype=dtype)
    input_ids = prompt(models["dci"].config.num_image_tokens(), args.device)
    mask = torch.ones_like(input_ids)

    def work(model):
        return {
            "generate 1 token": lambda: model.generate(
                input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, max_new_tokens=1,
                do_sample=False, pad_token_id=0,
            ),
            "forward": lambda: model(
                input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, logits_to_keep=1
            ),
            "encode": lambda: model.model.get_image_features(pixel_values=pixel_values),
        }  # fmt: skip

    print(f"# prefill of a {input_ids.shape[1]}-token prompt: {describe_machine(args)}")
    print(f"{'step':<18}{'llava s':>12}{'dci s':>12}{'dci/llava':>12}")
    results = {}
    with torch.inference_mode():
        now = clock(args.device, args.threads)
        for step in work(llava):
            functions = {name: work(model)[step] for name, model in models.items()}
            best = interleaved_times(functions, args.reps, now)
            results[step] = best
            print(f"{step:<18}{best['llava']:>12.4f}{best['dci']:>12.4f}{best['dci'] / best['llava']:>12.3f}")
        if args.profile:
            kernels = {
                name: kernel_seconds(work(model)["generate 1 token"], args.device) for name, model in models.items()
            }
            ratio = kernels["dci"] / kernels["llava"] if kernels["llava"] else float("nan")
            print(f"{'GPU kernel time':<18}{kernels['llava']:>12.4f}{kernels['dci']:>12.4f}{ratio:>12.3f}")
            results["kernels"] = kernels
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tower_layers=24, lm_layers=2, image_size=224, reps=10)
    parser.add_argument("--profile", action="store_true", help="also the GPU kernel time of a one-token generate")
    args = parser.parse_args()
    setup(args)
    run(args)


if __name__ == "__main__":
    main()
