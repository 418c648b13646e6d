"""Schedules: the rollout horizon H and the learning rate as pure functions of the step.

With L the full response budget and K the number of optimizer steps:

- `full` (OPD):        H_k = L.
- `truncated` (TOPD):  H_k = `tokens` if set, else ceil(`fraction` * L), for every k.
- `progressive` (POPD): H grows from H0 (`start_tokens`, or ceil(`start` * L)) and reaches L at
  the 0-based step K_r = min(K - 1, ceil(`reach_at` * K) - 1) (reach_at = 1: the last step), then
  stays at L. Shapes, with u = k / K_r:
    step:    H_k = min(L, H0 + dH * floor(k / dk)), dk = floor(K_r / n), dH = ceil((L - H0) / n),
             n = `increments` (the paper's form);
    linear:  H_k = H0 + (L - H0) * u;
    cosine:  H_k = H0 + (L - H0) * (1 - cos(pi * u)) / 2;
    exp:     H_k = H0 * (L / H0) ** u  (geometric growth).
  Non-integer values round to the nearest token; H is always in [1, L].

Being pure functions of the step, schedules resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hopd import config as C

KINDS = ("full", "truncated", "progressive", "adaptive")
SHAPES = ("step", "linear", "cosine", "exp")


@dataclass
class HorizonConfig:
    kind: str = "full"  # full (OPD) | truncated (TOPD) | progressive (POPD) | adaptive
    fraction: float = 0.1  # truncated: H = ceil(fraction * L) ...
    tokens: int = 0  # ... or exactly this many tokens when > 0
    start: float = 0.1  # progressive/adaptive: H0 = ceil(start * L) ...
    start_tokens: int = 0  # ... or exactly this many tokens when > 0
    shape: str = "step"  # progressive: step | linear | cosine | exp
    reach_at: float = 0.5  # progressive: fraction of training at which H reaches L
    increments: int = 4  # progressive `step` shape: number of increments
    adaptive_window: float = 0.1  # adaptive: frontier width past H, as a fraction of L
    adaptive_growth: float = 0.1  # adaptive: widen by this fraction of L ...
    adaptive_factor: float = 2.0  # adaptive: ... or to H times this, whichever is larger
    adaptive_ratio: float = 0.0  # adaptive, legacy: widen when frontier KL <= ratio x covered
    adaptive_threshold: float = 0.0  # adaptive: widen when frontier KL <= this (0: off)
    adaptive_plateau: float = 0.05  # adaptive: covered KL learned, then improved less than this
    adaptive_patience: int = 1  # adaptive: ... over this many diagnostics checks
    adaptive_drift: float = 0.2  # adaptive: ... or frontier KL rose this much (0: off)
    adaptive_z: float = 3.0  # adaptive: standard errors that make a KL change significant

    def validate(self, budget: int | None = None) -> None:
        C.check(self.kind in KINDS, f"horizon.kind={self.kind!r}: choose one of {', '.join(KINDS)}")
        C.check(self.shape in SHAPES,
                f"horizon.shape={self.shape!r}: choose one of {', '.join(SHAPES)}")
        C.check(0 < self.fraction <= 1, f"horizon.fraction={self.fraction}: must be in (0, 1]")
        C.check(0 < self.start <= 1, f"horizon.start={self.start}: must be in (0, 1]")
        C.check(0 < self.reach_at <= 1, f"horizon.reach_at={self.reach_at}: must be in (0, 1] "
                "so that the schedule reaches L within the run")
        C.check(self.increments >= 1, f"horizon.increments={self.increments}: must be >= 1")
        for name in ("adaptive_window", "adaptive_growth"):
            v = getattr(self, name)
            C.check(0 < v <= 1, f"horizon.{name}={v}: must be in (0, 1]")
        C.check(self.adaptive_ratio >= 0 and self.adaptive_threshold >= 0
                and self.adaptive_plateau >= 0 and self.adaptive_drift >= 0,
                "horizon.adaptive_ratio, adaptive_threshold, adaptive_plateau and "
                "adaptive_drift must be >= 0")
        C.check(self.adaptive_z >= 0, f"horizon.adaptive_z={self.adaptive_z}: must be >= 0")
        C.check(self.adaptive_factor >= 1,
                f"horizon.adaptive_factor={self.adaptive_factor}: must be >= 1 (1: growth only)")
        C.check(self.adaptive_patience >= 1,
                f"horizon.adaptive_patience={self.adaptive_patience}: must be >= 1")
        C.check(self.tokens >= 0 and self.start_tokens >= 0,
                "horizon.tokens and horizon.start_tokens must be >= 0")
        if budget is not None:
            C.check(self.tokens <= budget, f"horizon.tokens={self.tokens} exceeds the response "
                    f"budget L={budget}: lower it or raise budget")
            C.check(self.start_tokens <= budget, f"horizon.start_tokens={self.start_tokens} "
                    f"exceeds the response budget L={budget} (H0 <= L is required)")


def initial_horizon(cfg: HorizonConfig, budget: int) -> int:
    """H0 of progressive and adaptive schedules."""
    h0 = cfg.start_tokens or math.ceil(cfg.start * budget)
    return max(1, min(budget, h0))


def horizon_at(step: int, total_steps: int, budget: int, cfg: HorizonConfig) -> int:
    """H for optimizer step `step` (0-based) of `total_steps`, with full budget L = `budget`.

    For `adaptive`, this is the schedule's starting point; `hopd.adaptive` moves it.
    """
    L = budget
    if cfg.kind == "full":
        return L
    if cfg.kind == "truncated":
        h = cfg.tokens or math.ceil(cfg.fraction * L)
        return max(1, min(L, h))
    h0 = initial_horizon(cfg, L)
    if cfg.kind == "adaptive":
        return h0
    reach = reach_step(total_steps, cfg.reach_at)
    if step >= reach:
        return L
    u = step / reach
    if cfg.shape == "step":  # the paper's H_k = min(L, H0 + dH floor(k / dk)), L exactly at reach
        n = min(cfg.increments, reach)  # fewer steps than increments: one increment per step
        dk, dh = reach // n, math.ceil((L - h0) / n)
        h = h0 + dh * (step // dk)
    elif cfg.shape == "linear":
        h = h0 + (L - h0) * u
    elif cfg.shape == "cosine":
        h = h0 + (L - h0) * (1 - math.cos(math.pi * u)) / 2
    else:  # exp
        h = h0 * (L / h0) ** u
    return max(1, min(L, int(round(h))))


def reach_step(total_steps: int, reach_at: float) -> int:
    """The 0-based step from which a progressive schedule is at L: the step where a fraction
    `reach_at` of the run's steps has been taken (reach_at = 1: the last step)."""
    return max(0, min(total_steps - 1, math.ceil(reach_at * total_steps) - 1))


def describe(total_steps: int, budget: int, cfg: HorizonConfig, rows: int = 6) -> str:
    """The schedule for printing at start, with steps counted from 1 as the progress bar does:
    every stage of a step-shaped schedule (`steps 1-15: H=16, ...`), else a few `step->H` rows."""
    hs = [horizon_at(k, total_steps, budget, cfg) for k in range(total_steps)]
    stages: list[tuple[int, int, int]] = []  # (first step, last step, H), 1-based
    for k, h in enumerate(hs, start=1):
        if stages and stages[-1][2] == h:
            stages[-1] = (stages[-1][0], k, h)
        else:
            stages.append((k, k, h))
    extra = f", shape {cfg.shape}" if cfg.kind == "progressive" else ""
    head = f"horizon {cfg.kind}{extra} (L={budget})"
    if cfg.kind == "adaptive":
        return f"{head}: starts at H={hs[0]}, widened by measurements"
    if len(stages) <= 8:
        parts = ", ".join(f"steps {a}-{b}: H={h}" if a != b else f"step {a}: H={h}"
                          for a, b, h in stages)
        return f"{head}: {parts}"
    picks = sorted({round(i * (total_steps - 1) / max(1, rows - 1)) for i in range(rows)})
    return f"{head}: step->H " + ", ".join(f"{k + 1}->{hs[k]}" for k in picks)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
