"""`hopd compare`: several horizon strategies from the same student, seeds and budget.

Each strategy is the base distill config plus a few overrides; every (strategy, seed) pair gets its
own run folder `OUT/<strategy>/seed<k>`, and `hopd report` turns them into plots and report.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hopd import config as C
from hopd.distill import distill, load_config

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
}
DEFAULT = ["opd", "popd", "topd10", "topd25"]


def parse_strategies(names: str, extra: dict[str, list[str]] | None = None) -> list[str]:
    known = {**STRATEGIES, **(extra or {})}
    out = [n.strip() for n in names.split(",") if n.strip()]
    for n in out:
        if n not in known:
            raise C.ConfigError(f"unknown strategy {n!r}: choose from {', '.join(known)}")
    if not out:
        raise C.ConfigError("--strategies is empty: name at least one, e.g. opd,popd,topd10")
    return out


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
            extra_strategies: dict[str, list[str]] | None = None, resume: bool = False
            ) -> list[Path]:
    """Runs every strategy for every seed; returns the run folders.

    All configs are built and validated before the first run starts, so a typo in any of them
    fails at once rather than after the first strategy's training.
    """
    known = {**STRATEGIES, **(extra_strategies or {})}
    plan: list[tuple[str, int, Any]] = []
    for name in strategies:
        for seed in seeds:
            cfg = load_config(config, [*overrides, *budget, *known[name], f"seed={seed}"])
            plan.append((name, seed, cfg))
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    t0 = time.perf_counter()
    for i, (name, seed, cfg) in enumerate(plan):
        run = out / name / f"seed{seed}"
        if resume and (run / "result.json").exists():
            runs.append(run)
            continue
        print(f"\n== compare: run {i + 1}/{len(plan)}: {name}, seed {seed} ==", flush=True)
        run.mkdir(parents=True, exist_ok=True)
        (run / "strategy.json").write_text(json.dumps({"strategy": name, "seed": seed,
                                                       "overrides": known[name]}))
        distill(cfg, run, resume=resume and (run / "checkpoints").exists(), progress=progress)
        runs.append(run)
    print(f"compare: {len(plan)} runs in {time.perf_counter() - t0:.0f}s", flush=True)
    return runs
