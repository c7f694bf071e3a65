"""Compiled static-cache decoding: DCI vs transformers' Llava, both compiled the same way.

`generate(..., cache_implementation="static", compile_config=CompileConfig(fullgraph=True))` compiles the decoding
steps (the prefill, which encodes the image, runs eagerly). Same tower weights and the same language-model modules
(shared) for both models, same prompt text and image-token count. Each model first generates once eagerly and once
compiled (compilation happens there; the compiled ids are compared with the eager ones); then the timed rounds
alternate the models (A, B, A, B, ...). Decode is the time of one later step, best over all steps of all rounds, read
from a logits processor that stamps every step; the spread is the DCI/Llava ratio of each round's best steps (rounds
are side by side, so a loaded machine slows both alike), as its median and range. TorchDynamo's counters show what
each model's compiled decoding is made of: graphs compiled, operations captured in them, graph breaks, and any graph
compiled during the timed rounds (a recompilation there would be a guard failing on a later step); the graphs
TorchInductor is given are recorded and compared between the models operation for operation.

    .venv/bin/python bench/bench_compile.py                      # CPU: CLIP-L width 2 layers, Llama-7B width x2
    .venv/bin/python bench/bench_compile.py --device cuda --dtype bfloat16 --tower-layers 24 --image-size 336 \
        --lm-layers 32 --new-tokens 64
"""

import argparse
import time

import torch
from bench_generate import StepClock, prompt
from common import (
    add_model_arguments,
    build_dense_connector,
    build_llava,
    describe_language_model,
    describe_machine,
    describe_tower,
    setup,
)
from torch._dynamo.utils import counters
from torch._inductor import list_mode_options
from torch._inductor.compile_fx import compile_fx
from transformers import CompileConfig, LogitsProcessorList

from dense_connector.measurement import clock


class RecordingInductor:
    """TorchInductor as a `torch.compile` backend that also keeps the operations of every graph it is given, so that
    two models' compiled graphs can be compared operation for operation."""

    def __init__(self):
        self.graphs: list[list[str]] = []

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs, mode=None, options=None):
        self.graphs.append([str(node.target) for node in graph_module.graph.nodes if node.op.startswith("call_")])
        settings = {**list_mode_options(mode), **(options or {})}  # what `torch.compile(mode=, options=)` sets
        return compile_fx(graph_module, example_inputs, config_patches=settings)


def compile_config(backend: RecordingInductor) -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend=backend)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


def generate(model, input_ids, pixel_values, args, config: CompileConfig | None) -> tuple[torch.Tensor, list[float]]:
    """Greedy static-cache `generate` of `args.new_tokens` tokens (compiled with `config`, eager without); its ids
    and the seconds of each decoding step."""
    step_clock = StepClock(clock(args.device, args.threads))
    extra = {"compile_config": config} if config else {"disable_compile": True}
    ids = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixel_values,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        cache_implementation="static",
        logits_processor=LogitsProcessorList([step_clock]),
        pad_token_id=0,
        **extra,
    )
    stamps = step_clock.stamps
    return ids, [later - earlier for earlier, later in zip(stamps, stamps[1:])]


def dynamo_counts() -> dict[str, int]:
    """What TorchDynamo compiled since its counters were last cleared."""
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "operations captured": counters["stats"]["calls_captured"],
        "graph breaks": sum(counters["graph_break"].values()),
    }


def run(args) -> dict[str, tuple[float, float]]:
    torch._dynamo.reset()
    llava = build_llava(args)
    models = {"llava": llava, "dci": build_dense_connector(args, llava, "dci")}
    size = llava.config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, device=args.device, dtype=getattr(torch, args.dtype))
    num_patches = (size // llava.config.vision_config.patch_size) ** 2
    assert models["dci"].config.num_image_tokens() == num_patches
    input_ids = prompt(num_patches, args.device)

    backends = {name: RecordingInductor() for name in models}
    configs = {name: compile_config(backend) for name, backend in backends.items()}
    eager, compiled, compile_seconds, same_ids = {}, {name: [] for name in models}, {}, {}
    graphs = {}  # TorchDynamo's counts for each model's first compiled generate
    rounds = []  # each round's best DCI step over its best Llava step
    with torch.inference_mode():
        for name, model in models.items():
            ids, steps = generate(model, input_ids, pixel_values, args, None)
            eager[name] = min(steps)
            counters.clear()
            start = time.perf_counter()
            compiled_ids, _ = generate(model, input_ids, pixel_values, args, configs[name])
            compile_seconds[name] = time.perf_counter() - start
            graphs[name] = dynamo_counts()
            same_ids[name] = torch.equal(compiled_ids, ids)  # in half precision, fused kernels may flip near-ties
        counters.clear()
        for _ in range(args.reps):
            best_of_round = {}
            for name, model in models.items():
                steps = generate(model, input_ids, pixel_values, args, configs[name])[1]
                compiled[name] += steps
                best_of_round[name] = min(steps)
            rounds.append(best_of_round["dci"] / best_of_round["llava"])
    timed_compilations = dynamo_counts()["graphs"]
    best = {name: min(steps) for name, steps in compiled.items()}

    tower = describe_tower(llava.config.vision_config)
    language_model = describe_language_model(llava.config.text_config)
    print(f"# compiled static-cache decoding, {tower}, {language_model}, {args.new_tokens} new tokens: ", end="")
    print(describe_machine(args))
    columns = ("eager s/tok", "compiled s/tok", "x eager", "x llava", "first run s", "eager ids")
    print(f"{'model':<8}" + "".join(f"{column:>16}" for column in columns))
    for name in models:
        values = (
            f"{eager[name]:.4f}", f"{best[name]:.4f}", f"{best[name] / eager[name]:.3f}",
            f"{best[name] / best['llava']:.3f}", f"{compile_seconds[name]:.1f}",
            "same" if same_ids[name] else "differ",
        )  # fmt: skip
        print(f"{name:<8}" + "".join(f"{value:>16}" for value in values))
    rounds.sort()
    print(f"dci / llava per round ({args.reps} rounds): median {rounds[len(rounds) // 2]:.3f}, "
          f"range {rounds[0]:.3f}-{rounds[-1]:.3f}")  # fmt: skip
    for name, counts in graphs.items():
        print(f"{name}: " + ", ".join(f"{count} {what}" for what, count in counts.items()))
    print(f"graphs compiled during the timed rounds (recompilations): {timed_compilations}")
    same = backends["dci"].graphs == backends["llava"].graphs
    print(f"dci's compiled graphs are llava's operation for operation: {'yes' if same else 'no'}")
    print("first run s: the first compiled generate (compilation); eager ids: whether the compiled greedy ids equal")
    print("the eager ones (float32: they must; bfloat16/float16: fused kernels may flip near-ties of random weights)")
    return {name: (eager[name], best[name]) for name in models}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tower_layers=2, lm_layers=2, image_size=224)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run")
    args = parser.parse_args()
    setup(args)
    run(args)


if __name__ == "__main__":
    main()
