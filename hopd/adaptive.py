"""Beyond the paper: an adaptive horizon and token-budget batching.

Adaptive horizon. Hand-set schedules make the user guess H0, the growth rate and when to reach L.
The adaptive schedule starts at H0 and widens H when measurements say the current region has been
learned, or that training at H is hurting the positions after it. Every `diag_every` steps the
loop samples rollouts at the full budget and measures the per-position reverse KL (the same
diagnostics the report plots), kept per position so that the regions are exact: `covered` = the
token mean over positions [0, H), `frontier` = over [H, H + w), w = `adaptive_window` * L, each
with its standard error. Each region is judged only against its *own* earlier readings since the
current H was set (the KL has its own shape along the response, so comparing the frontier with the
covered region would reflect position difficulty, not progress). H widens by `adaptive_growth` * L
when

  - the covered region was learned: its KL fell significantly since H was set (by more than
    `adaptive_z` standard errors) and has since stopped falling: over the last
    `adaptive_patience` checks it fell by less than `adaptive_plateau` (relative) and by less
    than `adaptive_z` standard errors; or
  - training at H is hurting the positions after it: the frontier KL rose significantly since H
    was set, and by more than `adaptive_drift` (relative); or
  - the frontier KL is at most `adaptive_threshold` nats per token (absolute; 0: off).

"Significantly" is what keeps the rule from widening on noise: repeated readings of a student that
is not learning differ only by sampling noise and never pass the test (checked on an untrained
model). It never shrinks, logs every move with its reason, and keeps its state in checkpoints, so a
resumed run takes the same decisions.

Token-budget batching. With a short horizon a step is cheap; `token_budget` spends the savings
on more prompts: prompts per step = min(`max_batch`, round(batch_size * L / H)), so that every
step samples about as many tokens as a full-horizon step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Region:
    """The token-mean KL over a range of positions and its standard error."""

    mean: float
    se: float

    def to_list(self) -> list[float]:
        return [self.mean, self.se]


@dataclass
class PositionReading:
    """One diagnostics reading, per response position (length L): sum, sum of squares and count
    of the per-token reverse KL. Regions are exact sums over positions, never rounded to buckets.
    """

    kl_sum: list[float]
    kl_sq: list[float]
    count: list[int]

    def region(self, lo: int, hi: int) -> Region | None:
        n = sum(self.count[lo:hi])
        if n < 2:
            return None
        s, sq = sum(self.kl_sum[lo:hi]), sum(self.kl_sq[lo:hi])
        mean = s / n
        var = max(sq / n - mean * mean, 0.0) * n / (n - 1)
        return Region(mean, math.sqrt(var / n))


@dataclass
class AdaptiveState:
    horizon: int  # current H
    covered_history: list[list[float]] = field(default_factory=list)  # [mean, se] since H was set
    frontier_history: list[list[float]] = field(default_factory=list)  # [mean, se] since H was set
    moves: list[dict[str, Any]] = field(default_factory=list)  # step, from, to, reason

    def to_dict(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "covered_history": [list(x) for x in
                                                             self.covered_history],
                "frontier_history": [list(x) for x in self.frontier_history],
                "moves": list(self.moves)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdaptiveState:
        def pairs(xs: list[Any]) -> list[list[float]]:  # old checkpoints kept means only
            return [list(x) if isinstance(x, list) else [float(x), 0.0] for x in xs]
        return AdaptiveState(int(d["horizon"]), pairs(d["covered_history"]),
                             pairs(d.get("frontier_history", [])), list(d["moves"]))


@dataclass
class AdaptiveRule:
    budget: int  # L
    window: float = 0.1  # frontier width as a fraction of L
    growth: float = 0.1  # widening step as a fraction of L
    ratio: float = 0.0  # legacy: widen when frontier <= ratio * covered (0: off, see above)
    threshold: float = 0.0  # widen when frontier <= threshold (0: off)
    plateau: float = 0.05  # "stopped falling": < 5% over `patience` checks ...
    patience: int = 3
    drift: float = 0.2  # widen when frontier KL rose > 20% (and significantly) since H was set
    z: float = 3.0  # standard errors that make a change significant rather than noise


def _significant(a: list[float], b: list[float], z: float) -> float:
    """z standard errors of the difference between two readings [mean, se]."""
    return z * math.sqrt(a[1] ** 2 + b[1] ** 2)


def adaptive_update(state: AdaptiveState, rule: AdaptiveRule, step: int,
                    reading: PositionReading) -> AdaptiveState:
    """One decision from one diagnostics reading; returns the (possibly widened) state."""
    L, H = rule.budget, state.horizon
    if H >= L:
        return state
    w = max(1, math.ceil(rule.window * L))
    covered, frontier = reading.region(0, H), reading.region(H, min(L, H + w))
    history = [*state.covered_history, *([covered.to_list()] if covered else [])]
    fronts = [*state.frontier_history, *([frontier.to_list()] if frontier else [])]
    reason = None
    if len(history) > rule.patience:
        first, old, new = history[0], history[-1 - rule.patience], history[-1]
        learned = first[0] - new[0] > _significant(first, new, rule.z)
        still = old[0] - new[0] > max(rule.plateau * old[0], _significant(old, new, rule.z))
        if learned and not still:
            reason = (f"covered KL learned ({first[0]:.3f} -> {new[0]:.3f} since H={H}) and "
                      f"flat over {rule.patience} checks ({old[0]:.3f} -> {new[0]:.3f})")
    if reason is None and rule.drift > 0 and len(fronts) >= 2:
        first, new = fronts[0], fronts[-1]
        if new[0] - first[0] > max(rule.drift * first[0], _significant(first, new, rule.z)):
            reason = (f"frontier KL rising ({first[0]:.3f} -> {new[0]:.3f}): training at H is "
                      "hurting the positions after it")
    if reason is None and frontier is not None and rule.threshold > 0 and \
            frontier.mean <= rule.threshold:
        reason = f"frontier KL {frontier.mean:.3f} <= threshold {rule.threshold:g}"
    if reason is None and frontier is not None and covered is not None and \
            frontier.mean <= rule.ratio * covered.mean:
        reason = f"frontier KL {frontier.mean:.3f} <= {rule.ratio:g} x covered KL " \
                 f"{covered.mean:.3f}"
    moves = list(state.moves)
    if reason is not None:
        new_h = min(L, H + max(1, math.ceil(rule.growth * L)))
        moves.append({"step": step, "from": H, "to": new_h, "reason": reason})
        history, fronts = [], []  # a new region: judged against its own readings from now on
        H = new_h
    return AdaptiveState(H, history, fronts, moves)


def token_budget_batch(batch_size: int, horizon: int, budget: int, max_batch: int) -> int:
    """Prompts per step so that batch x H stays about batch_size x L (capped at max_batch)."""
    return max(1, min(max_batch, round(batch_size * budget / max(1, horizon))))
