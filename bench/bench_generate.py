"""Full `generate`: prefill and per-token decode time of DCI vs transformers' Llava, and the Efficient DCI speed-up.

Same tower weights, same language-model modules (shared), same prompt text; Llava and DCI put one image's patch
tokens in the prompt, the Efficient Dense Connector (`image_downsample_factor=2`) a quarter of them. Prefill is the
time from calling `generate` to the first token's logits (image encoding included), best of `--reps` runs; decode is
the time of one later step, best of all steps of all runs (every step does the same work). Both are read from a logits
processor that stamps every step.

    .venv/bin/python bench/bench_generate.py                     # CLIP-L width 24 layers at 224 px, Llama-7B width x2
    .venv/bin/python bench/bench_generate.py --image-size 336 --lm-layers 8 --dtype bfloat16 --device cuda
"""

import argparse

import torch
from common import (
    IMAGE_TOKEN_ID,
    add_model_arguments,
    build_dense_connector,
    build_llava,
    describe_language_model,
    describe_machine,
    describe_tower,
    setup,
)
from transformers import LogitsProcessor, LogitsProcessorList

from dense_connector.measurement import clock


TEXT_BEFORE, TEXT_AFTER = 40, 12  # roughly a Vicuna system prompt + "USER:" before the image, a question after


class StepClock(LogitsProcessor):
    """Records the time at every generation step (called once per step, right after the step's forward)."""

    def __init__(self, now):
        self.now = now
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(self.now())
        return scores


def prompt(num_image_tokens: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(3, 31000, (TEXT_BEFORE,), generator=generator)
    after = torch.randint(3, 31000, (TEXT_AFTER,), generator=generator)
    image = torch.full((num_image_tokens,), IMAGE_TOKEN_ID)
    return torch.cat([torch.tensor([1]), before, image, after])[None].to(device)


def time_generate(model, input_ids, pixel_values, args) -> tuple[float, list[float]]:
    """Prefill seconds and the seconds of each decoding step of one greedy `generate` of `args.new_tokens` tokens."""
    now = clock(args.device, args.threads)
    step_clock = StepClock(now)
    start = now()
    model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixel_values,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([step_clock]),
        pad_token_id=0,
    )
    stamps = step_clock.stamps
    return stamps[0] - start, [later - earlier for earlier, later in zip(stamps, stamps[1:])]


def interleaved_decode_steps(models: dict, inputs: dict, pixel_values: torch.Tensor, args) -> dict[str, float]:
    """Best time of one cached decoding step (a forward on one token) of each model, the models' steps alternating
    (A, B, C, A, B, C, ...) so that the machine's load hits them alike: the work of `generate`'s later steps, without
    its bookkeeping, measured finely enough to compare within a few percent on a shared machine."""
    now = clock(args.device, args.threads)
    states, times = {}, {name: [] for name in models}
    for name, model in models.items():
        outputs = model(input_ids=inputs[name], pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
        states[name] = (outputs.past_key_values, outputs.logits[:, -1:].argmax(-1))
    for _ in range(args.new_tokens):
        for name, model in models.items():
            cache, token = states[name]
            start = now()
            outputs = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times[name].append(now() - start)
            states[name] = (outputs.past_key_values, outputs.logits[:, -1:].argmax(-1))
    return {name: min(values) for name, values in times.items()}


def run(args) -> dict[str, tuple[float, float, float]]:
    llava = build_llava(args)
    models = {
        "llava": llava,
        "dci": build_dense_connector(args, llava, "dci"),
        "dci-efficient": build_dense_connector(args, llava, "dci", image_downsample_factor=2),
    }
    size = llava.config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, device=args.device, dtype=getattr(torch, args.dtype))
    num_patches = (size // llava.config.vision_config.patch_size) ** 2
    inputs = {
        "llava": prompt(num_patches, args.device),
        "dci": prompt(models["dci"].config.num_image_tokens(), args.device),
        "dci-efficient": prompt(models["dci-efficient"].config.num_image_tokens(), args.device),
    }
    assert models["dci"].config.num_image_tokens() == num_patches

    runs = {name: [] for name in models}
    with torch.inference_mode():
        for round_index in range(args.reps + 1):  # interleaved rounds, the first one a warm-up
            for name, model in models.items():
                timing = time_generate(model, inputs[name], pixel_values, args)
                if round_index:
                    runs[name].append(timing)
        steps = interleaved_decode_steps(models, inputs, pixel_values, args)
    best = {name: (min(t[0] for t in timings), min(min(t[1]) for t in timings)) for name, timings in runs.items()}

    tower, language_model = (
        describe_tower(llava.config.vision_config),
        describe_language_model(llava.config.text_config),
    )
    print(f"# generate, {tower}, {language_model}, {args.new_tokens} new tokens: {describe_machine(args)}")
    columns = ("prompt", "prefill s", "x llava", "decode s/tok", "x llava", "tok/s", "interleaved", "x llava")
    print(f"{'model':<15}" + "".join(f"{column:>13}" for column in columns))
    for name, (prefill, decode) in best.items():
        values = (
            f"{prefill:.3f}", f"{prefill / best['llava'][0]:.3f}", f"{decode:.4f}", f"{decode / best['llava'][1]:.3f}",
            f"{1 / decode:.1f}", f"{steps[name]:.4f}", f"{steps[name] / steps['llava']:.3f}",
        )  # fmt: skip
        print(f"{name:<15}{inputs[name].shape[1]:>13}" + "".join(f"{value:>13}" for value in values))
    print("interleaved: one cached decoding step, the models' steps alternating (see interleaved_decode_steps)")
    speedup = best["dci"][0] / best["dci-efficient"][0]
    print(f"Efficient Dense Connector prefill speed-up over full-token DCI: {speedup:.2f}x")
    return {name: (*best[name], steps[name]) for name in models}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tower_layers=24, lm_layers=2, image_size=224)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run")
    args = parser.parse_args()
    setup(args)
    run(args)


if __name__ == "__main__":
    main()
