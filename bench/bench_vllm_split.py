"""vLLM serving a Dense Connector model, split into what it is made of, measured side by side in one run (CPU only).

On the same requests (`bench_vllm.py`'s model and prompts: one image and one question per request, `--new-tokens`
greedy tokens, EOS ignored), round after round:

- vLLM serving the DC checkpoint (its Transformers modeling backend, the folder's remote code);
- vLLM serving the DC model's language model alone, saved as a plain Llama checkpoint: once with vLLM's native Llama,
  once with the Transformers backend (`model_impl="transformers"`), on prompts of the same lengths (text tokens in
  the image placeholders' place);
- the tower + connector encoding the same images outside vLLM (`get_image_features`, the engine's thread count), in
  the batches vLLM formed, and the processor preparing the same requests (resize, normalise, tokenise).

Inside every engine (they run in this process, so `LLM.apply_model` reaches their models) the model's `forward`,
`embed_multimodal` and `compute_logits` are timed, and each run is split into adding the requests
(`LLM.enqueue`: vLLM's input processing, where the processor runs for a multimodal request) and serving them
(`LLM.wait_for_completion`). Everything an engine spends outside those model calls is the engine's own work
(scheduling, sampling, bookkeeping). Each engine serves the whole set once to warm up, then `--reps` rounds, engines
in turn; medians of the rounds count, and ratios are taken within each round. `--profile` then runs each engine
once under the torch profiler and prints the operations whose time differs most between the engines. Prefix caching
and the multimodal processor cache are off: every run prefills and preprocesses every request. vLLM cannot be
installed on the GPU machine, so this benchmark is CPU-only (`.venv-vllm`, `make setup-vllm`).

    .venv-vllm/bin/python bench/bench_vllm_split.py                   # 32 requests, 32 new tokens, 5 rounds
    .venv-vllm/bin/python bench/bench_vllm_split.py --requests 16 --reps 3 --enforce-eager
    .venv-vllm/bin/python bench/bench_vllm_split.py --profile    # then the operations where the engines differ
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


# The engines run in this process, so that `LLM.apply_model` can run this script's functions on their models.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from bench_vllm import build_model, requests  # noqa: E402
from transformers import AutoProcessor, LlamaForCausalLM  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from dense_connector import DenseConnectorForConditionalGeneration  # noqa: E402
from dense_connector.integrations.vllm import token_prompt  # noqa: E402


DC, NATIVE, BACKEND = "DC (Transformers backend)", "LM alone, vLLM native", "LM alone, Transformers backend"
TIMED = ("embed_multimodal", "forward", "compute_logits")  # the model calls timed inside the engines
PHASES = ("input processing", "encoder", "forward", "logits", "engine")


def save_language_model(model: DenseConnectorForConditionalGeneration, processor, folder: Path) -> Path:
    """The DC model's language model and head, saved as a plain Llama checkpoint with the same tokenizer."""
    lm = LlamaForCausalLM(model.config.text_config)
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    return folder


def text_prompts(processor, texts: list[str], images: list) -> list[dict]:
    """Token prompts as long as the DC ones once vLLM expands the images, with text tokens in the images' place."""
    prompts = []
    for text, image in zip(texts, images):
        ids = processor(text=text, images=[image])["input_ids"][0]
        filler = next(token for token in ids if token != processor.image_token_id)
        prompts.append({"prompt_token_ids": [filler if t == processor.image_token_id else t for t in ids]})
    return prompts


def instrument(model) -> int:
    """Runs in an engine: time its model's TIMED calls (seconds per name) and record the encoder's batch sizes."""
    model.bench_seconds, model.bench_batches = dict.fromkeys(TIMED, 0.0), []
    for name in TIMED:
        original = getattr(model, name, None)
        if original is None:
            continue

        def timed(*args, _name=name, _original=original, **kwargs):
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            model.bench_seconds[_name] += time.perf_counter() - start
            if _name == "embed_multimodal":
                model.bench_batches.append(len(result))
            return result

        setattr(model, name, timed)
    return torch.get_num_threads()


def take_timings(model) -> tuple[dict[str, float], list[int]]:
    """Runs in an engine: the seconds and encoder batches recorded since the last call, then reset."""
    seconds, batches = dict(model.bench_seconds), list(model.bench_batches)
    model.bench_seconds, model.bench_batches = dict.fromkeys(TIMED, 0.0), []
    return seconds, batches


def serve(llm: LLM, prompts: list[dict], new_tokens: int) -> tuple[dict[str, float], list[int]]:
    """One run of all requests: its phases (seconds) with the mean time to first token, and the encoder's batches
    (the engine's timings start from zero: `instrument` and every run's `take_timings` leave them so)."""
    start = time.perf_counter()
    llm.enqueue(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
    added = time.perf_counter()
    outputs = llm.wait_for_completion(use_tqdm=False)
    end = time.perf_counter()
    if len(outputs) != len(prompts) or not all(len(out.outputs[0].token_ids) == new_tokens for out in outputs):
        raise RuntimeError(f"an engine returned fewer than {new_tokens} tokens for some request")
    model_seconds, batches = llm.apply_model(take_timings)[0]
    encoder, forward, logits = (model_seconds[name] for name in TIMED)
    phases = {
        "total": end - start, "input processing": added - start, "encoder": encoder, "forward": forward,
        "logits": logits, "engine": end - added - encoder - forward - logits,
        "TTFT": statistics.mean(output.metrics.first_token_latency for output in outputs),
    }  # fmt: skip
    return phases, batches


def preprocess(processor, texts: list[str], images: list) -> float:
    """Seconds to turn every request into model inputs with the processor (what vLLM's engine does per request)."""
    start = time.perf_counter()
    for text, image in zip(texts, images):
        processor(text=text, images=[image], return_tensors="pt")
    return time.perf_counter() - start


def encode(model: DenseConnectorForConditionalGeneration, pixel_values: torch.Tensor, batches: list[int]) -> float:
    """Seconds to encode `pixel_values` in consecutive batches of the given sizes."""
    start, first = time.perf_counter(), 0
    with torch.inference_mode():
        for size in batches:
            model.get_image_features(pixel_values[first : first + size])
            first += size
    return time.perf_counter() - start


def report(rounds: list[dict], requests: int, new_tokens: int) -> None:
    """Medians of the rounds: each engine's phases, then the goal's ratios and where DC's extra time goes."""
    median = {name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
              for name in rounds[0]}  # fmt: skip
    print(f"{'median of rounds, s':32s}{'total':>7s}" + "".join(f"{phase:>17s}" for phase in PHASES)
          + f"{'requests/s':>11s}{'tokens/s':>9s}{'TTFT':>6s}")  # fmt: skip
    for name in (DC, NATIVE, BACKEND):
        row = median[name]
        rates = f"{requests / row['total']:11.2f}{requests * new_tokens / row['total']:9.1f}{row['TTFT']:6.2f}"
        print(f"{name:32s}{row['total']:7.2f}" + "".join(f"{row[phase]:17.2f}" for phase in PHASES) + rates)
    for name in ("encoding outside vLLM", "preprocessing outside vLLM"):
        print(f"{name:32s}{median[name]['total']:7.2f}")

    def ratio(numerator, *terms) -> str:
        values = [r[numerator[0]][numerator[1]] / sum(r[name][key] for name, key in terms) for r in rounds]
        return f"{statistics.median(values):.3f} (rounds {min(values):.3f}-{max(values):.3f})"

    encoding = ("encoding outside vLLM", "total")
    print(f"goal (<= 1.05): DC / (LM native + encoding) {ratio((DC, 'total'), (NATIVE, 'total'), encoding)}")
    preprocessing = ("preprocessing outside vLLM", "total")
    print(f"DC / (LM Transformers backend + encoding + preprocessing) "
          f"{ratio((DC, 'total'), (BACKEND, 'total'), encoding, preprocessing)}")  # fmt: skip
    print(f"LM Transformers backend / LM native: total {ratio((BACKEND, 'total'), (NATIVE, 'total'))}, "
          f"forward {ratio((BACKEND, 'forward'), (NATIVE, 'forward'))}")  # fmt: skip
    print(f"DC / LM Transformers backend: forward {ratio((DC, 'forward'), (BACKEND, 'forward'))}, "
          f"engine {ratio((DC, 'engine'), (BACKEND, 'engine'))}")  # fmt: skip
    print(f"encoder inside / outside vLLM {ratio((DC, 'encoder'), encoding)}")
    extra = {phase: median[DC][phase] - median[NATIVE][phase] for phase in PHASES}
    print(f"DC - LM native = {median[DC]['total'] - median[NATIVE]['total']:.2f} s: "
          + ", ".join(f"{phase} {seconds:+.2f}" for phase, seconds in extra.items()))  # fmt: skip


def profile_operations(engines: dict[str, LLM], prompts: dict[str, list[dict]], new_tokens: int) -> None:
    """One run of each engine under the torch profiler: the operations one engine calls more or less often than the
    other (what differs in its work), then the time of those both call equally often (what differs by chance)."""
    totals = {}
    for name, llm in engines.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            serve(llm, prompts[name], new_tokens)
        totals[name] = {event.key: (event.self_cpu_time_total / 1e6, event.count) for event in profiler.key_averages()}
    nothing = (0.0, 0)
    for one, other in ((BACKEND, NATIVE), (DC, BACKEND)):
        ops = {
            op: (totals[one].get(op, nothing), totals[other].get(op, nothing)) for op in {*totals[one], *totals[other]}
        }
        differing = [op for op, ((_, calls), (_, other_calls)) in ops.items() if calls != other_calls]
        differing.sort(key=lambda op: -abs(ops[op][0][0] - ops[op][1][0]))
        print(f"profile, {one} against {other}: operations called a different number of times (self CPU s, calls)")
        for op in differing[:10]:
            (seconds, calls), (other_seconds, other_calls) = ops[op]
            print(f"  {op[:44]:44s}{seconds - other_seconds:+8.3f} s  ({seconds:.3f} s, {calls} calls against "
                  f"{other_seconds:.3f} s, {other_calls} calls)")  # fmt: skip
        same = [pair for op, pair in ops.items() if op not in differing]
        print(f"  the {len(same)} operations called equally often: {sum(a for (a, _), _ in same):.3f} s against "
              f"{sum(b for _, (b, _) in same):.3f} s")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5, help="rounds after the warm-up")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile in the engines (faster start)")
    parser.add_argument("--profile", action="store_true", help="then profile one run of each engine's operations")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = build_model(Path(scratch) / "dc")
        processor = AutoProcessor.from_pretrained(folder)
        model = DenseConnectorForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        lm_folder = save_language_model(model, processor, Path(scratch) / "lm")
        work = requests(args.requests)
        texts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages, _ in work]
        images = [image for _, image in work]
        prompts = {DC: [token_prompt(processor, text, [image]) for text, image in zip(texts, images)]}
        prompts[NATIVE] = prompts[BACKEND] = text_prompts(processor, texts, images)
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]

        options = dict(
            dtype="float32", seed=0, kv_cache_memory_bytes=1 << 30, distributed_executor_backend="uni",
            disable_log_stats=False, enforce_eager=args.enforce_eager, enable_prefix_caching=False,
        )  # fmt: skip
        start = time.perf_counter()
        engines = {
            DC: LLM(
                model=str(folder), trust_remote_code=True, skip_mm_profiling=True, mm_processor_cache_gb=0, **options
            ),
            NATIVE: LLM(model=str(lm_folder), **options),
            BACKEND: LLM(model=str(lm_folder), model_impl="transformers", **options),
        }
        start_seconds = time.perf_counter() - start
        threads = {name: llm.apply_model(instrument)[0] for name, llm in engines.items()}[DC]
        torch.set_num_threads(threads)

        warm_up = {name: serve(llm, prompts[name], args.new_tokens) for name, llm in engines.items()}
        batches = warm_up[DC][1]
        rounds = []
        for _ in range(args.reps):
            measured = {name: serve(llm, prompts[name], args.new_tokens)[0] for name, llm in engines.items()}
            measured["encoding outside vLLM"] = {"total": encode(model, pixel_values, batches)}
            measured["preprocessing outside vLLM"] = {"total": preprocess(processor, texts, images)}
            rounds.append(measured)

        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
              f"float32, {threads} engine threads; engines started in {start_seconds:.0f} s"
              f"{' (eager)' if args.enforce_eager else ''}; {args.requests} requests of "
              f"{len(prompts[NATIVE][0]['prompt_token_ids'])} prompt tokens (1 image each), {args.new_tokens} new "
              f"tokens; {args.reps} rounds; vLLM encoded the images in batches of {batches}")  # fmt: skip
        report(rounds, args.requests, args.new_tokens)
        if args.profile:
            profile_operations(engines, prompts, args.new_tokens)


if __name__ == "__main__":
    main()
