"""Run folders read back: a run's training lines, evaluations, config and strategy (what
`hopd report`, its plots and the study's table read)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hopd.progress import read_metrics

LOWER_IS_BETTER = ("rkl", "teacher_nll")


def metric_of(cfg: dict[str, Any], evals: list[dict[str, Any]]) -> str:
    """The metric a run is judged on: what its evaluations say they report (eval_metric), else
    its config's choice, else accuracy (runs written before hopd measured anything else)."""
    for e in evals:
        if e.get("eval_metric"):
            return str(e["eval_metric"])
    return str(cfg.get("eval_metric") or "accuracy")


def better(a: float, b: float, metric: str) -> bool:
    """a is at least as good as b."""
    return a <= b if metric in LOWER_IS_BETTER else a >= b


@dataclass
class Run:
    path: Path
    strategy: str
    seed: int
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    val: list[dict[str, Any]] = field(default_factory=list)
    metric: str = "accuracy"  # what `value` reads: accuracy, rkl or teacher_nll

    def value(self, e: dict[str, Any], prefix: str = "eval") -> float:
        v = e.get(f"{prefix}_{self.metric}")
        return math.nan if v is None else float(v)

    @property
    def collapse(self) -> str | None:
        """The collapse guard's first warning in this run, if it fired."""
        return next((e["collapse"] for e in self.evals if e.get("collapse")), None)

    @property
    def lr(self) -> float | None:
        lr = (self.config.get("optim") or {}).get("lr")
        return float(lr) if lr is not None else None

    @property
    def val_accuracy(self) -> float | None:
        """The final accuracy on the `val` half (what a learning rate is chosen on), if run."""
        return self.value(self.val[-1], "val") if self.val else None

    @property
    def val_degenerate(self) -> str | None:
        """How the run's final `val` answers degenerated against the teacher's greedy answers
        (the collapse guard's reference, from its first evaluation), else None. A KL or NLL
        metric can be gamed by repetition the teacher finds likely, so a learning rate whose
        answers degenerated is not chosen, whatever its value."""
        ref = next((e["guard_reference"] for e in self.evals if e.get("guard_reference")), None)
        if (self.metric not in LOWER_IS_BETTER or not self.val or ref is None
                or ref.get("of") != "teacher"):
            return None  # an accuracy checks the answers themselves: repetition cannot game it
        from hopd.quality import degenerated  # torch: only for runs that have the reference

        v = self.val[-1]
        return degenerated(ref, {k: v[f"val_{k}"] for k in ("distinct_2", "mostly_one_token",
                                                             "mean_length") if f"val_{k}" in v})

    @property
    def final_accuracy(self) -> float:
        """The last evaluation's value of the run's metric (named for the default, accuracy)."""
        return self.value(self.evals[-1]) if self.evals else math.nan

    @property
    def best_accuracy(self) -> float:
        vals = [v for v in map(self.value, self.evals) if not math.isnan(v)]
        if not vals:
            return math.nan
        return min(vals) if self.metric in LOWER_IS_BETTER else max(vals)

    def first_reach(self, target: float) -> dict[str, Any] | None:
        """The first evaluation at or past `target` (with the cost spent until then)."""
        for e in self.evals:
            if not math.isnan(self.value(e)) and better(self.value(e), target, self.metric):
                return e
        return None


def load_run(path: Path) -> Run:
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{path} is not a run folder: it has no metrics.jsonl")
    lines = read_metrics(metrics)
    meta_file = path / "strategy.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    cfg_file = path / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    strategy = meta.get("strategy") or _strategy_from_config(cfg) or path.name
    if (cfg.get("horizon") or {}).get("kind") == "adaptive":
        _add_control_time(lines)
    evals = [r for r in lines if "eval_accuracy" in r]
    return Run(path, strategy, int(meta.get("seed", cfg.get("seed", 0) or 0)),
               [r for r in lines if "loss" in r], evals, cfg,
               [r for r in lines if "val_accuracy" in r], metric_of(cfg, evals))


def _add_control_time(lines: list[dict[str, Any]]) -> None:
    """Runs of the adaptive horizon written before control_time_s was logged: the time of its
    readings so far, summed from each reading's diag_time_s (the step-0 reading was not logged,
    so these undercount by one reading)."""
    if any("control_time_s" in r for r in lines):
        return
    spent = 0.0
    for r in lines:
        spent += r.get("diag_time_s", 0.0) if "loss" in r else 0.0
        r["control_time_s"] = spent


def spent_s(record: dict[str, Any]) -> float:
    """The training time up to a metrics line: the steps, and the readings an adaptive horizon
    decides on (control_time_s), which the steps' own clock leaves out."""
    return record["train_time_s"] + record.get("control_time_s", 0.0)


def _strategy_from_config(cfg: dict[str, Any]) -> str | None:
    h = cfg.get("horizon") or {}
    kind = h.get("kind")
    if kind == "full":
        return "opd"
    if kind == "truncated":
        return f"topd{h.get('tokens') or round(100 * h.get('fraction', 0))}"
    if kind == "progressive":
        return "popd"
    return kind


def find_runs(paths: list[Path]) -> list[Run]:
    """Run folders given directly or found below the given folders."""
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if (p / "metrics.jsonl").exists():
            found.append(p)
        else:
            found += sorted(m.parent for m in p.rglob("metrics.jsonl"))
    if not found:
        where = ", ".join(map(str, paths))
        raise FileNotFoundError(f"no run folders (with metrics.jsonl) under {where}")
    return [load_run(p) for p in found]
