"""The study's table for one regime's stage 2 (a `hopd compare` folder of seeds): each strategy's
val-chosen rate, final and best value +- sd over seeds, tokens, estimated compute and time to
the target (the adaptive horizon's readings counted as training time), and beside a KL metric
the teacher NLL and degeneration of the final answers.

    python benchmarks/study_table.py runs/study/real/seeds [runs/study/real/grid]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from hopd.report import choose_rates, group, summarize
from hopd.runs import LOWER_IS_BETTER, find_runs


def _ms(xs: list[float], fmt: str) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{format(statistics.fmean(xs), fmt)} +- {format(sd, fmt)}"


def main(seeds: Path, grid: Path | None) -> None:
    runs = [r for r in find_runs([seeds]) if r.evals]  # runs still starting have none
    groups, _ = choose_rates(group(runs))
    s = summarize(groups)
    metric = s["metric"]
    pct = metric not in LOWER_IS_BETTER
    fmt = ".1%" if pct else ".3f"
    rates = {}
    if grid is not None:
        _, table = choose_rates(group(find_runs([grid])))
        rates = {r[0]: r[1] for r in table[1:] if r[5] == "yes"}
    head = ["strategy", "lr (val)", "seeds", "start", "final", "best", "tokens to target",
            "est. PFLOP to target", "s to target", "sampled tokens", "train s"]
    extra = [] if pct else ["teacher NLL", "distinct-2", "mean length", "collapse"]
    print("| " + " | ".join(head + extra) + " |")
    print("|---" * (len(head) + len(extra)) + "|")
    for name, runs in groups.items():
        r = s["rows"][name]
        finals = [x.value(x.evals[-1]) for x in runs]
        bests = [x.best_accuracy for x in runs]
        starts = [x.value(x.evals[0]) for x in runs]
        reach = f"{r['tokens_to_target']:,.0f}" if r["tokens_to_target"] is not None else \
            f"{r['reached_target']} of {r['seeds']} seeds reached it"
        flops = f"{r['flops_to_target'] / 1e15:.2f}" if r.get("flops_to_target") else "n/a"
        secs = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "n/a"
        cells = [name, str(rates.get(name, runs[0].lr)), str(len(runs)),
                 _ms(starts, fmt), _ms(finals, fmt), _ms(bests, fmt), reach, flops, secs,
                 f"{r['total_tokens']:,.0f}", f"{r['train_time_s']:.0f}" + (
                     f" ({r['control_time_s']:.0f} of it readings)" if r["control_time_s"] else "")]
        if not pct:
            last = [x.evals[-1] for x in runs]
            cells += [_ms([e.get("eval_teacher_nll") for e in last], ".3f"),
                      _ms([e.get("eval_distinct_2") for e in last], ".2f"),
                      _ms([e.get("eval_mean_length") for e in last], ".0f"),
                      str(sum(x.collapse is not None for x in runs))]
        print("| " + " | ".join(cells) + " |")
    target = s["target"]
    print(f"\ntarget: {format(target, fmt) if target is not None else 'n/a'} ({metric}; 95% of "
          "the way from OPD's start to its final value for a KL, 95% of OPD's final accuracy)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
