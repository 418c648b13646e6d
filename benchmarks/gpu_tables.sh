#!/usr/bin/env bash
# Every GPU table of BENCHMARKS.md in one go (about 8 minutes on one H100/H200), plus the CUDA
# tests and the demo on the GPU. Run from the repository root on a CUDA machine:
#   bash benchmarks/gpu_tables.sh [OUT_DIR]
# With trl/datasets missing, vs_trl.py says so and the rest goes on.
set -u
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
step() { echo; echo "=== $*"; timeout 240 "$@" 2>&1 | grep -v -E "Warning|warn\(|Loading weights"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step $PY -m pytest -q -p no:cacheprovider tests/test_fastgen.py
step $PY benchmarks/sampler.py --device cuda
step $PY benchmarks/sampler.py --device cuda --model testbed:teacher
step $PY benchmarks/sampler.py --device cuda --batch 256
step $PY benchmarks/sampler.py --device cuda --model random:qwen2-0.5b --tokens 256
step $PY benchmarks/sampler.py --device cuda --model random:qwen2-1.5b --tokens 256
step $PY benchmarks/horizon_cost.py --device cuda
step $PY benchmarks/horizon_cost.py --device cuda --student random --teacher random --budget 1600 --steps 3 --warmup 1
step $PY benchmarks/vs_trl.py --device cuda
step $PY -m hopd demo --device cuda --out "$OUT/demo" --quiet
cat "$OUT/demo/report.md" 2>/dev/null | head -40
