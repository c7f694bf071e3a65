#!/usr/bin/env bash
# GPU check of the evaluation path: LLaVA-format answers of the demo checkpoint on CUDA (batch 1 and 8, --gpus 0)
# against the CPU and the expected answers.
# Run from the repository root on a machine with one GPU: OUT=answers bash bench/gpu_eval.sh (about 1 minute).
set -eu
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
D=$(mktemp -d); M=dense_connector/demo/checkpoint
"${PYTHON:-python3}" -m dense_connector.cli eval --write-demo-data $D >/dev/null
export OUT
run() { "${PYTHON:-python3}" -m dense_connector.cli eval --model $M --question-file $D/llava/questions.jsonl --image-folder $D/llava/images --no-progress "$@"; }
run --answers-file $OUT/cpu-8.jsonl --device cpu --batch-size 8
run --answers-file $OUT/cuda-1.jsonl --device cuda --batch-size 1
run --answers-file $OUT/cuda-8.jsonl --device cuda --batch-size 8
run --answers-file $OUT/gpus0-8.jsonl --gpus 0 --batch-size 8
run --answers-file $OUT/cuda-bf16-8.jsonl --device cuda --batch-size 8 --dtype bfloat16
D=$D "${PYTHON:-python3}" - <<'PY'
import json, os
out = os.environ["OUT"]
expected = {r["question_id"]: r["answer"] for r in map(json.loads, open(os.environ["D"] + "/llava/expected.jsonl"))}
cpu = [json.loads(l)["text"] for l in open(f"{out}/cpu-8.jsonl")]
for name in ("cpu-8", "cuda-1", "cuda-8", "gpus0-8", "cuda-bf16-8"):
    rows = [json.loads(l) for l in open(f"{out}/{name}.jsonl")]
    texts = [r["text"] for r in rows]
    right = sum(r["text"].strip().lower() == expected[r["question_id"]] for r in rows)
    print(f"{name:12} {len(rows)} answers, {right} right, equal to cpu-8: {texts == cpu}")
PY
