#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): vLLM after a sync, the 16-bit sampler's drift, OPD
# against TOPD-10% at L = 1,024 and the real pair's step, in about 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh [OUT.json]      on a CUDA machine (default runs/gpu_check.json)
#   bash benchmarks/gpu_check.sh --dry-run       toy sizes on the CPU, seconds (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--dry-run" ]; then
  exec timeout 300 python benchmarks/gpu_check.py --dry-run --out "${2:-runs/gpu_check_dry.json}"
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
exec timeout 540 python benchmarks/gpu_check.py --out "${1:-runs/gpu_check.json}"
