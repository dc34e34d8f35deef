#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a bare CUDA machine holding this repository: one JSON, one table.
#   bash bench/gpu_check.sh [OUT_DIR]      (default: $OUT if set, else the current folder)
# The Python budget is 420 s of sections; the hard limit below (470 s) leaves the run inside 8 minutes even
# if a section overruns. Nothing is installed: PyTorch, Triton and transformers must already be there.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 470 python bench/gpu_check.py --device cuda \
  --out "$out/gpu_check.json" --budget 420 2>&1 | tee "$out/gpu_check.txt"
