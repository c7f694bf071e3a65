#!/usr/bin/env bash
# Real-size benchmark on one GPU in bfloat16 with SDPA (< 5 minutes on one H100, plus compilation for the compiled
# decoding comparison, which `--no-compile` skips); `bench/gpu.sh --tiny` smoke-tests it on a CPU. Options: see
# `bench/gpu.sh --help`.
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-../.venv/bin/python}" gpu.py "$@"
