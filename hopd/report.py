"""`hopd report`: plots and a Markdown report from run folders.

Reads each run's metrics.jsonl (and strategy.json, written by `hopd compare`), groups runs by
strategy, and writes into the output folder:

- accuracy.png: full-budget accuracy against training wall-clock, sampled tokens and steps (mean
  over seeds, min-max band);
- cost.png: step time (split into sample / teacher / learn) and activation memory against H;
- rkl_heatmap.png: per-position sampled reverse KL (position bucket x step), one panel per strategy;
- horizon.png: each strategy's horizon schedule;
- report.md: a table per strategy and verdicts on the paper's two claims, computed from the data.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

from hopd.report_plots import plot_accuracy, plot_cost, plot_heatmap, plot_horizon, plot_probe
from hopd.runs import LOWER_IS_BETTER, Run, better, find_runs, spent_s
from hopd.runstate import write_json

TARGET_FRACTION = 0.95  # target = 95% of full OPD's final accuracy (for a KL or NLL metric:
# 95% of the way from the start to OPD's final value)
MATCH_TOLERANCE = 0.95  # "matches OPD": final accuracy >= 95% of OPD's (KL, NLL: <= 1/0.95 x)
LOAD_GAP = 1.0  # mean load averages this far apart (a busy core) make wall-clock incomparable


# settings that differ between the runs of one comparison by design (the strategy, its rate, the
# seed) or that do not change what a run measures (logging, checkpoints, threads, devices)
_VARY = {"seed", "horizon", "optim", "loss", "token_budget", "max_batch", "val_n",
         "eval_every", "diag_every", "diag_n", "probe_every", "probe_n", "save_every",
         "keep_last", "threads", "device", "teacher_device", "teacher_url", "teacher_timeout_s",
         "teacher_retries", "max_bad_steps", "parallel", "grad_accum"}


def _signature(r: Run) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in r.config.items() if k not in _VARY))


def group(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by strategy; runs whose settings differ beyond strategy, rate and seed (other steps,
    data, students, evaluation sizes) are never pooled: they become `name#2`, ... and
    `mismatches` says how they differ."""
    out: dict[str, list[Run]] = {}
    sigs: dict[str, list[tuple[tuple[str, str], ...]]] = {}
    for r in runs:
        known = sigs.setdefault(r.strategy, [])
        sig = _signature(r)
        if sig not in known:
            known.append(sig)
        i = known.index(sig)
        out.setdefault(r.strategy if i == 0 else f"{r.strategy}#{i + 1}", []).append(r)
    return out


def mismatches(runs: list[Run]) -> list[str]:
    """The settings (outside strategy, rate and seed) in which the given runs differ."""
    keys = sorted({k for r in runs for k in r.config if k not in _VARY})
    out = []
    for k in keys:
        values = sorted({repr(r.config.get(k)) for r in runs})
        if len(values) > 1:
            out.append(f"{k} ({', '.join(values)})")
    return out


def choose_rates(groups: dict[str, list[Run]]) -> tuple[dict[str, list[Run]], list[list[str]]]:
    """Each strategy at its best learning rate, chosen on the `val` half (never on test).

    Returns the groups restricted to the chosen rates and the whole grid as table rows (empty
    when no strategy was run at more than one rate). Without val accuracies the rate cannot be
    chosen fairly: every (strategy, rate) then stays its own group, named `strategy@lr`."""
    if all(len({r.lr for r in runs}) < 2 for runs in groups.values()):
        return groups, []
    header = ["strategy", "lr", "seeds", "val", "test", "chosen", "val answers"]
    table, chosen = [header], {}
    for name, runs in groups.items():
        by_lr: dict[float | None, list[Run]] = {}
        for r in runs:
            by_lr.setdefault(r.lr, []).append(r)
        val = {lr: _mean([r.val_accuracy for r in rs]) for lr, rs in by_lr.items()}
        fair = all(v is not None for v in val.values())
        sign = -1 if runs[0].metric in LOWER_IS_BETTER else 1
        bad = {lr: next((r.val_degenerate for r in rs if r.val_degenerate), None)
               for lr, rs in by_lr.items()}
        eligible = [lr for lr in by_lr if not bad[lr]] or list(by_lr)  # all bad: as before
        best = max(eligible, key=lambda lr: (sign * val[lr], -(lr or 0))) if fair else None
        for lr, rs in sorted(by_lr.items(), key=lambda kv: kv[0] or 0):
            table.append([name, f"{lr:g}" if lr is not None else "?", str(len(rs)),
                          _val({"metric": rs[0].metric}, val[lr]),
                          _val({"metric": rs[0].metric}, _mean([r.final_accuracy for r in rs])),
                          "yes" if lr == best else "",
                          f"degenerate: {bad[lr]}" if bad[lr] else ""])
            if best is None:
                chosen[f"{name}@{lr:g}" if lr is not None else name] = rs
        if best is not None:
            chosen[name] = by_lr[best]
    return chosen, table


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(vals) if vals else None


def _mean_of_all(xs: list[float | None]) -> float | None:
    """The mean, or None when any value is missing (or zero: not logged)."""
    return statistics.fmean(xs) if xs and all(xs) else None  # type: ignore[arg-type]


def _sd(xs: list[float | None]) -> float | None:
    """Sample standard deviation over seeds (None with fewer than two)."""
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.stdev(vals) if len(vals) >= 2 else None


def summarize(groups: dict[str, list[Run]], baseline: str = "opd") -> dict[str, Any]:
    """Per-strategy numbers and the target; all verdicts are computed from these."""
    base = groups.get(baseline)
    metric = next((r.metric for runs in groups.values() for r in runs), "accuracy")
    base_final = _mean([r.final_accuracy for r in base]) if base else None
    base_start = _mean([r.value(r.evals[0]) for r in base if r.evals]) if base else None
    target = None
    if base_final is not None and metric in LOWER_IS_BETTER:
        if base_start is not None:
            target = base_start + TARGET_FRACTION * (base_final - base_start)
    elif base_final is not None:
        target = TARGET_FRACTION * base_final
    rows: dict[str, dict[str, Any]] = {}
    for name, runs in groups.items():
        reach = [r.first_reach(target) if target is not None else None for r in runs]
        all_reached = all(x is not None for x in reach)
        rows[name] = {
            "seeds": len(runs),
            "final_accuracy": _mean([r.final_accuracy for r in runs]),
            "final_accuracy_min": min(r.final_accuracy for r in runs),
            "final_accuracy_max": max(r.final_accuracy for r in runs),
            "final_accuracy_sd": _sd([r.final_accuracy for r in runs]),
            "best_accuracy": _mean([r.best_accuracy for r in runs]),
            "best_accuracy_sd": _sd([r.best_accuracy for r in runs]),
            "median_step_time_s": _mean([statistics.median(x["step_time_s"] for x in r.train)
                                         if r.train else None for r in runs]),
            "step_time_spread": _mean([_spread([x["step_time_s"] for x in r.train])
                                       for r in runs]),
            "initial_accuracy": _mean([r.value(r.evals[0]) if r.evals else None
                                       for r in runs]),
            "collapsed": sum(r.collapse is not None for r in runs),
            "steps": _mean([r.train[-1]["step"] if r.train else 0 for r in runs]),
            "train_time_s": _mean([spent_s(r.train[-1]) if r.train else 0.0 for r in runs]),
            "control_time_s": _mean([r.train[-1].get("control_time_s", 0.0) if r.train else 0.0
                                     for r in runs]),
            "total_tokens": _mean([r.train[-1]["sampled_tokens"] if r.train else 0
                                   for r in runs]),
            "mean_step_time_s": _mean([statistics.fmean(x["step_time_s"] for x in r.train)
                                       if r.train else None for r in runs]),
            "peak_act_mem_mb": _mean([max((x.get("act_mem_mb", 0) for x in r.train), default=0)
                                      for r in runs]),
            "peak_mem_mb": _mean([max((x.get("peak_mem_mb", 0) for x in r.train), default=0)
                                  for r in runs]),
            "time_to_target_s": _mean([spent_s(x) for x in reach if x])
            if all_reached else None,
            "tokens_to_target": _mean([x["sampled_tokens"] for x in reach if x])
            if all_reached else None,
            "steps_to_target": _mean([x["step"] for x in reach if x]) if all_reached else None,
            # estimated training compute (hopd.compute): what the verdicts compare, since the
            # machine's load cannot change it (runs from before it was logged have none)
            "flops_to_target": _mean_of_all([x.get("train_flops") for x in reach])
            if all_reached else None,
            "total_flops": _mean([r.train[-1].get("train_flops") or None if r.train else None
                                  for r in runs]),
            "load_avg": _mean([_mean([x.get("load_avg") for x in r.train]) for r in runs]),
            "reached_target": sum(x is not None for x in reach),
        }
    if base is not None:
        b = rows[baseline]
        for row in rows.values():
            for key, out in (("time_to_target_s", "speedup_time"),
                             ("tokens_to_target", "speedup_tokens"),
                             ("flops_to_target", "speedup_flops")):
                row[out] = (b[key] / row[key] if b[key] and row[key] else None)
            row["cost_ratio_time"] = (row["train_time_s"] / b["train_time_s"]
                                      if b["train_time_s"] else None)
            row["cost_ratio_flops"] = (row["total_flops"] / b["total_flops"]
                                       if b["total_flops"] and row["total_flops"] else None)
    n_eval = min((int(r.config.get("eval_n") or 0) for runs in groups.values() for r in runs),
                 default=0)
    return {"baseline": baseline, "baseline_final": base_final, "target": target, "rows": rows,
            "n_eval": n_eval, "metric": metric,
            "noise_se": _mean([r.evals[0].get(f"eval_{metric}_se") for r in base or [] if r.evals])}


def opd_gain_is_noise(summary: dict[str, Any]) -> str | None:
    """Why the claims cannot be judged when OPD's own gain is within evaluation noise, else None.

    Noise: two binomial standard errors of an accuracy near the start, sqrt(p (1 - p) / n),
    with n the number of evaluation prompts (unknown n: no guard).
    """
    opd, n = summary["rows"].get(summary["baseline"]), summary.get("n_eval") or 0
    if opd is None or not n or opd["initial_accuracy"] is None or not noise_known(summary):
        return None
    noise = _eval_noise(summary, opd["initial_accuracy"])
    gain = opd["final_accuracy"] - opd["initial_accuracy"]
    if summary.get("metric") in LOWER_IS_BETTER:
        gain = -gain
    if gain < -noise:  # worse by more than the noise: say so, not "within the noise"
        return (f"OPD itself got worse, from {_val(summary, opd['initial_accuracy'])} to "
                f"{_val(summary, opd['final_accuracy'])} (evaluation noise +-"
                f"{_val(summary, noise)} on {n} prompts), so there is no gain to reach sooner "
                "or to match; lower the learning rate, or run longer with more prompts per step.")
    if gain < noise:
        return (f"OPD itself moved from {_val(summary, opd['initial_accuracy'])} to "
                f"{_val(summary, opd['final_accuracy'])}, within the evaluation noise "
                f"(+-{_val(summary, noise)} "
                f"on {n} prompts), so a target relative to it means little; run longer or "
                "evaluate on more prompts.")
    return None


def verdicts(summary: dict[str, Any]) -> list[str]:
    """Plain-language verdicts on the paper's two claims, from the numbers alone."""
    rows, target = summary["rows"], summary["target"]
    out = []
    if target is None:
        return ["No full-OPD run was given, so neither claim can be judged (both are relative to "
                "OPD)."]
    noise = opd_gain_is_noise(summary)
    if noise is not None:
        return [f"**Both claims are inconclusive here**: {noise}"]
    opd = rows[summary["baseline"]]
    popd = [n for n in rows if n.startswith("popd")]
    if not popd:
        out.append("**POPD reaches OPD's accuracy sooner**: not tested (no POPD run).")
    for n in popd:
        r = rows[n]
        if r["time_to_target_s"] is None:
            seeds = "its run" if r["seeds"] == 1 else \
                f"{r['seeds'] - r['reached_target']} of its {r['seeds']} seeds"
            out.append(f"**POPD reaches OPD's accuracy sooner**: not supported here. `{n}` did not "
                       f"reach the target ({_val(summary, target)}) in {seeds} "
                       f"(final {_val(summary, r['final_accuracy'])}).")
        elif r["flops_to_target"] and opd["flops_to_target"]:
            out.append(_sooner_by_compute(summary, n, opd, r))
        elif opd["time_to_target_s"] is None or r["time_to_target_s"] < opd["time_to_target_s"]:
            sp = r["speedup_time"]
            out.append(f"**POPD reaches OPD's accuracy sooner**: supported here. `{n}` reached "
                       f"{_val(summary, target)} after {r['time_to_target_s']:.0f}s of "
                       "training against "
                       f"OPD's {opd['time_to_target_s']:.0f}s"
                       + (f" ({sp:.2f}x faster)." if sp else ".") + _timing_noise(opd, r))
        else:
            out.append(f"**POPD reaches OPD's accuracy sooner**: not supported here. `{n}` "
                       f"reached {_val(summary, target)} after {r['time_to_target_s']:.0f}s, "
                       "OPD after "
                       f"{opd['time_to_target_s']:.0f}s.")
    topd = [n for n in rows if n.startswith("topd")]
    t10 = [n for n in topd if n in ("topd10", "topd")] or topd[:1]
    if not t10:
        out.append("**TOPD at 10% of L matches OPD**: not tested (no TOPD run).")
    for n in t10:
        r = rows[n]
        lower = summary.get("metric") in LOWER_IS_BETTER
        bar = summary["baseline_final"] / MATCH_TOLERANCE if lower else \
            MATCH_TOLERANCE * summary["baseline_final"]
        cost, flops = r.get("cost_ratio_time"), r.get("cost_ratio_flops")
        cost_txt = (f" at {flops:.2f}x OPD's estimated training compute" if flops else "") + (
            (f" ({cost:.2f}x its training time)" if flops else
             f" at {cost:.2f}x OPD's training time") if cost else "")
        if better(r["final_accuracy"], bar, summary.get("metric", "accuracy")):
            out.append(f"**TOPD at 10% of L matches OPD**: supported here. `{n}` ended at "
                       f"{_val(summary, r['final_accuracy'])} against OPD's "
                       f"{_val(summary, summary['baseline_final'])} (within 5%){cost_txt}.")
        elif abs(bar - r["final_accuracy"]) < _eval_noise(summary, bar):
            out.append(f"**TOPD at 10% of L matches OPD**: inconclusive here. `{n}` ended at "
                       f"{_val(summary, r['final_accuracy'])}, just short of the bar set by OPD's "
                       f"{_val(summary, summary['baseline_final'])}, a gap within the "
                       f"evaluation noise (+-{_val(summary, _eval_noise(summary, bar))} on "
                       f"{summary['n_eval']} prompts)"
                       f"{cost_txt}.")
        else:
            out.append(f"**TOPD at 10% of L matches OPD**: not supported here. `{n}` ended at "
                       f"{_val(summary, r['final_accuracy'])}, short of the bar set by OPD's (5%) "
                       f"{_val(summary, summary['baseline_final'])}{cost_txt}.")
    return out


def _sooner(r: dict[str, Any], opd: dict[str, Any]) -> bool:
    """POPD's verdict: less estimated compute to the target, or as little with fewer tokens."""
    return (r["flops_to_target"] < opd["flops_to_target"]
            or (r["flops_to_target"] == opd["flops_to_target"]
                and (r["tokens_to_target"] or 0) < (opd["tokens_to_target"] or 0)))


def _sooner_by_compute(summary: dict[str, Any], n: str, opd: dict[str, Any],
                       r: dict[str, Any]) -> str:
    """The POPD verdict on estimated training compute and sampled tokens, which the machine's
    load cannot change, with wall-clock beside it."""
    f, f0 = r["flops_to_target"], opd["flops_to_target"]
    tokens = (f", and {r['tokens_to_target']:,.0f} sampled tokens against "
              f"{opd['tokens_to_target']:,.0f}" if r.get("tokens_to_target")
              and opd.get("tokens_to_target") else "")
    wall = (f" Wall-clock, which the machine's load changes: {r['time_to_target_s']:.0f}s "
            f"against {opd['time_to_target_s']:.0f}s." if r.get("time_to_target_s") is not None
            and opd.get("time_to_target_s") is not None else "")
    ok = _sooner(r, opd)
    return (f"**POPD reaches OPD's accuracy sooner**: {'supported' if ok else 'not supported'} "
            f"here. `{n}` reached {_val(summary, summary['target'])} after "
            f"{f:.3g} FLOPs of estimated training compute against OPD's {f0:.3g} "
            f"({f0 / f:.2f}x {'less' if ok else 'as much'}){tokens}.{wall}")


def load_warning(summary: dict[str, Any]) -> str | None:
    """A warning when the machine's load differed between the runs (mean 1-minute load
    average per strategy, apart by a core or more): their wall-clock times are not comparable."""
    loads = {n: r["load_avg"] for n, r in summary["rows"].items() if r.get("load_avg") is not None}
    if len(loads) < 2 or max(loads.values()) - min(loads.values()) < LOAD_GAP:
        return None
    lo, hi = min(loads, key=loads.get), max(loads, key=loads.get)  # type: ignore[arg-type]
    return (f"the machine's load changed during the comparison (1-minute load average "
            f"{loads[lo]:.1f} during `{lo}`, {loads[hi]:.1f} during `{hi}`): wall-clock times "
            "are not comparable across these runs. The verdicts use estimated compute and "
            "sampled tokens, which load cannot change.")


def noise_known(summary: dict[str, Any]) -> bool:
    return summary.get("metric", "accuracy") == "accuracy" or summary.get("noise_se") is not None


def _eval_noise(summary: dict[str, Any], p: float) -> float:
    """Two standard errors of the metric near `p`: binomial for an accuracy on the report's
    evaluation size, the measured standard error of OPD's first evaluation for a KL or NLL (0
    when unknown)."""
    if summary.get("metric", "accuracy") != "accuracy":
        return 2 * (summary.get("noise_se") or 0.0)
    n = summary.get("n_eval") or 0
    p = min(max(p, 0.05), 0.95)
    return 2 * math.sqrt(p * (1 - p) / n) if n else 0.0


def _spread(times: list[float]) -> float | None:
    """Relative spread of a run's step times: interquartile range over the median."""
    if len(times) < 4:
        return None
    q1, med, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / med if med > 0 else None


def _timing_noise(opd: dict[str, Any], r: dict[str, Any]) -> str:
    """A warning when the time speed-up is within the spread of OPD's own step times (OPD's
    horizon is constant, so its spread is the machine's noise), with the token counts, which
    timing noise cannot change."""
    sp, spread = r.get("speedup_time"), opd.get("step_time_spread")
    if not sp or spread is None or abs(math.log(sp)) >= math.log1p(spread):
        return ""
    tok = (f" Sampled tokens to the target, which noise cannot change: "
           f"{r['tokens_to_target']:,.0f} against OPD's {opd['tokens_to_target']:,.0f}."
           if r.get("tokens_to_target") and opd.get("tokens_to_target") else "")
    return (f" The difference is within timing noise: OPD's own step times spread by "
            f"{100 * spread:.0f}% (interquartile range over median), enough to change this "
            f"verdict on a rerun.{tok}")


def _val(summary: dict[str, Any], x: float | None) -> str:
    """A value of the report's metric: a percentage for accuracy, else three decimals."""
    if summary.get("metric", "accuracy") == "accuracy":
        return _pct(x)
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "") -> str:
    """n/a for missing; otherwise `fmt`, or 2/1/0 decimals below 10/100/above."""
    if x is None:
        return "n/a"
    if fmt:
        return fmt.format(x)
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


# ---------------------------------------------------------------------------------------------
# The report


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    m = summary.get("metric", "accuracy")
    short = "acc" if m == "accuracy" else m
    header = ["strategy", "seeds", f"start {short}", f"final {short}", f"best {short}", "steps",
              "train time (s)",
              "sampled tokens", "time to target (s)", "tokens to target", "speed-up vs OPD",
              "act. mem (MiB)", "peak RSS/alloc (MiB)", "median step (s)"]
    out = [header]
    for name, r in summary["rows"].items():
        n = r["seeds"]
        reached = "" if r["reached_target"] == n or n == 1 else f" ({r['reached_target']}/{n})"
        out.append([name + (" (collapse flagged)" if r.get("collapsed") else ""), str(n),
                    _val(summary, r["initial_accuracy"]),
                    _val_sd(summary, r["final_accuracy"], r.get("final_accuracy_sd")),
                    _val_sd(summary, r["best_accuracy"], r.get("best_accuracy_sd")),
                    _num(r["steps"], "{:.0f}"), _num(r["train_time_s"]),
                    _num(r["total_tokens"], "{:.0f}"),
                    (_num(r["time_to_target_s"]) if r["time_to_target_s"] is not None else
                     "never" if not r["reached_target"] else "n/a") + reached,
                    _num(r["tokens_to_target"], "{:.0f}"), _num(r.get("speedup_time"), "{:.2f}x"),
                    _num(r["peak_act_mem_mb"], "{:.1f}"), _num(r["peak_mem_mb"], "{:.0f}"),
                    _num(r.get("median_step_time_s"), "{:.3f}")])
    return out


def _val_sd(summary: dict[str, Any], mean: float | None, sd: float | None) -> str:
    if summary.get("metric", "accuracy") == "accuracy":
        return _pct_sd(mean, sd)
    return _val(summary, mean) + (f" +- {sd:.3f}" if sd is not None else "")


def _pct_sd(mean: float | None, sd: float | None) -> str:
    """A percentage, with +- the standard deviation over seeds when there are several."""
    return _pct(mean) + (f" +- {100 * sd:.1f}" if sd is not None else "")


def _noise_note(runs: list[Run], summary: dict[str, Any]) -> str:
    """How large evaluation noise is here: two binomial standard errors at 50% accuracy."""
    n = summary.get("n_eval") or 0
    seeds = max((row["seeds"] for row in summary["rows"].values()), default=1)
    two_se = f"two standard errors are up to {200 * (0.25 / n) ** 0.5:.1f} points on {n} " \
        "prompts per evaluation" if n else "the evaluation size is unknown"
    if summary.get("metric", "accuracy") != "accuracy":  # the measured standard error
        se = summary.get("noise_se")
        two_se = (f"two standard errors of OPD's first evaluation are {2 * se:.3f} on {n} "
                  "prompts" if se is not None else "the evaluation's standard error is unknown")
    who = "one seed" if seeds == 1 else f"{seeds} seeds (mean +- sd across them)"
    return f"With {who}, {two_se}: differences smaller than that are noise."


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


METRIC_TEXT = {
    "accuracy": "Accuracy is greedy, at the full response budget L, on held-out prompts. Target = "
                f"{int(TARGET_FRACTION * 100)}% of full OPD's final accuracy",
    "rkl": "The metric is the held-out reverse KL per token (lower is better): the student samples "
           "held-out prompts at the full budget L and the teacher scores them. Target = "
           f"{int(TARGET_FRACTION * 100)}% of the way from OPD's start to its final KL",
    "teacher_nll": "The metric is the teacher's NLL per token of the student's greedy answers at "
                   "the "
                   f"full budget L (lower is better). Target = {int(TARGET_FRACTION * 100)}% of "
                   "the way from OPD's start to its final value",
}


def write_report(paths: list[Path], out: Path) -> dict[str, Any]:
    """Writes report.md and its PNG plots into `out`; returns the summary."""
    runs = find_runs(paths)
    groups, grid = choose_rates(group(runs))
    summary = summarize(groups)
    summary["lr_grid"] = grid
    differ = mismatches(runs)
    summary["warnings"] = [
        "these runs differ in more than strategy, learning rate and seed: "
        + "; ".join(differ) + ". Runs that differ are not pooled (`name#2`, ...), and numbers "
        "across them are not comparable."] if differ else []
    load = load_warning(summary)
    if load:
        summary["warnings"].append(load)
    for w in summary["warnings"]:
        print(f"hopd report: warning: {w}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(groups, summary["target"], out / "accuracy.png")
    plot_cost(groups, out / "cost.png")
    has_heat = plot_heatmap(groups, out / "rkl_heatmap.png")
    has_probe = plot_probe(groups, out / "probe.png")
    plot_horizon(groups, out / "horizon.png")
    budgets = {r.config.get("budget") or "task default" for r in runs}
    lines = [
        "# hopd report: how much rollout horizon does on-policy distillation need?", "",
        f"{len(runs)} run(s), {len(groups)} strateg{'y' if len(groups) == 1 else 'ies'}. "
        + METRIC_TEXT.get(summary["metric"], summary["metric"])
        + (f" = {_val(summary, summary['target'])}." if summary["target"] is not None
           else " (no OPD run)."),
        *[f"**Collapse flagged** in `{r.path.name}` ({r.strategy}): {r.collapse}"
          for r in runs if r.collapse],
        f"Budget L: {', '.join(map(str, budgets))}. Times are training time only (sampling, "
        "teacher scoring, learning), without evaluation or diagnostics, except the readings "
        "an adaptive horizon decides on, which count as its training time.", "",
        *[f"**Warning**: {w}" for w in summary["warnings"]],
        markdown_table(table_rows(summary)), "",
        *(["## Learning rates", "",
            "Every strategy ran at every rate; each one is reported at the rate with the best "
            "final value on the `val` half of the held-out prompts, and every value above "
            "is on the disjoint `test` half. A rate whose val answers degenerated against the "
            "teacher's (distinct-2 at most half, half the answers one repeated token, or under "
            "a quarter of the length) is not chosen: repetition the teacher finds likely can "
            "lower a KL.", "", markdown_table(grid), ""] if grid else []),
        "## Verdicts on the paper's claims", "",
        *[f"- {v}" for v in verdicts(summary)], "",
        "These verdicts are computed from the numbers above each time the report is made. "
        + _noise_note(runs, summary), "",
        "## Plots", "",
        "![accuracy](accuracy.png)", "", "![cost against horizon](cost.png)", "",
        "![horizon schedules](horizon.png)", "",
    ]
    if has_heat:
        lines += ["![per-position reverse KL](rkl_heatmap.png)", ""]
    if has_probe:
        lines += ["![teacher-recovery probe](probe.png)", ""]
    moves = [(name, m["horizon_move"]) for name, runs in groups.items() for m in runs[0].train
             if "horizon_move" in m]
    if moves:
        lines += ["## Adaptive horizon moves", ""]
        lines += [f"- `{n}` step {m['step']}: H {m['from']} -> {m['to']} ({m['reason']})"
                  for n, m in moves]
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    write_json(out / "summary.json", summary)
    return summary
