"""The float32 decode step on a CPU with its weights packed for oneDNN (the default) or read by
the plain BLAS matmul (`HOPD_PACKED_DECODE=off`): seconds per call, and whether the tokens are
the same.

Two calls that an OPD run of the real pair makes: an OPD step's decode of `--batch` sampled
rollouts beside the student's greedy answers to the same prompts (loss.unlikelihood), to H
tokens; and an evaluation's greedy answers to `--eval-n` held-out prompts at the full budget.
Both modes run the same calls, interleaved over `--repeats` rounds in one process (the setting
is read each time a batch's decoder is built); reports the median seconds, the ratio, and the
share of rows whose tokens equal the BLAS rows' (the rest part through float rounding).

    python benchmarks/packed_decode.py                        # SmolLM2-135M-Instruct
    python benchmarks/packed_decode.py --model runs/real/student
    python benchmarks/packed_decode.py --model testbed:student --steps 1 --eval-n 4 --repeats 1 \
        --pack-narrow     # the testbed student is narrower than fastgen.PACK_MIN_HIDDEN
"""

from __future__ import annotations

import argparse
import json
import os
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

from hopd import fastgen  # noqa: E402
from hopd.rollout import HFSampler, Rollout  # noqa: E402

BLAS, PACKED = "BLAS matmul", "packed (oneDNN)"
MODES = {BLAS: "off", PACKED: "on"}  # the layout's name: HOPD_PACKED_DECODE


def timed_calls(mode: str, calls: list) -> tuple[float, list[Rollout]]:
    """Runs `calls` (each returning rollouts) with HOPD_PACKED_DECODE=`mode`."""
    os.environ["HOPD_PACKED_DECODE"] = mode
    out: list[Rollout] = []
    t = time.perf_counter()
    for call in calls:
        out += call()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2:135m-instruct",
                    help="the student: a path, a packaged name or testbed:student")
    ap.add_argument("--horizon", type=int, default=32, help="H of the OPD step's decode")
    ap.add_argument("--eval-n", type=int, default=32, help="prompts of the evaluation's decode")
    ap.add_argument("--budget", type=int, default=128, help="the evaluation's L")
    ap.add_argument("--pack-narrow", action="store_true",
                    help="pack a model narrower than fastgen.PACK_MIN_HIDDEN too")
    add_sampling_args(ap, steps=4)
    args = ap.parse_args()
    if args.pack_narrow:
        fastgen.PACK_MIN_HIDDEN = 0
    model, tok, data, steps = sampling_steps(args)
    packs = fastgen.packed_weights(next(model.parameters()), model.config.hidden_size)
    sampler = HFSampler(model, tok.eos_token_id, tok.pad_token_id)
    greedy = sampler.greedy_twin()
    held_out = [p for prompts, _ in steps for p in prompts][:args.eval_n]
    jobs = {
        "OPD step: rollouts + greedy answers": [
            lambda p=prompts, s=seeds: sampler.sample_with_greedy(p, args.horizon, row_seeds=s)
            for prompts, seeds in steps],
        "evaluation: greedy answers": [lambda: [greedy.sample(held_out, args.budget)]],
    }
    timed_calls("on", [jobs["OPD step: rollouts + greedy answers"][0]])  # warm-up
    times = {(j, m): [] for j in jobs for m in MODES}
    rows: dict[tuple[str, str], list[list[int]]] = {}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for job, calls in jobs.items():
            for name, mode in MODES.items():
                dt, rollouts = timed_calls(mode, calls)
                times[job, name].append(dt / len(calls))
                rows[job, name] = response_rows(rollouts)
    os.environ.pop("HOPD_PACKED_DECODE")

    print(f"\nThe float32 decode step's weights, packed for oneDNN or read by BLAS: "
          f"{machine('cpu')}, commit {commit()}")
    print(f"model {args.model}, {data}; OPD step: {args.batch} prompts x 2 rows (sampled at "
          f"temperature 1, greedy) to H = {args.horizon}, {args.steps} steps; evaluation: "
          f"{len(held_out)} prompts, greedy, L = {args.budget}; median of {args.repeats}\n")
    if not packs:
        print(f"(this model is not packed: hidden size {model.config.hidden_size} < "
              f"{fastgen.PACK_MIN_HIDDEN}, or not float32 on a CPU; --pack-narrow packs it)\n")
    table, out = [], {"model": args.model, "packed": packs}
    for job in jobs:
        base = median(times[job, BLAS])
        for name in MODES:
            s = median(times[job, name])
            table.append([job, name, f"{s:.2f}", f"{base / s:.2f}x",
                          f"{same_share(rows[job, BLAS], rows[job, name]):.0%}"])
        key = job.split(":")[0].replace(" ", "_").lower()
        out[key + "_speedup"] = base / median(times[job, PACKED])
        out[key + "_same_rows"] = same_share(rows[job, BLAS], rows[job, PACKED])
    print_table(["call", "weights", "s per call", "vs BLAS", "rows as BLAS"], table)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
