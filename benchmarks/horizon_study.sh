#!/usr/bin/env bash
# The horizon study (docs/horizon_study.md): every strategy in each regime, each at its own
# learning rate chosen on the val half, then several seeds reported on the test half.
#
#   bash benchmarks/horizon_study.sh OUT [REGIME ...]   REGIME: fork, spread, pruned, real (default: all)
#   JOBS=8 THREADS=1 bash benchmarks/horizon_study.sh ...  runs 8 at a time (a GPU: minutes)
#
# Protocol, fixed before any test number was read:
#   testbed regimes (fork, spread):
#     stage 1 (choose): strategies x rates {1e-4, 3e-4, 1e-3, 3e-3}, seed 0, 60 steps x 32 prompts
#       (the demo's budget); each run ends with 200 val problems (the rate is chosen on these) and
#       is evaluated on 100 test problems at its start and end only (shown, never used to choose);
#     stage 2 (report): each strategy at its chosen rate, seeds 0, 1 and 2, 500 test problems at
#       steps 0, 15, 30, 45 and 60 (two standard errors <= 4.5 points).
#   real (SmolLM2-135M-Instruct teacher; its 24-of-30-layer prune, warm-started by the real-pair
#   recipe's first version (the README's now keeps 25 layers), as the student; the shipped chat
#   prompts, whose 886 train / 49 val / 65 test prompts are disjoint; L = 128 tokens; metric:
#   held-out reverse KL at the full budget, lower is better):
#     stage 1 (choose): strategies x rates {1e-4, 3e-4, 1e-3}, seed 0, 12 steps x 4 prompts; each
#       run ends with the reverse KL on 24 val prompts (the rate is chosen on these) and is
#       evaluated on 8 test prompts at its start and end only (shown, never used to choose);
#       a rate chosen at the grid's edge runs that strategy at the next rate out (x3 or /3), and
#       the choice is made again over the wider grid;
#     stage 2 (report): each strategy at its chosen rate, seeds 0 and 1 (SEEDS), 24 test prompts at
#       steps 0, 6 and 12; in both stages per-position diagnostics every 6 steps on 16 rollouts (64
#       for the adaptive schedule, which widens on them).
#   pruned (the misspecified testbed regime: the testbed teacher cut to its first and last layers,
#   2 of 4, is the student, with no warm start; it cannot follow the teacher's chains token for
#   token): as fork and spread, with rates {3e-4, 1e-3, 3e-3}.
#   real is sized for two CPU cores (about two hours with JOBS=2 THREADS=1); the same script on a GPU.
# Everything else is configs/opd.yaml (loss rkl, AdamW, warm-up, cosine to 10%).
set -euo pipefail
OUT=${1:?usage: horizon_study.sh OUT [fork] [spread] [pruned] [real]}
shift
REGIMES=${*:-fork spread pruned real}
# STRATEGIES, LRS, STEPS, SEEDS and EXTRA (overrides applied last) exist for smoke tests
STRATEGIES=${STRATEGIES:-sft,opd,popd,topd10,topd25,adaptive}
read -r -a EXTRA <<< "${EXTRA:-}"
RUN=(--quiet --jobs "${JOBS:-1}" "threads=${THREADS:-2}")
TEACHER=smollm2:135m-instruct

real_student() {  # the real-pair recipe's first version, stages 1-2: 24 layers, SFT warm start
  local dir=$1
  if [ ! -e "$dir/warm/model/config.json" ]; then
    [ -e "$dir/student/config.json" ] || python -m hopd prune $TEACHER --layers 24 --out "$dir/student"
    python -m hopd distill --out "$dir/warm" --overwrite student="$dir/student" teacher=$TEACHER \
      data=chat:prompts budget=128 batch_size=8 optim.warmup_steps=3 eval_every=40 eval_n=32 \
      eval_kl_n=32 diag_every=0 loss.kind=sft max_steps=40 optim.lr=1e-4 --quiet
  fi
  echo "$dir/warm/model"
}

for regime in $REGIMES; do
  case $regime in
    fork|spread)
      [ "$regime" = fork ] && student=testbed:student-fork || student=testbed:student
      steps=${STEPS:-60}; lrs=${LRS:-1e-4,3e-4,1e-3,3e-3}; seeds=${SEEDS:-0,1,2}
      common=(student=$student diag_every=10)
      choose=(eval_every=0 eval_n=100 val_n=200)
      report=(eval_every=15 eval_n=500) ;;
    real)
      student=${REAL_STUDENT:-$(real_student "$OUT/real/pair" | tail -1)}
      steps=${STEPS:-12}; lrs=${LRS:-1e-4,3e-4,1e-3}; seeds=${SEEDS:-0,1}
      common=(student=$student teacher=$TEACHER data=chat:prompts budget=128 batch_size=4
              optim.warmup_steps=2 eval_metric=rkl diag_every=6 diag_n=16)
      choose=(eval_every=0 eval_n=8 val_n=24 eval_kl_n=24)
      report=(eval_every=6 eval_n=24 eval_kl_n=24) ;;
    pruned)
      student=$OUT/pruned/student
      [ -e "$student/config.json" ] || python -m hopd prune testbed:teacher --keep 0,3 \
        --out "$student" > /dev/null
      steps=${STEPS:-60}; lrs=${LRS:-3e-4,1e-3,3e-3}; seeds=${SEEDS:-0,1,2}
      common=(student=$student diag_every=10)
      choose=(eval_every=0 eval_n=100 val_n=200)
      report=(eval_every=15 eval_n=500) ;;
    *) echo "unknown regime $regime: use fork, spread, real or pruned" >&2; exit 2 ;;
  esac
  extra=(--steps "$steps" "${common[@]}")
  grid=$OUT/$regime/grid
  t0=$SECONDS
  python -m hopd compare configs/opd.yaml --out "$grid" --resume --strategies "$STRATEGIES" \
    --lrs "$lrs" "${RUN[@]}" "${extra[@]}" "${choose[@]}" "${EXTRA[@]}"
  # a rate chosen at the grid's edge: that strategy once more at the next rate out
  for pass in 1 2; do
    more=$(python - "$grid" "$lrs" <<'EOF'
import json, sys
from pathlib import Path
grid, lrs = Path(sys.argv[1]), sorted(float(x) for x in sys.argv[2].split(","))
rows = json.loads((grid / "summary.json").read_text())["lr_grid"][1:]
tried = {}
for r in rows:
    tried.setdefault(r[0], set()).add(float(r[1]))
out = []
for r in rows:
    if r[5] == "yes":
        rates = sorted(tried[r[0]])
        lr = float(r[1])
        if lr == rates[0]:
            out.append(f"{r[0]}@{lr / 3:.3g}")
        elif lr == rates[-1]:
            out.append(f"{r[0]}@{lr * 3:.3g}")
print(",".join(out))
EOF
)
    [ -z "$more" ] && break
    echo "study: $regime chosen at the grid's edge, extending: $more"
    python -m hopd compare configs/opd.yaml --out "$grid/edge$pass" --resume \
      --strategies "$more" "${RUN[@]}" "${extra[@]}" "${choose[@]}" "${EXTRA[@]}"
    python -m hopd report "$grid" --out "$grid" > /dev/null
  done
  echo "study: $regime stage 1 took $((SECONDS - t0)) s"
  # the rate each strategy won on val, as NAME@LR
  chosen=$(python - "$grid/summary.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["lr_grid"][1:]
print(",".join(f"{r[0]}@{r[1]}" for r in rows if r[5] == "yes"))
EOF
)
  echo "study: $regime chosen on val: $chosen"
  t0=$SECONDS
  python -m hopd compare configs/opd.yaml --out "$OUT/$regime/seeds" --resume \
    --strategies "$chosen" --seeds "$seeds" "${RUN[@]}" "${extra[@]}" "${report[@]}" \
    "${EXTRA[@]}"
  echo "study: $regime stage 2 took $((SECONDS - t0)) s"
done
