#!/usr/bin/env bash
# The real-pair recipe (benchmarks/real_pair.sh) over several seeds and a few variants of its OPD
# stage, JOBS processes at a time in every phase: how reliably each meets the marks of the
# real-pair issue (held-out reverse KL at most half the pruned student's, teacher NLL below it,
# distinct-2 >= 0.5, no answer mostly one token). Each seed has its own warm start (a variant
# may have its own: WARM); every OPD run is read on 32 `val` prompts halfway and at its end,
# then on 32 `test` prompts (hopd eval): choose on val, then read test. The table and grid.png
# come from benchmarks/real_pair_table.py, which can also be run on a grid that was stopped
# (finished readings only). Run again on the same OUT, the grid skips the prune, warm starts and
# runs that finished, and resumes a run that a signal stopped from its checkpoint. On a lent H200
# 12 runs side by side took 2.3 s a step each, 5.2 steps a second together (2026-12-04), so the
# default grid's 3,240 OPD steps are about 11 minutes there; on the 2-core CPU one run is the
# recipe's hour or more (JOBS=1).
#   bash benchmarks/real_pair_grid.sh TEACHER OUT [JOBS]
#   TEACHER: smollm2:135m-instruct, a .gguf file or a folder. Environment: SEEDS (default
#   "0 1 2"), VARIANTS (names below), WARM_STEPS (40), EVAL_N (32), STEPS_CAP (0; at most this
#   many OPD steps, for a dry run), KEEP (the layers), HOPD (the command, default hopd).
set -euo pipefail
T=$1; OUT=$2; JOBS=${3:-4}
SEEDS=${SEEDS:-"0 1 2"}; WARM_STEPS=${WARM_STEPS:-40}; EVAL_N=${EVAL_N:-32}
STEPS_CAP=${STEPS_CAP:-0}; HOPD=${HOPD:-hopd}
# The variants of the OPD stage, fixed before any run: name, steps, then settings.
declare -A VARIANT=(
  # the recipe (benchmarks/real_pair.sh's OPD stage) since 2026-12-05: t40 below
  [recipe]="480 optim.lr=2e-4 loss.unlikelihood=0.1 max_time_s=2400"
  # the recipe until then (the `recipe` runs of BENCHMARKS' first grid and the README's runs
  # 1-3 of that time; "the recipe" in the comments below, written then, means this one)
  [steps240]="240 optim.lr=2e-4 loss.unlikelihood=0.1"
  [ul0.3]="240 optim.lr=2e-4 loss.unlikelihood=0.3"
  [ul1.0]="240 optim.lr=2e-4 loss.unlikelihood=1.0"
  [steps480]="480 optim.lr=2e-4 loss.unlikelihood=0.1"
  [b4x480]="480 optim.lr=2e-4 loss.unlikelihood=0.1 batch_size=4"  # same rollouts, 2x updates
  # added after the first grid's step-120 val readings (no test read): the recipe at the rate
  # the horizon study chose for OPD on val; the same cost as the recipe (one CPU run read
  # behind the recipe at step 120: BENCHMARKS)
  [lr3e-4]="240 optim.lr=3e-4 loss.unlikelihood=0.1"
  # on-policy forward KL (the teacher's whole distribution at the student's tokens): in the
  # first recipe's full-horizon stage it gave the lowest teacher NLL of any try (0.821 against
  # reverse KL's 0.989) and more loops; here with the unlikelihood term against them
  [fkl]="240 optim.lr=2e-4 loss.unlikelihood=0.1 loss.kind=fkl"
  # added before any run of it: the term's greedy answers to the full 128 tokens, on every 4th
  # step. At H = 32 they hold few of the loops' repeated tokens (a run's val answers: 66 of
  # 536 in the first 32; benchmarks/loop_anatomy.py); every 4th step keeps about the recipe's
  # cost per step (a 128-token decode and pass a quarter of the time)
  [ul128e4]="240 optim.lr=2e-4 loss.unlikelihood=0.1 loss.unlikelihood_horizon=128 loss.unlikelihood_every=4"
  # added after b4x480's run, before any of its own: the recipe's OPD stage from a warm start
  # that has the term too (WARM below): SFT on the teacher's answers beside unlikelihood on the
  # student's greedy answers to the budget, Welleck et al.'s MLE + sequence-level unlikelihood
  [sftul]="240 optim.lr=2e-4 loss.unlikelihood=0.1"
  # added after sftul's run, before any run of its own: the recipe's OPD stage scheduled over
  # 360 steps. 480 met every mark on both splits in one run, over the hour; on the faster
  # 2-core CPU class (AVX-512; the recipe's stage there 6.7 s a step) 360 fit it
  [steps360]="360 optim.lr=2e-4 loss.unlikelihood=0.1"
  # added after steps360's seed-0 run, before any run of its own: the stage given 40 minutes
  # of training instead of a step count (at most 480 steps; the LR schedule follows the time
  # spent), so that the stage costs the same time on any machine (the recipe's hour on the
  # 2-core machines measured, not on the slowest) and a faster one spends it on more rollouts:
  # about 357 steps where the recipe's stage takes 6.7 s a step, about 250 where it takes 9.6
  [t40]="480 optim.lr=2e-4 loss.unlikelihood=0.1 max_time_s=2400"
)
# A variant's own warm start: its extra settings (warm_<variant>_s<seed>); the others share
# the plain one (warm_s<seed>)
declare -A WARM=(
  [sftul]="loss.unlikelihood=0.1"
)
VARIANTS=${VARIANTS:-"steps480 steps360 steps240"}  # the longest first
mkdir -p "$OUT"
COMMON=(teacher=$T data=chat:prompts budget=128 batch_size=8 optim.warmup_steps=3
        eval_split=val eval_n=$EVAL_N eval_kl_n=$EVAL_N diag_every=0)  # a variant's come after
# The layers the recipe's `hopd prune --layers 25` keeps on the CPU (block influence), named so
# that every machine distils the same student.
KEEP=${KEEP:-0,1,2,3,4,5,7,8,9,10,11,12,16,18,19,20,21,22,23,24,25,26,27,28,29}
slot() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done; }  # at most JOBS at once
[ -d "$OUT/student" ] || $HOPD prune "$T" --keep "$KEEP" --out "$OUT/student" > "$OUT/prune.log" 2>&1
for split in val test; do  # the pruned student, the marks' reference
  slot; [ -f "$OUT/student_$split.json" ] || $HOPD eval --model "$OUT/student" --teacher "$T" --task chat:prompts --split $split \
      --n "$EVAL_N" --budget 128 --kl-n "$EVAL_N" --quiet --out "$OUT/student_$split.json" \
      > "$OUT/student_$split.log" 2>&1 &
done
warm() {  # the warm start a variant starts from: warm_s<seed>, or warm_<variant>_s<seed>
  if [ -n "${WARM[$1]:-}" ]; then echo "warm_$1"; else echo warm; fi
}
for w in $(for v in $VARIANTS; do warm "$v"; done | sort -u); do
  extra=(); [ "$w" = warm ] || extra=(${WARM[${w#warm_}]})
  for s in $SEEDS; do
    slot; [ -f "$OUT/${w}_s$s/model/config.json" ] || $HOPD distill --out "$OUT/${w}_s$s" \
        student="$OUT/student" loss.kind=sft max_steps="$WARM_STEPS" optim.lr=1e-4 \
        eval_every="$WARM_STEPS" sampling.ahead="$WARM_STEPS" grad_accum=2 seed="$s" \
        "${COMMON[@]}" "${extra[@]}" --quiet --overwrite > "$OUT/${w}_s$s.log" 2>&1 &
  done
done
wait
run() {  # variant seed: the OPD stage from that seed's warm start, then its test evaluation
  local dir="$OUT/$1_s$2" s=$2 from; from="$OUT/$(warm "$1")_s$2/model"; set -- ${VARIANT[$1]}
  [ ! -f "$dir/test.json" ] || return 0  # finished by an earlier call on this OUT
  local steps=$1; shift
  [ "$STEPS_CAP" -eq 0 ] || [ "$steps" -le "$STEPS_CAP" ] || steps=$STEPS_CAP
  if [ -d "$dir/checkpoints" ] && [ ! -f "$dir/model/config.json" ]; then
    # stopped by a signal (hopd saves a checkpoint at once; `timeout` signals the whole group)
    $HOPD distill --resume "$dir" --quiet >> "$dir.log" 2>&1 || { echo "$dir failed"; return; }
  else
    $HOPD distill --out "$dir" student="$from" loss.kind=rkl max_steps="$steps" \
        horizon.kind=truncated horizon.fraction=0.25 eval_every=$(( (steps + 1) / 2 )) \
        seed="$s" "${COMMON[@]}" "$@" --quiet --overwrite > "$dir.log" 2>&1 ||
        { echo "$dir failed"; return; }
  fi
  $HOPD eval --model "$dir/model" --teacher "$T" --task chat:prompts --split test --n "$EVAL_N" \
      --budget 128 --kl-n "$EVAL_N" --show 5 --quiet --out "$dir/test.json" > "$dir.test.log" 2>&1
  echo "$dir done"
}
for v in $VARIANTS; do for s in $SEEDS; do echo "$v $s"; done; done |
  { while read -r v s; do
      slot; run "$v" "$s" &
    done; wait; }
python "$(dirname "$0")/real_pair_table.py" "$OUT"
