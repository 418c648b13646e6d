"""The student's rollouts and its greedy answers for `loss.unlikelihood`, decoded apart (two
calls of B rows) or paired (one call of 2B rows, what an OPD step does when the greedy sampler
is the run sampler's twin): seconds per step, and whether the rows are the same.

A step with loss.unlikelihood decodes the student twice on the same prompts to the same H:
sampled rows for the loss and greedy rows for the term. On a CPU, whose matrix products at a few
rows are bound by reading the weights, one decode step of 2B rows costs far less than two of B.
Each mode draws the same `--steps` steps of `--batch` prompts with the run's row seeds,
interleaved over `--repeats` rounds; reports the median seconds per step, the ratio, and the
share of rows (sampled and greedy) whose tokens equal the apart rows' (the rest part through
float rounding at the other batch size).

    python benchmarks/ul_paired.py                          # SmolLM2-135M-Instruct, H = 32
    python benchmarks/ul_paired.py --model runs/real/warm/model
    python benchmarks/ul_paired.py --model testbed:student --steps 2 --horizon 8 --repeats 1
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

from hopd.rollout import HFSampler, Rollout  # noqa: E402


def run(sampler: HFSampler, steps: list[tuple[list[list[int]], list[int]]], horizon: int,
        paired: bool) -> tuple[float, list[Rollout]]:
    """Every step's sampled rollout and greedy answers; returns the seconds and the rollouts
    (sampled, greedy, sampled, ...)."""
    twin = sampler.greedy_twin()
    out: list[Rollout] = []
    t = time.perf_counter()
    for prompts, seeds in steps:
        if paired:
            out += sampler.sample_with_greedy(prompts, horizon, row_seeds=seeds)
        else:
            out += [sampler.sample(prompts, horizon, row_seeds=seeds),
                    twin.sample(prompts, horizon)]
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2:135m-instruct",
                    help="the student: a path, a packaged name or testbed:student")
    ap.add_argument("--horizon", type=int, default=32, help="H: new tokens at most per row")
    add_sampling_args(ap, steps=6)
    args = ap.parse_args()
    model, tok, data, steps = sampling_steps(args)
    sampler = HFSampler(model, tok.eos_token_id, tok.pad_token_id)
    run(sampler, steps[:1], args.horizon, paired=True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    rollouts: dict[bool, list[Rollout]] = {}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for paired in (False, True):
            dt, rollouts[paired] = run(sampler, steps, args.horizon, paired)
            times[paired].append(dt)

    apart, paired = response_rows(rollouts[False]), response_rows(rollouts[True])
    same = same_share(apart, paired)
    s_apart, s_paired = (median(times[m]) / args.steps for m in (False, True))
    print(f"\nUnlikelihood's greedy answers beside the rollouts: {machine('cpu')}, "
          f"commit {commit()}")
    print(f"model {args.model}, {args.steps} steps x {args.batch} prompts of {data}, H = "
          f"{args.horizon}, sampled rows at temperature 1 and greedy rows, median of "
          f"{args.repeats}\n")
    print_table(["decode", "rows per call", "s per step", "vs apart", "rows as apart"],
                [["apart", args.batch, f"{s_apart:.2f}", "1.00x", "100%"],
                 ["paired", 2 * args.batch, f"{s_paired:.2f}", f"{s_apart / s_paired:.2f}x",
                  f"{same:.0%}"]])
    print(json.dumps({"model": args.model, "batch": args.batch, "horizon": args.horizon,
                      "s_per_step_apart": s_apart, "s_per_step_paired": s_paired,
                      "speedup": s_apart / s_paired, "same_rows": same}))


if __name__ == "__main__":
    main()
