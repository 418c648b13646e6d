#!/usr/bin/env bash
# One lent-GPU call: the horizon study for both regimes, 7 runs at a time per regime.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python && export PATH=/tmp/bin:$PATH
nvidia-smi -L
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.is_available())"
S=/tmp/study
pack() { tar czf "$OUT/study.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' -C /tmp study 2>/dev/null; }
t0=$SECONDS
python -m hopd distill configs/opd.yaml --out /tmp/smoke --quiet max_steps=2 eval_n=8 diag_every=1 batch_size=4 > "$OUT/smoke.log" 2>&1 || { tail -40 "$OUT/smoke.log"; exit 1; }
echo "smoke ok in $((SECONDS - t0)) s"; tail -2 "$OUT/smoke.log"
(while sleep 30; do pack; done) & packer=$!
JOBS=${JOBS:-7} THREADS=1 timeout ${LIMIT:-440} bash benchmarks/horizon_study.sh $S fork > "$OUT/fork.log" 2>&1 & a=$!
JOBS=${JOBS:-7} THREADS=1 timeout ${LIMIT:-440} bash benchmarks/horizon_study.sh $S spread > "$OUT/spread.log" 2>&1 & b=$!
wait $a $b
echo "study done at $((SECONDS - t0)) s"
kill $packer; pack
grep -h "study:" "$OUT/fork.log" "$OUT/spread.log"
nvidia-smi --query-gpu=name,memory.used --format=csv
ls -la "$OUT"
