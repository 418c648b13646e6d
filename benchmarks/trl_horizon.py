"""TRL's GKDTrainer at the full horizon against H = 10% of L through hopd's HorizonCallback.

Same student, teacher, prompts, batch and steps; every rollout is forced to its horizon
(`min_new_tokens`), L = the testbed's 160 tokens. The callback (hopd.integrations.trl) sets
H = ceil(0.1 L) = 16 before every step. Timed per optimizer step after warm-up, in alternating
rounds (full, truncated, full, ...). TRL's gradient checkpointing is off (`--checkpointing` turns
it on: TRL then generates without a KV cache, see BENCHMARKS.md), and on a CPU it trains in
fp32 as hopd does (GKDConfig's default is bf16 autocast, even on a CPU; `--bf16` keeps it).

    pip install -e ".[bench]"          # trl, datasets
    python benchmarks/trl_horizon.py
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import commit, machine, median, print_table, testbed_models, testbed_prompts  # noqa: E402
from vs_trl import trl_steps  # noqa: E402

from hopd.integrations.trl import HorizonCallback  # noqa: E402
from hopd.schedules import HorizonConfig, initial_horizon  # noqa: E402
from hopd.tasks import PromptSource  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fraction", type=float, default=0.1, help="truncated horizon, fraction of L")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="TRL's gradient checkpointing")
    ap.add_argument("--bf16", action="store_true", help="TRL's default bf16 autocast on a CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    student, teacher, tok = testbed_models("testbed:student", "testbed:teacher", args.device)
    _, L = testbed_prompts(tok, args.batch)
    rows = [{"messages": [{"role": "user", "content": e.prompt},
                          {"role": "assistant", "content": e.response}]}
            for e in PromptSource("chain:default").train_batch(
                0, args.batch * (args.steps + args.warmup) * 2, seed=123)]
    short = HorizonConfig(kind="truncated", fraction=args.fraction)
    H = initial_horizon(short, L)
    callbacks = []

    def attach(trainer):
        callbacks.append(HorizonCallback(short, budget=L).attach(trainer))

    bf16 = None if args.bf16 or args.device.startswith("cuda") else False
    runs = {f"GKDTrainer, H = L = {L}": [], f"GKDTrainer + HorizonCallback, H = {H}": []}
    names = list(runs)
    for r in range(args.rounds):
        runs[names[0]] += trl_steps(student, teacher, tok, rows, args.batch, L, args.steps,
                                    args.warmup, args.device, checkpointing=args.checkpointing,
                                    bf16=bf16)
        runs[names[1]] += trl_steps(student, teacher, tok, rows, args.batch, L, args.steps,
                                    args.warmup, args.device, setup=attach,
                                    checkpointing=args.checkpointing, bf16=bf16)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    seen = sorted({h for cb in callbacks for _, h in cb.history})
    full_s, short_s = median(runs[names[0]]), median(runs[names[1]])
    print(f"\nTRL GKDTrainer through hopd's HorizonCallback: {machine(args.device)}, commit "
          f"{commit()}")
    print(f"testbed student/teacher, batch {args.batch}, rollouts forced to H, gradient "
          f"checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{'fp32' if bf16 is False else 'bf16 autocast'}, median of {args.rounds} x "
          f"{args.steps} steps after warm-up; horizons the callback set: {seen}\n")
    print_table(["run", "s/step", "speed-up"],
                [[k, f"{median(v):.3f}", f"{full_s / median(v):.2f}x"] for k, v in runs.items()])
    print(json.dumps({"full_s_per_step": full_s, "truncated_s_per_step": short_s,
                      "speedup": full_s / short_s, "L": L, "H": seen, "batch": args.batch,
                      "device": args.device, "checkpointing": args.checkpointing,
                      "bf16": bf16 is not False}))


if __name__ == "__main__":
    main()
