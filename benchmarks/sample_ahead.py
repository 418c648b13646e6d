"""The teacher's rollouts for the SFT warm start, one step at a time or several steps at once
(`sampling.ahead`): seconds per step's answers, and whether the answers are the same.

A warm start (loss.kind=sft, loss.rollouts=teacher) trains on the teacher's answers, which do
not depend on the step; `sampling.ahead=N` decodes the next N steps' rows as one batch. Each
setting here samples the same `--steps` steps of `--batch` prompts with the run's row seeds
(so every row's tokens are the same whatever shares its batch, up to float rounding), at the
full budget, interleaved over `--repeats` rounds; reports the median seconds per step, the ratio
to one step at a time, and the share of rows whose tokens equal the one-at-a-time rows'.

    python benchmarks/sample_ahead.py                      # the real pair's teacher (SmolLM2)
    python benchmarks/sample_ahead.py --model testbed:teacher --steps 4 --ahead 1,2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_sampling_args,
    commit,
    machine,
    median,
    print_table,
    response_rows,
    same_share,
    sampling_steps,
)

from hopd.rollout import HFSampler, Rollout, SampleAhead  # noqa: E402


def run(sampler: HFSampler, steps: list[tuple[list[list[int]], int, list[int]]], ahead: int
        ) -> tuple[float, list[Rollout]]:
    """Samples every step, planning `ahead` steps at a time as the training loop does; returns
    the seconds and the rollouts."""
    wrapped = SampleAhead(sampler)
    out = []
    t = time.perf_counter()
    for lo in range(0, len(steps), ahead):
        wrapped.plan(steps[lo:lo + ahead])
        out += [wrapped.sample(p, h, row_seeds=s) for p, h, s in steps[lo:lo + ahead]]
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2:135m-instruct",
                    help="the teacher: a path, a packaged name or testbed:teacher")
    ap.add_argument("--budget", type=int, default=128, help="new tokens at most per answer")
    ap.add_argument("--ahead", default="1,4,8", help="steps per batch to compare (1 first)")
    add_sampling_args(ap, steps=8)
    args = ap.parse_args()
    aheads = [int(a) for a in args.ahead.split(",")]
    if aheads[0] != 1:
        raise SystemExit(f"--ahead {args.ahead}: start with 1 (the reference)")
    model, tok, data, drawn = sampling_steps(args)
    steps = [(prompts, args.budget, seeds) for prompts, seeds in drawn]
    sampler = HFSampler(model, tok.eos_token_id, tok.pad_token_id)
    run(sampler, steps[:1], 1)  # warm-up
    times: dict[int, list[float]] = {a: [] for a in aheads}
    answers: dict[int, list[Rollout]] = {}
    for _ in range(args.repeats):  # interleaved, so drift hits all alike
        for a in aheads:
            dt, answers[a] = run(sampler, steps, a)
            times[a].append(dt)

    ref, base = response_rows(answers[1]), median(times[1]) / args.steps
    result = []
    for a in aheads:
        same = same_share(ref, response_rows(answers[a]))
        per_step = median(times[a]) / args.steps
        result.append({"ahead": a, "s_per_step": per_step, "speedup": base / per_step,
                       "same_rows": same})
    tokens = sum(len(r) for r in ref)
    print(f"\nTeacher rollouts planned ahead: {machine('cpu')}, commit {commit()}")
    print(f"model {args.model}, {args.steps} steps x {args.batch} prompts of {data}, at most "
          f"{args.budget} new tokens ({tokens / len(ref):.0f} on average), temperature 1, "
          f"median of {args.repeats}\n")
    print_table(["sampling.ahead", "rows per batch", "s per step", "vs 1", "rows as at 1"],
                [[r["ahead"], r["ahead"] * args.batch, f"{r['s_per_step']:.2f}",
                  f"{r['speedup']:.2f}x", f"{r['same_rows']:.0%}"] for r in result])
    print(json.dumps({"model": args.model, "batch": args.batch, "budget": args.budget,
                      "results": result}))


if __name__ == "__main__":
    main()
