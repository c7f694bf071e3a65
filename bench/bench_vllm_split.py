"""vLLM serving a Dense Connector model, split into what it is made of, measured side by side in one run (CPU only).

On the same requests (`bench_vllm.py`'s model and prompts: one image and one question per request, `--new-tokens`
greedy tokens, EOS ignored), alternately:

- vLLM serving the DC checkpoint (its Transformers modeling backend, the folder's remote code);
- vLLM serving the DC model's language model alone, saved as a plain Llama checkpoint: once with vLLM's native Llama,
  once with the Transformers backend (`model_impl="transformers"`), on prompts of the same lengths (text tokens in
  the image placeholders' place);
- the tower + connector encoding the same images alone (`get_image_features` in this process, with the engine's
  thread count), in the batches vLLM gave them: the DC engine's `get_image_features` is wrapped (through
  `LLM.apply_model`; the engines run in this process) to record each call's batch size and seconds;
- the processor turning the same requests into model inputs (image resizing and normalisation, tokenisation), which
  vLLM's engine runs for every multimodal request and not for a text prompt.

Each engine serves the whole set once to warm up, then `--reps` times, engines alternating; the best run of each
counts. Prefix caching and the multimodal processor cache are off: every run prefills and preprocesses every request,
as distinct requests would. Per run: requests/s, tokens/s, the mean time to first token (vLLM's per-request stats),
and a prefill run (every request with one new token). The goal ratio is DC's time over (LM native + encoding). vLLM
cannot be installed on the GPU machine, so this benchmark is CPU-only (`.venv-vllm`, `make setup-vllm`).

    .venv-vllm/bin/python bench/bench_vllm_split.py                   # 32 requests, 32 new tokens, best of 3
    .venv-vllm/bin/python bench/bench_vllm_split.py --requests 16 --reps 2 --enforce-eager
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


# The engines run in this process, so that `LLM.apply_model` can run this script's functions on the DC engine's model.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from bench_vllm import build_model, requests  # noqa: E402
from transformers import AutoProcessor, LlamaForCausalLM  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from dense_connector import DenseConnectorForConditionalGeneration  # noqa: E402
from dense_connector.integrations.vllm import token_prompt  # noqa: E402


DC, NATIVE, BACKEND = "DC (Transformers backend)", "LM alone, vLLM native", "LM alone, Transformers backend"


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


def record_encoding(model) -> int:
    """Runs in the DC engine's process: wrap the HF model's `get_image_features` to record (images, seconds)."""
    hf_model, calls = model.model, []
    original = hf_model.get_image_features

    def timed(pixel_values, *args, **kwargs):
        start = time.perf_counter()
        features = original(pixel_values, *args, **kwargs)
        calls.append((len(pixel_values), time.perf_counter() - start))
        return features

    hf_model.get_image_features, hf_model.bench_calls = timed, calls
    return torch.get_num_threads()


def take_encoding_calls(model) -> list[tuple[int, float]]:
    calls = list(model.model.bench_calls)
    model.model.bench_calls.clear()
    return calls


def serve(llm: LLM, prompts: list[dict], new_tokens: int) -> dict[str, float]:
    """One run of all requests: seconds, and the mean time to first token from vLLM's per-request stats."""
    start = time.perf_counter()
    outputs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False
    )
    seconds = time.perf_counter() - start
    if not all(len(output.outputs[0].token_ids) == new_tokens for output in outputs):
        raise RuntimeError(f"an engine returned fewer than {new_tokens} tokens for some request")
    ttft = statistics.mean(output.metrics.first_token_latency for output in outputs)
    return {"seconds": seconds, "ttft": ttft}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile in the engines (faster start)")
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
        threads = engines[DC].apply_model(record_encoding)[0]
        torch.set_num_threads(threads)

        runs = {name: {"total": [], "prefill": []} for name in engines}
        runs["encoding"] = {"total": [], "prefill": []}
        runs["preprocessing"] = {"total": [], "prefill": []}
        in_engine = []  # seconds the DC engine spent in get_image_features, per timed full run
        for name, llm in engines.items():  # warm-up
            serve(llm, prompts[name], args.new_tokens)
        batches = [size for size, _ in engines[DC].apply_model(take_encoding_calls)[0]]
        encode(model, pixel_values, batches)
        for _ in range(args.reps):
            for name, llm in engines.items():
                runs[name]["total"].append(serve(llm, prompts[name], args.new_tokens))
                if name == DC:
                    in_engine.append(sum(seconds for _, seconds in llm.apply_model(take_encoding_calls)[0]))
                runs[name]["prefill"].append(serve(llm, prompts[name], 1))
            engines[DC].apply_model(take_encoding_calls)  # the prefill run's calls
            seconds = encode(model, pixel_values, batches)
            runs["encoding"]["total"].append({"seconds": seconds, "ttft": seconds})
            runs["encoding"]["prefill"] = runs["encoding"]["total"]
            seconds = preprocess(processor, texts, images)
            runs["preprocessing"]["total"].append({"seconds": seconds, "ttft": seconds})
            runs["preprocessing"]["prefill"] = runs["preprocessing"]["total"]

    best = {name: {kind: min(values, key=lambda run: run["seconds"]) for kind, values in kinds.items()}
            for name, kinds in runs.items()}  # fmt: skip
    tokens = args.requests * args.new_tokens
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"float32, {threads} engine threads; engines started in {start_seconds:.0f} s"
          f"{' (eager)' if args.enforce_eager else ''}")  # fmt: skip
    print(f"{args.requests} requests of {len(prompts[NATIVE][0]['prompt_token_ids'])} prompt tokens (1 image each), "
          f"{args.new_tokens} new tokens; best of {args.reps} alternating runs; vLLM encoded the images in batches of "
          f"{batches}")  # fmt: skip
    print(f"{'':32s}{'time s':>8s}{'requests/s':>12s}{'tokens/s':>10s}{'mean TTFT s':>13s}{'prefill s':>11s}")
    for name, value in best.items():
        total, prefill = value["total"], value["prefill"]
        rates = f"{args.requests / total['seconds']:12.2f}{tokens / total['seconds'] if name in engines else 0:10.1f}"
        print(f"{name:32s}{total['seconds']:8.2f}{rates}{total['ttft']:13.2f}{prefill['seconds']:11.2f}")
    dc, native, backend, encoding, preprocessing = (
        best[name] for name in (DC, NATIVE, BACKEND, "encoding", "preprocessing")
    )
    spread = sorted(run["seconds"] for run in runs[DC]["total"])
    print(f"DC runs {spread[0]:.2f}-{spread[-1]:.2f} s; in them, get_image_features took "
          f"{min(in_engine):.2f}-{max(in_engine):.2f} s inside the engine")  # fmt: skip
    for kind in ("total", "prefill"):
        seconds = {name: value[kind]["seconds"] for name, value in best.items()}
        added = seconds["encoding"] + seconds["preprocessing"]
        ratios = {
            "LM native + encoding": seconds[DC] / (seconds[NATIVE] + seconds["encoding"]),
            "LM native + encoding + preprocessing": seconds[DC] / (seconds[NATIVE] + added),
            "LM Transformers backend + encoding + preprocessing": seconds[DC] / (seconds[BACKEND] + added),
        }
        print(f"{kind}: " + "; ".join(f"DC / ({what}) {ratio:.3f}" for what, ratio in ratios.items()))
    print("goal: DC / (LM native + encoding) <= 1.05")


if __name__ == "__main__":
    main()
