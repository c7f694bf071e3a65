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

`--mix` runs instead an epoch of stage 2 (projector + LM) over a synthetic instruction mix (`instruction_mix.py`:
the documented length distribution, 576 placeholders per image) in batches of `--batch` records in the original's
modality-grouped order (`original_order`), padded as the original pads (the collator's default), then padded in this
package's length-grouped order (exact lengths), and in the original's order padding-free with SDPA over the whole
row (transformers' packed-sequence mask), padding-free with SDPA record by record (`VARLEN_SDPA`, what
`--padding_free` uses with SDPA) and that with the chunked cross-entropy (`--use_liger_kernel` on a CPU), each from
the same weights: records/s, the ratios to the first, the epoch's mean loss and the peak memory of each mode's
largest step (`--peak-only`: that alone; `--vocab 128256` for Llama-3's vocabulary), the padding counted with each
image as its placeholders and as one token, and the optimizer steps' share of the time. The model is narrow so that
an epoch fits a CPU (`--mix-width`, `--lm-layers`; a 2-layer CLIP at 96 px), so its head and loss take a larger
share of the work than in a 7B model:

    .venv/bin/python bench/bench_training.py --mix          # CPU: 96 records, batch 8, a 256-wide 1-layer Llama
    python bench/bench_training.py --mix --device cuda --dtype bfloat16 --mix-width 4096 --lm-layers 8 \
        --attn flash_attention_2                              # GPU: 8 Llama-7B layers, flash-attention varlen
"""

import argparse
from functools import partial
from types import SimpleNamespace

import instruction_mix
import torch
from bench_generate import prompt
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

from dense_connector import DenseConnectorConfig, DenseConnectorForConditionalGeneration
from dense_connector.measurement import clock, interleaved_times, mib, peak_bytes
from dense_connector.training import (
    IGNORE_INDEX,
    VARLEN_SDPA,
    DenseConnectorDataCollator,
    chunked_cross_entropy,
    prepare_for_training,
)
from dense_connector.training.trainer import modality_grouped_indices


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


def mix_model(args) -> DenseConnectorForConditionalGeneration:
    """DCI over a 64-wide CLIP at 96 px (patch 4: 576 tokens, as CLIP-L/336; 2 layers run), a `--mix-width` Llama."""
    width = args.mix_width
    config = DenseConnectorConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 96, "patch_size": 4},
        text_config={"model_type": "llama", "hidden_size": width, "intermediate_size": width * 11008 // 4096,
                     "num_attention_heads": width // 128, "num_hidden_layers": args.lm_layers,
                     "vocab_size": args.vocab, "max_position_embeddings": 4096},
        image_token_id=IMAGE_TOKEN_ID,
        dense_connector_type="dci",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(args.device):
        model = DenseConnectorForConditionalGeneration._from_config(
            config, dtype=getattr(torch, args.dtype), attn_implementation=args.attn
        )
    return prepare_for_training(model, "projector+lm").train()


def original_order(lengths: list[int], step_size: int, generator) -> list[int]:
    """The order of the original LLaVA trainer's `group_by_modality_length` on one process: each modality shuffled
    and cut into steps (its "length grouping" sorts only inside a step, to balance ranks), the steps shuffled, what
    is left of both modalities last. This package's sampler sorts by length over 50 steps at a time instead."""
    runs, rest = [], []
    for sign in (1, -1):
        indices = [index for index, length in enumerate(lengths) if length * sign > 0]
        shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        full = len(shuffled) - len(shuffled) % step_size
        runs += [shuffled[start : start + step_size] for start in range(0, full, step_size)]
        rest += shuffled[full:]
    shuffled_runs = [runs[j] for j in torch.randperm(len(runs), generator=generator).tolist()]
    return [index for run in shuffled_runs for index in run] + rest


def run_mix(args) -> dict[str, dict[str, float]]:
    model = mix_model(args)
    encoded = instruction_mix.records(args.records, model.config)
    lengths = [len(ids) * (1 if pixels else -1) for ids, _, pixels in encoded]
    orders = {"original": original_order(lengths, args.batch, torch.Generator().manual_seed(0)),
              "grouped": modality_grouped_indices(lengths, args.batch, torch.Generator().manual_seed(0))}  # fmt: skip
    # the collator's batching alone: a tokenizer stand-in with the pad id (the records are tokenised already)
    processor = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0, init_kwargs={}))
    padded, flat = DenseConnectorDataCollator(processor), DenseConnectorDataCollator(processor, padding_free=True)
    chunked = partial(chunked_cross_entropy, chunk_size=1024)
    attention = args.attn
    modes = {"padded (original's order)": (padded, "original", None, attention),
             "padded, length-grouped": (padded, "grouped", None, attention),
             "padding-free, whole row": (flat, "original", None, attention)}  # fmt: skip
    if attention == "sdpa":  # what --padding_free runs with SDPA
        attention = VARLEN_SDPA
        modes["padding-free, by record"] = (flat, "original", None, attention)
    modes["+ chunked loss"] = (flat, "original", chunked, attention)
    batches = {}
    for name, (collator, order, _, _) in modes.items():
        steps = [[encoded[i] for i in orders[order][start : start + args.batch]]
                 for start in range(0, len(encoded), args.batch)]  # fmt: skip
        batches[name] = [move(collator.collate(step), args) for step in steps]
    real = sum(len(ids) for ids, _, _ in encoded)
    print(f"# an epoch of {len(encoded)} records ({real:,} tokens) in modality-grouped batches of "
          f"{args.batch}: {describe_machine(args)}, {args.attn}")  # fmt: skip
    print(f"# {describe_language_model(model.config.text_config)}, vocabulary {args.vocab:,}, DCI over a "
          f"{describe_tower(model.config.vision_config)}, 576 placeholders per image")  # fmt: skip
    print(f"{'mode':<29}{'tokens':>10}{'epoch s':>10}{'records/s':>11}{'mean loss':>11}{'peak step':>14}")
    start_state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    now = clock(args.device, args.threads)
    results = {}
    for name, (_, _, loss, implementation) in modes.items():
        model.hidden_states_loss = loss
        model.model.language_model.set_attn_implementation(implementation)
        mode_batches = batches[name]
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(start_state[param_name])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        losses, optimizer_seconds, began = [], 0.0, now()
        for batch in [] if args.peak_only else mode_batches:
            loss = model(**batch).loss
            loss.backward()
            stepping = now()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer_seconds += now() - stepping
            losses.append(loss.item())
        seconds = max(now() - began, 1e-9)
        largest = max(mode_batches, key=lambda batch: batch["input_ids"].numel())
        peak = peak_bytes(lambda largest=largest: model(**largest).loss.backward(), args.device)
        model.zero_grad(set_to_none=True)
        tokens = sum(batch["input_ids"].numel() for batch in mode_batches)
        mean = sum(losses) / max(len(losses), 1)
        results[name] = {"seconds": seconds, "loss": mean, "peak": peak, "tokens": tokens,
                         "optimizer": optimizer_seconds}  # fmt: skip
        timed = "" if args.peak_only else f"{seconds:>10.1f}{len(encoded) / seconds:>11.2f}{mean:>11.4f}"
        print(f"{name:<29}{tokens:>10,}{timed or ' ' * 32}{mib(peak):>14}")
    base = results["padded (original's order)"]
    grouped = results["padded, length-grouped"]
    as_text = text_padding(encoded, orders["original"], model, args)
    print(f"# padded tokens / real tokens: {base['tokens'] / real:.2f} in the original's order, "
          f"{grouped['tokens'] / real:.2f} length-grouped; counting an image as one token (the original's ids "
          f"before the tower's features replace it): {as_text:.2f}")  # fmt: skip
    if not args.peak_only:
        last = results[list(modes)[-2]]
        print(f"# optimizer steps: {last['optimizer'] / last['seconds']:.1%} of the {list(modes)[-2]} epoch "
              "(what packing records into fewer steps could save at most)")  # fmt: skip
    for name in list(modes)[1:]:
        speed = f"records/s {base['seconds'] / results[name]['seconds']:.2f}x, "
        difference = f", mean loss difference {abs(results[name]['loss'] - base['loss']):.1e}"
        print(f"# {name} / padded in the original's order: {'' if args.peak_only else speed}peak step memory "
              f"{results[name]['peak'] / base['peak']:.2f}x{'' if args.peak_only else difference}")  # fmt: skip
    return results


def text_padding(encoded: list, order: list[int], model, args) -> float:
    """Padded / real tokens of the batches in `order` when each image counts as one token, not its placeholders."""
    image_tokens = model.config.num_image_tokens()
    lengths = [len(ids) - (image_tokens - 1 if pixels else 0) for ids, _, pixels in encoded]
    steps = [order[start : start + args.batch] for start in range(0, len(order), args.batch)]
    return sum(len(step) * max(lengths[i] for i in step) for step in steps) / sum(lengths)


def move(batch, args) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, args.dtype)
    return {k: v.to(args.device, dtype) if v.is_floating_point() else v.to(args.device) for k, v in batch.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tower_layers=24, lm_layers=1, image_size=112)
    parser.add_argument("--batch", type=int, default=None, help="records per step (default 1; --mix: 8)")
    parser.add_argument("--mix", action="store_true", help="an epoch over the instruction mix, padded vs padding-free")
    parser.add_argument("--records", type=int, default=96, help="--mix: records in the epoch")
    parser.add_argument("--mix-width", type=int, default=256, help="--mix: the Llama's width (7B: 4096)")
    parser.add_argument("--attn", default="sdpa", help="--mix: attention (sdpa, eager, flash_attention_2)")
    parser.add_argument("--vocab", type=int, default=32000, help="--mix: vocabulary size (Llama-3: 128256)")
    parser.add_argument("--peak-only", action="store_true", help="--mix: only the peak memory of the largest steps")
    args = parser.parse_args()
    setup(args)
    if args.mix:
        args.batch = args.batch or 8
        run_mix(args)
    else:
        args.batch = args.batch or 1
        run(args)


if __name__ == "__main__":
    main()
