"""Training steps: time and peak memory of a stage-1 and a stage-2 step, DCI vs connector `none` (LLaVA-1.5).

Both models share the tower weights and the very same language-model modules (`common.build_dense_connector`), so
the differences are DCI's: the tower states it reads and averages, and its 3x wider first projector layer. A step is
forward, backward, AdamW step and `zero_grad`, in training mode (no KV cache), regimes as `examples/finetune.py`
sets them (`prepare_for_training`): stage 1 trains the projector only, stage 2 the projector and the language model,
the tower frozen in both. Steps are timed interleaved (none, dci, none, dci, ...) after one warm-up step each, which
also creates the optimizer state; "step peak" is the peak of the tensors a step allocates (activations, gradients,
temporaries), "total" adds the weights and the AdamW state that live through training.

    .venv/bin/python bench/bench_training.py                # CPU: 24-layer CLIP at 112 px, one 7B-wide layer
    .venv/bin/python bench/bench_training.py --tiny         # smoke test, seconds
    python bench/bench_training.py --device cuda --dtype bfloat16 --image-size 336 --lm-layers 32 --batch 2 --reps 5
"""

import argparse

import torch
from bench_generate import prompt
from common import add_model_arguments, build_dense_connector, build_llava, describe_machine, setup

from dense_connector.measurement import clock, interleaved_times, mib, peak_bytes
from dense_connector.training import IGNORE_INDEX, prepare_for_training


STAGES = {"stage 1 (projector)": "projector", "stage 2 (projector + LM)": "projector+lm"}


def make_batch(model, args) -> dict[str, torch.Tensor]:
    """`args.batch` copies of a prompt with one image; labels on the text after the image, as a caption or reply."""
    input_ids = prompt(model.config.num_image_tokens(), args.device).repeat(args.batch, 1)
    labels = input_ids.clone()
    labels[:, : (input_ids[0] == model.config.image_token_id).nonzero().max() + 1] = IGNORE_INDEX
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(args.batch, 3, size, size, generator=generator).to(
        args.device, getattr(torch, args.dtype)
    )
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "pixel_values": pixel_values}  # fmt: skip


def step(model, batch: dict, optimizer) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def resident_bytes(model, optimizer) -> int:
    """Weights of `model` and the optimizer state of its parameters (what lives between steps)."""
    params = {id(p): p for p in model.parameters()}
    weights = sum(p.numel() * p.element_size() for p in params.values())
    state = sum(
        t.numel() * t.element_size()
        for p, values in optimizer.state.items()
        if id(p) in params
        for t in values.values()
        if torch.is_tensor(t)
    )
    return weights + state


def run(args) -> dict[str, dict[str, float]]:
    llava = build_llava(args)
    models = {"none": build_dense_connector(args, llava, "none"), "dci": build_dense_connector(args, llava, "dci")}
    del llava  # its language model lives on in both models; its tower and projector are not needed
    batches = {name: make_batch(model, args) for name, model in models.items()}
    now = clock(args.device, args.threads)
    tokens = batches["dci"]["input_ids"].shape[1]
    print(f"# training steps, batch {args.batch} x {tokens} tokens: {describe_machine(args)}")
    print(f"{'stage':<26}{'model':<7}{'step s':>10}{'step peak':>14}{'total':>14}")
    results = {}
    for stage, tune in STAGES.items():
        for model in models.values():
            prepare_for_training(model, tune).train()
        # one optimizer over both models' trainable parameters (the shared language model's once); a step updates
        # only the parameters its model's backward gave gradients to
        trainable = {id(p): p for model in models.values() for p in model.parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(trainable.values(), lr=1e-6)

        functions = {name: (lambda name=name, optimizer=optimizer: step(models[name], batches[name], optimizer))
                     for name in models}  # fmt: skip
        best = interleaved_times(functions, args.reps, now)
        peaks = {name: peak_bytes(functions[name], args.device) for name in models}
        totals = {name: resident_bytes(model, optimizer) + peaks[name] for name, model in models.items()}
        for name in models:
            print(f"{stage:<26}{name:<7}{best[name]:>10.3f}{mib(peaks[name]):>14}{mib(totals[name]):>14}")
        ratios = {"time": best["dci"] / best["none"], "step peak": peaks["dci"] / peaks["none"],
                  "total": totals["dci"] / totals["none"]}  # fmt: skip
        print(f"{stage:<26}{'dci/none':<7}{ratios['time']:>10.3f}{ratios['step peak']:>14.3f}{ratios['total']:>14.3f}")
        results[stage] = ratios
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tower_layers=24, lm_layers=1, image_size=112)
    parser.add_argument("--batch", type=int, default=1, help="records per step")
    args = parser.parse_args()
    setup(args)
    run(args)


if __name__ == "__main__":
    main()
