"""The real pair's trade-off between the teacher's NLL and distinct-2, read from finished runs.

Each evaluation of each run folder (a `hopd distill --out` folder) becomes a point: the teacher's
NLL per token of the student's greedy answers (x) against their distinct-2 (y), with the
real-pair issue's marks drawn: distinct-2 >= 0.5, and a teacher NLL below the pruned student's
(`--pruned`: the run whose first evaluation read the pruned student, the recipe's warm start).
Looping answers are easy for the teacher to predict (it endorses a loop once it has started), so
fewer loops raise the NLL: a try that moves a point up tends to move it right. A least-squares
line through the runs' final readings says what distinct-2 the tries reach at the pruned
student's NLL. The table beside the plot gives every reading with the held-out KL's change
against the pruned student's and which of the marks it meets (KL at most half, NLL below,
distinct-2 >= 0.5, no answer mostly one token).

    python benchmarks/real_frontier.py runs/real/r3/opd runs/real/topd_ul0.2 \
        --pruned runs/real/r3/warm --out docs/real_pair_frontier.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from hopd.runs import Run, load_run

DISTINCT_2_MARK = 0.5


def settings(run: Run) -> str:
    """A run's distillation settings in a few words: loss, horizon, unlikelihood weight, rate,
    scheduled steps."""
    c = run.config
    loss, h, optim = c.get("loss") or {}, c.get("horizon") or {}, c.get("optim") or {}
    horizon = h.get("kind")
    if horizon == "truncated":
        horizon = f"H={h.get('tokens') or round(h.get('fraction', 0) * c.get('budget', 0))}"
    ul = f" ul={loss['unlikelihood']:g}" if loss.get("unlikelihood") else ""
    return (f"{loss.get('kind')} {horizon}{ul} lr={optim.get('lr', 0):g} "
            f"{c.get('max_steps')} steps")


def names(runs: list[Run]) -> dict[Path, str]:
    """Each run's folder name, with its parent's where two runs share one (r2/opd, r3/opd)."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.path.name] = counts.get(r.path.name, 0) + 1
    return {r.path: r.path.name if counts[r.path.name] == 1 else f"{r.path.parent.name}/"
            f"{r.path.name}" for r in runs}


def readings(run: Run) -> list[dict]:
    """A run's evaluations after its start (step 0 reads the model it started from)."""
    return [e for e in run.evals if e["step"] > 0 and e.get("eval_teacher_nll") is not None]


def marks(e: dict, pruned: dict) -> dict[str, bool]:
    """Which of the real-pair issue's marks one reading meets, against the pruned student's."""
    return {"KL halved": e["eval_rkl"] <= pruned["eval_rkl"] / 2,
            "NLL below": e["eval_teacher_nll"] < pruned["eval_teacher_nll"],
            "distinct-2": e["eval_distinct_2"] >= DISTINCT_2_MARK,
            "no mostly-one": e.get("eval_mostly_one_token", 0.0) == 0.0}


def trend(runs: list[Run], pruned: dict) -> dict[str, float] | None:
    """The least-squares line distinct-2 = intercept + slope x NLL over the runs' final
    readings (where each try ended), its correlation, and what it reads at the pruned student's
    NLL (None under three runs)."""
    pts = [(e["eval_teacher_nll"], e["eval_distinct_2"]) for r in runs for e in readings(r)[-1:]]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    syy = sum((y - my) ** 2 for _, y in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    slope = sxy / sxx
    return {"slope": slope, "intercept": my - slope * mx, "r": sxy / math.sqrt(sxx * syy),
            "at_pruned_nll": my + slope * (pruned["eval_teacher_nll"] - mx), "readings": n}


def table(runs: list[Run], pruned: dict) -> list[str]:
    head = ["run", "settings", "step", "train s", "rKL +- se", "KL change", "teacher NLL",
            "distinct-2 +- se", "looping", "marks met"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    name = names(runs)
    for run in runs:
        for e in readings(run):
            met = marks(e, pruned)
            lines.append("| " + " | ".join([
                name[run.path], settings(run), str(e["step"]), f"{e['train_time_s']:.0f}",
                f"{e['eval_rkl']:.3f} +- {e.get('eval_rkl_se', math.nan):.3f}",
                f"{e['eval_rkl'] / pruned['eval_rkl'] - 1:+.0%}",
                f"{e['eval_teacher_nll']:.3f}",
                f"{e['eval_distinct_2']:.3f} +- {e.get('eval_distinct_2_se', math.nan):.3f}",
                f"{e.get('eval_looping', math.nan):.2f}",
                "all" if all(met.values()) else
                "not " + ", ".join(k for k, ok in met.items() if not ok)]) + " |")
    return lines


def plot(runs: list[Run], pruned: dict, fit: dict[str, float] | None, teacher_d2: float | None,
         out: Path) -> None:
    from hopd.report_plots import plt  # matplotlib with the Agg backend

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    name = names(runs)
    colors = plt.get_cmap("tab20").colors
    shown = [(run, readings(run)) for run in runs]
    shown = [(run, pts) for run, pts in shown if pts]
    for i, (run, pts) in enumerate(shown):
        x = [e["eval_teacher_nll"] for e in pts]
        y = [e["eval_distinct_2"] for e in pts]
        line, = ax.plot(x, y, "o^sDv"[i % 5] + "-", color=colors[i % 20], alpha=0.85,
                        label=f"{name[run.path]}: {settings(run)}")
        ax.errorbar(x[-1], y[-1], yerr=pts[-1].get("eval_distinct_2_se") or 0,
                    color=line.get_color(), capsize=3)
        for xi, yi, e in zip(x, y, pts):
            ax.annotate(str(e["step"]), (xi, yi), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(DISTINCT_2_MARK, color="k", ls="--", lw=1)
    ax.axvline(pruned["eval_teacher_nll"], color="k", ls="--", lw=1)
    ax.plot(pruned["eval_teacher_nll"], pruned["eval_distinct_2"], "kx", ms=9,
            label="the pruned student")
    if fit is not None:
        nll = [e["eval_teacher_nll"] for _, pts in shown for e in pts]
        xs = [min(nll), max(nll)]
        ax.plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], color="grey", lw=1,
                label=f"least squares over the final readings (r = {fit['r']:.2f})")
    if teacher_d2 is not None:
        ax.axhline(teacher_d2, color="grey", ls=":", lw=1, label="the teacher's own distinct-2")
    ax.set_xlabel("teacher NLL per token of the student's greedy answers (lower: better)")
    ax.set_ylabel("distinct-2 of the greedy answers (higher: fewer repeats)")
    ax.set_title("The marks: above distinct-2 0.5 and left of the pruned student's NLL "
                 "(dashed)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (hopd distill --out)")
    ap.add_argument("--pruned", type=Path, required=True,
                    help="the run whose first evaluation read the pruned student (the warm start)")
    ap.add_argument("--out", type=Path, help="write the plot here (.png)")
    args = ap.parse_args(argv)
    base = load_run(args.pruned)
    if not base.evals or base.evals[0]["step"] != 0 or "eval_rkl" not in base.evals[0]:
        raise SystemExit(f"{args.pruned}: its first evaluation is not a step-0 reading with a "
                         "held-out KL; pass the warm start's run folder (eval_kl_n > 0)")
    pruned = base.evals[0]
    ref = pruned.get("guard_reference") or {}
    runs = [load_run(p) for p in args.runs]
    for line in table(runs, pruned):
        print(line)
    fit = trend(runs, pruned)
    if fit is not None:
        print(f"over the {fit['readings']} final readings: distinct-2 = {fit['intercept']:.3f} + "
              f"{fit['slope']:.3f} x teacher NLL (r = {fit['r']:.2f}); at the pruned student's "
              f"NLL {pruned['eval_teacher_nll']:.3f} it reads {fit['at_pruned_nll']:.3f}")
    if args.out:
        plot(runs, pruned, fit, ref.get("distinct_2") if ref.get("of") == "teacher" else None,
             args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
