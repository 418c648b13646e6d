"""The table of benchmarks/real_pair_grid.sh: each run's last evaluation on val and its test
evaluation, which of the real-pair marks it meets against the pruned student on the same split
(real_frontier.marks: reverse KL at most half, teacher NLL below, distinct-2 >= 0.5, no answer
mostly one token), then each variant's distinct-2 over its seeds and how many runs met every
mark (the last line: the same as JSON); OUT/grid.png shows each run's distinct-2, reverse KL and
teacher NLL by variant. Runs still going, or killed before their first evaluation, are left out.

    python benchmarks/real_pair_table.py OUT
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_frontier import marks, readings  # noqa: E402

from hopd.runs import load_run  # noqa: E402

SHOWN = ["rkl", "teacher_nll", "distinct_2", "looping", "mostly_one_token", "eos_rate",
         "mean_length"]


def as_reading(result: dict, step: int) -> dict:
    """`hopd eval`'s JSON as an evaluation line of metrics.jsonl (eval_-prefixed keys)."""
    return {"step": step, **{f"eval_{k}": v for k, v in result.items()}}


def collect(out: Path) -> tuple[dict, dict]:
    """The pruned student's readings by split, and every run's readings by variant, seed
    folder and split."""
    pruned = {s: as_reading(json.loads(p.read_text()), 0) for s in ("val", "test")
              if (p := out / f"student_{s}.json").exists()}
    found: dict = defaultdict(dict)
    for d in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists()
                    and not p.name.startswith("warm")):
        done = readings(load_run(d))
        if not done:
            continue
        last = done[-1]
        run = found[d.name.rsplit("_s", 1)[0]][d.name] = {"val": last}
        if (d / "test.json").exists():
            run["test"] = as_reading(json.loads((d / "test.json").read_text()), last["step"])
    return pruned, found


def summary(pruned: dict, found: dict) -> dict:
    """Each variant's readings by split: runs, distinct-2 mean / min / max, runs that met every
    mark."""
    out: dict = {}
    for variant, runs in found.items():
        for split in ("val", "test"):
            got = [s[split] for s in runs.values() if split in s]
            if got:
                d2 = [r["eval_distinct_2"] for r in got]
                out.setdefault(variant, {})[split] = {
                    "runs": len(got), "distinct_2_mean": statistics.mean(d2),
                    "distinct_2_min": min(d2), "distinct_2_max": max(d2),
                    "every_mark": sum(all(marks(r, pruned[split]).values()) for r in got)}
    return out


def lines(pruned: dict, found: dict) -> list[str]:
    out = [f"pruned student, {s}: " + ", ".join(f"{k} {r['eval_' + k]:.3f}" for k in SHOWN
                                                 if r.get("eval_" + k) is not None)
           for s, r in pruned.items()]
    out += ["", "| run | split | step | " + " | ".join(SHOWN) + " | marks met | train s |",
            "|---" * (len(SHOWN) + 5) + "|"]
    for runs in found.values():
        for name, splits in runs.items():
            for split, r in splits.items():
                met = marks(r, pruned[split])
                cells = [f"{r['eval_' + k]:.3f}" if r.get("eval_" + k) is not None else ""
                         for k in SHOWN]
                verdict = "all" if all(met.values()) else "not " + ", ".join(
                    k for k, ok in met.items() if not ok)
                secs = f"{r['train_time_s']:.0f}" if "train_time_s" in r else ""
                out.append(f"| {name} | {split} | {r['step']} | " + " | ".join(cells)
                           + f" | {verdict} | {secs} |")
    out += ["", "| variant | split | runs | distinct-2 mean | min | max | every mark met |",
            "|---|---|---|---|---|---|---|"]
    for variant, splits in summary(pruned, found).items():
        for split, v in splits.items():
            out.append(f"| {variant} | {split} | {v['runs']} | {v['distinct_2_mean']:.3f} | "
                       f"{v['distinct_2_min']:.3f} | {v['distinct_2_max']:.3f} | "
                       f"{v['every_mark']} of {v['runs']} |")
    return out


def plot(pruned: dict, found: dict, path: Path) -> None:
    from hopd.report_plots import plt  # matplotlib with the Agg backend

    panels = (("eval_distinct_2", "distinct-2 (mark: at least 0.5)", lambda b: 0.5),
              ("eval_rkl", "held-out reverse KL (mark: at most half\nthe pruned student's)",
               lambda b: b["eval_rkl"] / 2),
              ("eval_teacher_nll", "teacher NLL of the greedy answers\n(mark: below the pruned "
               "student's)", lambda b: b["eval_teacher_nll"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    names = list(found)
    for ax, (key, title, mark) in zip(axes, panels):
        for shift, split, marker, ls in ((-0.12, "val", "o", "--"), (0.12, "test", "s", ":")):
            shown = False
            for i, name in enumerate(names):
                ys = [s[split][key] for s in found[name].values() if split in s]
                ax.scatter([i + shift] * len(ys), ys, marker=marker, color=f"C{i}", alpha=0.8)
                shown = shown or bool(ys)
            if shown and split in pruned:
                ax.axhline(mark(pruned[split]), color="grey", lw=1, ls=ls,
                           label=f"mark, {split} ({marker})")
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("the real-pair grid: one point per run (seed); circles val, squares test",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: Path) -> None:
    pruned, found = collect(out)
    if not pruned:
        raise SystemExit(f"{out}: no student_val.json or student_test.json (the pruned "
                         "student's readings); run benchmarks/real_pair_grid.sh first")
    print("\n".join(lines(pruned, found)))
    if found:
        plot(pruned, found, out / "grid.png")
        print(f"wrote {out / 'grid.png'}")
    print(json.dumps({"grid": str(out), "variants": summary(pruned, found)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
