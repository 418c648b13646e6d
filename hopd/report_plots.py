"""The plots of `hopd report`: accuracy (or the run's metric) against cost, step cost against
the horizon, the per-position reverse KL heat map, the teacher-recovery probe and the horizon
schedules. Each takes the report's groups of runs (strategy -> seeds) and writes one PNG."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hopd.runs import Run, spent_s

Series = tuple[list[float], list[float], list[float], list[float]]


def _series(runs: list[Run], xkey: str) -> Series:
    """Mean and min/max accuracy over seeds at each evaluation index."""
    n = min(len(r.evals) for r in runs)
    xs, mean, lo, hi = [], [], [], []
    for i in range(n):
        pts = [r.evals[i] for r in runs]
        xs.append(statistics.fmean(spent_s(p) if xkey == "train_time_s" else p.get(xkey, 0)
                                   for p in pts))
        accs = [r.value(p) for r, p in zip(runs, pts)]
        mean.append(statistics.fmean(accs))
        lo.append(min(accs))
        hi.append(max(accs))
    return xs, mean, lo, hi


METRIC_LABELS = {"accuracy": "full-budget accuracy, greedy (%)",
                 "rkl": "held-out reverse KL per token (lower is better)",
                 "teacher_nll": "teacher NLL of greedy answers per token (lower is better)"}


def plot_accuracy(groups: dict[str, list[Run]], target: float | None, path: Path) -> None:
    panels = [("train_time_s", "training wall-clock (s; changes with the machine's load; "
                                "adaptive: with its readings)"),
              ("sampled_tokens", "sampled tokens"), ("step", "optimizer step")]
    if all(e.get("train_flops") is not None for rs in groups.values() for r in rs
           for e in r.evals):
        panels.insert(2, ("train_flops", "estimated training compute (FLOPs)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    metric, scale = next((r.metric for rs in groups.values() for r in rs), "accuracy"), 100
    for ax, (xkey, label) in zip(axes, panels):
        for name, runs in groups.items():
            xs, mean, lo, hi = _series(runs, xkey)
            scale = 100 if metric == "accuracy" else 1  # percent, as in the tables
            pct = [[scale * v for v in ys] for ys in (mean, lo, hi)]
            n = f" ({len(runs)} seeds, min-max band)" if len(runs) > 1 else ""
            (line,) = ax.plot(xs, pct[0], marker="o", ms=3, label=name + n)
            if len(runs) > 1:
                ax.fill_between(xs, pct[1], pct[2], alpha=0.15, color=line.get_color())
        if target is not None:
            ax.axhline(scale * target, ls="--", color="gray", lw=1, label="target (95% of OPD)")
        ax.set_xlabel(label)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{metric} at the full budget L against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(groups: dict[str, list[Run]], path: Path) -> None:
    """Median step time split and activation memory at each horizon seen in the runs."""
    by_h: dict[int, list[dict[str, Any]]] = {}
    for runs in groups.values():
        for r in runs:
            for x in r.train:
                by_h.setdefault(x["horizon"], []).append(x)
    hs = sorted(by_h)
    med = {k: [statistics.median(x[k] for x in by_h[h]) for h in hs]
           for k in ("sample_time_s", "teacher_time_s", "learn_time_s")}
    mem = [max(x.get("act_mem_mb", 0) for x in by_h[h]) for h in hs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    bottom = [0.0] * len(hs)
    width = max(1.0, (max(hs) - min(hs)) / max(1, 3 * len(hs))) if hs else 1.0
    for k, lab in (("sample_time_s", "sample"), ("teacher_time_s", "teacher"),
                   ("learn_time_s", "learn")):
        a1.bar(hs, med[k], bottom=bottom, width=width, label=lab)
        bottom = [b + v for b, v in zip(bottom, med[k])]
    a1.set_xlabel("horizon H (tokens)")
    a1.set_ylabel("median wall-clock step time (s, this machine)")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(hs, mem, marker="o")
    a2.set_xlabel("horizon H (tokens)")
    a2.set_ylabel("learner activation memory (MiB)")
    a2.grid(alpha=0.3)
    fig.suptitle("Wall-clock cost of a step against the rollout horizon (it changes with the "
                 "machine's load; the verdicts use estimated compute)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panels(groups: dict[str, list[Run]], key: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(strategy, training lines that carry `key`) for each strategy's first seed that has any."""
    out = []
    for name, runs in groups.items():
        rows = [x for x in runs[0].train if key in x]
        if rows:
            out.append((name, rows))
    return out


def _panel_row(n: int, height: float) -> tuple[Any, Any]:
    """A figure with one panel per strategy, side by side."""
    return plt.subplots(1, n, figsize=(4.2 * n, height), squeeze=False)


def plot_heatmap(groups: dict[str, list[Run]], path: Path) -> bool:
    panels = _panels(groups, "diag_rkl_by_pos")
    if not panels:
        return False
    fig, axes = _panel_row(len(panels), 4.0)
    vmax = max((v for _, rows in panels for x in rows for v in x["diag_rkl_by_pos"]
                if v == v), default=1.0)
    for i, (ax, (name, rows)) in enumerate(zip(axes[0], panels)):
        grid = [[v if v == v else float("nan") for v in x["diag_rkl_by_pos"]] for x in rows]
        # one reading still gets a visible column: widen its extent by half a step each side
        lo, hi = rows[0]["step"], rows[-1]["step"]
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        im = ax.imshow(list(map(list, zip(*grid))), aspect="auto", origin="lower",
                       cmap="magma", vmin=0, vmax=vmax, extent=(lo, hi, 0, 1))
        ax.set_title(name)
        ax.set_xlabel("step")
        if i == 0:
            ax.set_ylabel("response position (fraction of L)")
    fig.colorbar(im, ax=axes[0].tolist(), label="reverse KL(student || teacher) per token")
    fig.suptitle("Where the teacher disagrees with the student (rollouts at the full budget)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def probe_lines(rows: list[dict[str, Any]]) -> list[tuple[str, list[float], list[float]]]:
    """(label, steps, accuracies) per cut; cuts whose lines coincide are one line whose label
    names them all, so the legend never names a line the reader cannot see."""
    xs = [x["step"] for x in rows]
    by_values: dict[tuple[float, ...], list[str]] = {}
    for cut in rows[0]["probe_teacher_acc_by_cut"]:
        ys = tuple(x["probe_teacher_acc_by_cut"][cut] for x in rows)
        by_values.setdefault(ys, []).append(f"{float(cut):.0%}")
    out = []
    for ys, cuts in by_values.items():
        label = (f"cut at {cuts[0]} of L" if len(cuts) == 1 else
                 f"cuts at {', '.join(cuts)} of L (identical)")
        out.append((label, xs, list(ys)))
    return out


def plot_probe(groups: dict[str, list[Run]], path: Path) -> bool:
    """Teacher-recovery probe: the teacher's accuracy finishing student prefixes cut at p * L."""
    panels = _panels(groups, "probe_teacher_acc_by_cut")
    if not panels:
        return False
    fig, axes = _panel_row(len(panels), 3.8)
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-")]
    for i, (ax, (name, rows)) in enumerate(zip(axes[0], panels)):
        for j, (label, xs, ys) in enumerate(probe_lines(rows)):
            marker, line = styles[j % len(styles)]
            ax.plot(xs, ys, marker=marker, ls=line, ms=4, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if i == 0:
            ax.set_ylabel("teacher accuracy finishing the prefix")
    fig.suptitle("Teacher-recovery probe: can the teacher still finish the student's prefix?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_horizon(groups: dict[str, list[Run]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, runs in groups.items():
        r = runs[0]
        ax.step([x["step"] for x in r.train], [x["horizon"] for x in r.train], where="post",
                label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("horizon H (tokens)")
    ax.set_title("Horizon schedules")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
