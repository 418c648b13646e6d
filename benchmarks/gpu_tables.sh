#!/usr/bin/env bash
# Every GPU table of BENCHMARKS.md in one go (about 6 minutes on one H100/H200), plus the CUDA
# tests and a GPU run of the demo's comparison. Run from the repository root on a CUDA machine:
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
step $PY benchmarks/horizon_cost.py --device cuda
step $PY benchmarks/horizon_cost.py --device cuda --student random --teacher random --budget 1600 --steps 3 --warmup 1
step $PY benchmarks/vs_trl.py --device cuda
step $PY -m hopd compare --out "$OUT/cmp" --quiet --strategies opd,popd,topd10,topd25 --steps 60 \
    device=cuda batch_size=32 eval_every=6 eval_n=200 diag_every=10
step $PY -m hopd report "$OUT/cmp"
cat "$OUT/cmp/report.md" 2>/dev/null | head -40
