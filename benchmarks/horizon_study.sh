#!/usr/bin/env bash
# The horizon study (docs/horizon_study.md): every strategy in both regimes of the testbed, each at
# its own learning rate chosen on the val half, then three seeds reported on the test half.
#
#   bash benchmarks/horizon_study.sh OUT [REGIME ...]     REGIME: fork, spread (default: both)
#   JOBS=8 THREADS=1 bash benchmarks/horizon_study.sh ...  runs 8 at a time (a GPU: minutes)
#
# Protocol, fixed before any test number was read:
#   stage 1 (choose): strategies x rates {1e-4, 3e-4, 1e-3, 3e-3}, seed 0, 60 steps x 32 prompts (the
#     demo's budget); each run ends with 200 val problems (the rate is chosen on these) and is
#     evaluated on 100 test problems at its start and end only (shown, never used to choose);
#   stage 2 (report): each strategy at its chosen rate, seeds 0, 1 and 2, 500 test problems at
#     steps 0, 15, 30, 45 and 60 (two standard errors <= 4.5 points).
# Everything else is configs/opd.yaml (loss rkl, AdamW, 3 warm-up steps, cosine to 10%).
set -euo pipefail
OUT=${1:?usage: horizon_study.sh OUT [fork] [spread]}
shift
REGIMES=${*:-fork spread}
# STRATEGIES, LRS, STEPS and EXTRA (overrides applied last) exist for smoke tests of this script
STRATEGIES=${STRATEGIES:-sft,opd,popd,topd10,topd25,adaptive}
LRS=${LRS:-1e-4,3e-4,1e-3,3e-3}
read -r -a EXTRA <<< "${EXTRA:-}"
COMMON=(--steps "${STEPS:-60}" --quiet --jobs "${JOBS:-1}" diag_every=10 "threads=${THREADS:-2}")

for regime in $REGIMES; do
  case $regime in
    fork) student=testbed:student-fork ;;
    spread) student=testbed:student ;;
    *) echo "unknown regime $regime: use fork or spread" >&2; exit 2 ;;
  esac
  grid=$OUT/$regime/grid
  t0=$SECONDS
  python -m hopd compare configs/opd.yaml --out "$grid" --resume --strategies $STRATEGIES \
    --lrs "$LRS" "${COMMON[@]}" student=$student eval_every=0 eval_n=100 val_n=200 \
    "${EXTRA[@]}"
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
    --strategies "$chosen" --seeds 0,1,2 "${COMMON[@]}" student=$student eval_every=15 \
    eval_n=500 "${EXTRA[@]}"
  echo "study: $regime stage 2 took $((SECONDS - t0)) s"
done
