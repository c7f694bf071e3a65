"""Throughput of vLLM vs transformers' `pipeline` with batching, on the same requests (CPU), side by side.

Both serve one checkpoint: a randomly initialised model wider than the demo's (CLIP-style tower 6 x 256 at 224 px,
256 image tokens, DCI; Llama-style 4 x 512 language model, heads of 64), with the demo's processor and tokenizer.
Each request is one image and one question in the vicuna_v1 chat format; every answer is `--new-tokens` greedy
tokens (EOS ignored on both sides), so both produce the same number of tokens. Each side runs the whole set once to
warm up, then `--reps` times alternately; the best run of each counts. vLLM gets the processor's exact ids through
`dense_connector.integrations.vllm.token_prompt`.

    .venv-vllm/bin/python bench/bench_vllm.py                  # 32 requests, 32 new tokens, pipeline batches 8, 32
    .venv-vllm/bin/python bench/bench_vllm.py --model DIR --requests 64 --batch-sizes 16
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, pipeline
from vllm import LLM, SamplingParams

from dense_connector import DenseConnectorConfig, DenseConnectorForConditionalGeneration
from dense_connector.demo_data import make_examples
from dense_connector.integrations.vllm import token_prompt


DEMO = Path(__file__).resolve().parents[1] / "dense_connector" / "demo" / "checkpoint"
IMAGE_SIZE, PATCH_SIZE = 224, 14


def build_model(folder: Path) -> Path:
    """Save a random model of the benchmark's size with the demo's processor (tokenizer, chat template)."""
    processor = AutoProcessor.from_pretrained(DEMO)
    demo = DenseConnectorConfig.from_pretrained(DEMO)
    config = DenseConnectorConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 256, "intermediate_size": 1024,
                       "num_hidden_layers": 6, "num_attention_heads": 4, "image_size": IMAGE_SIZE,
                       "patch_size": PATCH_SIZE},
        text_config={"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
                     "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": demo.text_config.vocab_size,
                     "max_position_embeddings": 1024, "bos_token_id": demo.text_config.bos_token_id,
                     "eos_token_id": demo.text_config.eos_token_id, "pad_token_id": demo.text_config.pad_token_id},
        image_token_id=demo.image_token_id,
        dense_connector_type="dci",
    )  # fmt: skip
    torch.manual_seed(0)
    DenseConnectorForConditionalGeneration(config).save_pretrained(folder)
    processor.image_processor.size = {"shortest_edge": IMAGE_SIZE}
    processor.image_processor.crop_size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor.patch_size = PATCH_SIZE
    processor.tokenizer.padding_side = "left"  # batched generation
    processor.save_pretrained(folder)
    return folder


def requests(count: int) -> list[tuple]:
    """`count` (chat messages, image) pairs: synthetic scenes, each with its first question."""
    return [
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": ex.image}, {"type": "text", "text": ex.questions[0]}],
                }
            ],
            ex.image,
        )
        for ex in make_examples(count, seed=3)
    ]


def run_vllm(llm: LLM, prompts: list[dict], new_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    return time.perf_counter() - start, sum(len(output.outputs[0].token_ids) for output in outputs)


def run_pipeline(pipe, chats: list, new_tokens: int, batch_size: int) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = pipe(text=chats, batch_size=batch_size, max_new_tokens=new_tokens, return_full_text=False)
    return time.perf_counter() - start, len(outputs) * new_tokens  # EOS is off: every answer is new_tokens long


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a saved checkpoint (default: build the benchmark's model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help="the pipeline's batch sizes")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or build_model(Path(scratch) / "model")
        work = requests(args.requests)
        chats = [messages for messages, _ in work]

        start = time.perf_counter()
        # The model runs in the engine's process: no separate worker process polls while the pipeline runs.
        llm = LLM(model=str(folder), trust_remote_code=True, dtype="float32", seed=0, kv_cache_memory_bytes=1 << 30,
                  skip_mm_profiling=True, distributed_executor_backend="uni")  # fmt: skip
        engine_seconds = time.perf_counter() - start
        pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True, dtype=torch.float32)
        pipe.model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: every answer is --new-tokens long
        pipe.model.generation_config.min_new_tokens = None
        processor = pipe.processor
        prompts = [
            token_prompt(processor, processor.apply_chat_template(messages, add_generation_prompt=True), [image])
            for messages, image in work
        ]

        results = {"vLLM": [], **{f"pipeline, batch size {size}": [] for size in args.batch_sizes}}
        run_vllm(llm, prompts, args.new_tokens)  # warm-up
        run_pipeline(pipe, chats, args.new_tokens, args.batch_sizes[0])
        for _ in range(args.reps):
            results["vLLM"].append(run_vllm(llm, prompts, args.new_tokens))
            for size in args.batch_sizes:
                results[f"pipeline, batch size {size}"].append(run_pipeline(pipe, chats, args.new_tokens, size))

    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, float32; vLLM engine start {engine_seconds:.0f} s"
    )
    print(f"{args.requests} requests, 1 image each, {args.new_tokens} new tokens; best of {args.reps} runs")
    vllm_seconds = min(results["vLLM"])[0]
    for name, runs in results.items():
        seconds, tokens = min(runs)
        ratio = "" if name == "vLLM" else f"  (vLLM: {seconds / vllm_seconds:.1f}x the throughput)"
        rates = f"{args.requests / seconds:6.2f} requests/s {tokens / seconds:6.1f} tokens/s"
        print(f"{name:24s} {seconds:6.2f} s {rates}{ratio}")


if __name__ == "__main__":
    main()
