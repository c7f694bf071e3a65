#!/usr/bin/env bash
# One-GPU smoke run of the multi-GPU configs (not yet run on a GPU): `examples/finetune.py` on the bundled demo
# checkpoint, 3 steps in bf16 with activation checkpointing, under FSDP2 (`fsdp.yaml`) and DeepSpeed ZeRO-3
# (`deepspeed_zero3.yaml`, needs `pip install deepspeed`), each with `--num_processes 1`; prints each run's losses.
# CPU runs of the same configs with 2 processes are `make test-distributed`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-$(mktemp -d)}"
for config in fsdp deepspeed_zero3; do
    "$(dirname "$PY")/accelerate" launch --config_file "examples/accelerate/$config.yaml" --num_processes 1 \
        examples/finetune.py --model_name_or_path dense_connector/demo/checkpoint \
        --data_path examples/data/shapes_llava.json --image_folder examples/data --tune projector+lm \
        --output_dir "$OUT/$config" --max_steps 3 --per_device_train_batch_size 2 --learning_rate 1e-3 --bf16 \
        --activation_checkpointing --logging_steps 1 --save_strategy no --report_to none
    "$PY" -c "import json, sys; print(sys.argv[1], 'saved:', sorted(json.load(open(sys.argv[2]))['auto_map'].values()))" \
        "$config" "$OUT/$config/config.json"
done
