"""`hopd compare`: several horizon strategies from the same student, seeds and budget.

Each strategy is the base distill config plus a few overrides; every (strategy, seed) pair gets its
own run folder `OUT/<strategy>/seed<k>`, and `hopd report` turns them into plots and report.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hopd import config as C
from hopd.distill import check_inputs, distill, load_config
from hopd.runstate import check_out, prepare_out, write_json

# name -> overrides on the base config: the paper's three strategies plus TOPD at 25%, then the
# adaptive horizon and TOPD with token-budget batching (hopd.adaptive)
STRATEGIES: dict[str, list[str]] = {
    "opd": ["horizon.kind=full"],
    "popd": ["horizon.kind=progressive", "horizon.shape=step", "horizon.start=0.1",
             "horizon.reach_at=0.5", "horizon.increments=4"],
    "topd10": ["horizon.kind=truncated", "horizon.fraction=0.1"],
    "topd25": ["horizon.kind=truncated", "horizon.fraction=0.25"],
    # beyond the paper
    "adaptive": ["horizon.kind=adaptive", "horizon.start=0.1"],
    "topd10_tb": ["horizon.kind=truncated", "horizon.fraction=0.1", "token_budget=true"],
    # the baseline every OPD paper beats: cross-entropy on the teacher's own answers
    "sft": ["horizon.kind=full", "loss.kind=sft"],
}
DEFAULT = ["opd", "popd", "topd10", "topd25"]


def parse_strategies(names: str, extra: dict[str, list[str]] | None = None) -> list[str]:
    """Comma list of strategy names, each optionally pinned to a learning rate: `opd@1e-3`."""
    known = {**STRATEGIES, **(extra or {})}
    out = [n.strip() for n in names.split(",") if n.strip()]
    for n in out:
        name, _, lr = n.partition("@")
        if name not in known:
            raise C.ConfigError(f"unknown strategy {name!r}: choose from {', '.join(known)}")
        if lr:
            _parse_lr(lr, f"--strategies {n}")
    if not out:
        raise C.ConfigError("--strategies is empty: name at least one, e.g. opd,popd,topd10")
    return out


def parse_lrs(text: str) -> list[float]:
    """`--lrs 3e-4,1e-3,3e-3`: the learning-rate grid every strategy runs at."""
    lrs = [_parse_lr(x.strip(), "--lrs") for x in text.split(",") if x.strip()]
    if len(set(lrs)) != len(lrs):
        raise C.ConfigError(f"--lrs {text}: a rate is given twice")
    return lrs


def _parse_lr(text: str, where: str) -> float:
    try:
        lr = float(text)
    except ValueError:
        raise C.ConfigError(f"{where}: {text!r} is not a number (e.g. 1e-3)") from None
    if not 0 < lr <= 100:
        raise C.ConfigError(f"{where}: learning rate {text} must be in (0, 100]")
    return lr


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def budget_overrides(steps: int, seconds: float, tokens: int) -> list[str]:
    """Budget as optimizer steps, training seconds or sampled tokens (one of them)."""
    given = [x for x in (steps, seconds, tokens) if x]
    if len(given) > 1:
        raise C.ConfigError("give one budget: --steps, --seconds or --tokens")
    if seconds:
        return [f"max_time_s={seconds}", "max_steps=100000"]
    if tokens:
        return [f"max_tokens={tokens}", "max_steps=100000"]
    return [f"max_steps={steps}"] if steps else []


def compare(config: str | Path | None, out: Path, strategies: list[str], seeds: list[int],
            overrides: list[str], budget: list[str], progress: bool = True,
            extra_strategies: dict[str, list[str]] | None = None, resume: bool = False,
            overwrite: bool = False, lrs: list[float] | None = None) -> tuple[list[Path], int]:
    """Runs every strategy for every seed; returns the run folders and the number of the signal
    that stopped it (0: every run finished).

    All configs are built and validated, and the first run's inputs (data, models) checked,
    before the folder is touched, so a typo fails at once and --overwrite deletes nothing then.
    With `lrs`, every strategy runs at every rate (OUT/<strategy>/lr<x>/seed<k>) and also
    evaluates the `val` half at the end, which the report uses to pick each strategy's rate.
    """
    known = {**STRATEGIES, **(extra_strategies or {})}
    plan: list[tuple[str, int, float | None, Any]] = []
    if lrs and not any(o.startswith("val_n=") for o in overrides):
        overrides = [*overrides, "val_n=200"]  # a grid is chosen on the val half, never on test
    for entry in strategies:
        name, _, pinned = entry.partition("@")
        for lr in ([float(pinned)] if pinned else lrs or [None]):
            lr_over = [f"optim.lr={lr}"] if lr is not None else []
            for seed in seeds:
                cfg = load_config(config, [*overrides, *budget, *known[name], *lr_over,
                                           f"seed={seed}"])
                plan.append((name, seed, lr, cfg))
    check_out(out, kind="compare", overwrite=overwrite, resume=resume)
    check_inputs(plan[0][3])  # data, models, context: shared by every run
    runs, done = [], 0  # runs finished in this call (a resumed one skips the others)
    t0 = time.perf_counter()
    with prepare_out(out, kind="compare", overwrite=overwrite, resume=resume):
        for i, (name, seed, lr, cfg) in enumerate(plan):
            run = out / name / (lr_tag(lr) if lr is not None else "") / f"seed{seed}"
            if resume and (run / "result.json").exists():
                runs.append(run)
                continue
            at = f", lr {lr:g}" if lr is not None else ""
            spent = time.perf_counter() - t0
            eta = f", about {spent / done * (len(plan) - i) / 60:.0f} min left" if done else ""
            print(f"\n== compare: run {i + 1}/{len(plan)}: {name}{at}, seed {seed} "
                  f"({spent / 60:.0f} min so far{eta}) ==", flush=True)
            result = distill(cfg, run, resume=resume, progress=progress)
            done += 1
            write_json(run / "strategy.json", {"strategy": name, "seed": seed, "lr": lr,
                                               "overrides": known[name]})
            runs.append(run)
            if result.get("signal"):  # the user asked to stop: start no further run
                return runs, int(result["signal"])
    print(f"compare: {len(plan)} runs in {time.perf_counter() - t0:.0f}s", flush=True)
    return runs, 0
