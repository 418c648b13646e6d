"""Beyond the paper: an adaptive horizon and token-budget batching.

Adaptive horizon. Hand-set schedules make the user guess H0, the growth rate and when to reach L.
The adaptive schedule starts at H0 and widens H when measurements say the current region has been
learned, or that training at H is hurting the positions after it. Every `diag_every` steps (and
once before the first step) the loop samples rollouts at the full budget and measures the
per-position reverse KL (the same diagnostics the report plots), kept per position so that the
regions are exact: `covered` = the token mean over positions [0, H), `frontier` = over
[H, H + w), w = `adaptive_window` * L, and `beyond` = over [H, L), each with its standard error.
Each region is judged only against its *own* readings since the current H was set, the first of
which is the reading that set it (the KL has its own shape along the response, so comparing the
frontier with the covered region would reflect position difficulty, not progress). H widens to
max(H + `adaptive_growth` * L, `adaptive_factor` * H) when the covered region was learned, and
to L at once when the positions past H drift (growing H step by step lets the drift go on:
measured in the fork regime, where the drift sits in the last positions). The tests:

  - the covered region was learned and has stopped improving: its KL fell significantly since H
    was set (by more than `adaptive_z` standard errors), or is no higher than the level an
    earlier region was learned to (within noise or a factor of 2: the new positions came along
    by themselves), and over the last `adaptive_patience` checks it fell by less than
    `adaptive_plateau` (relative) or by less than `adaptive_z` standard errors; or
  - training at H is hurting the positions after it (H goes to L): the frontier or the beyond
    KL rose significantly since H was set, and by more than `adaptive_drift` (relative); or
  - the frontier KL is at most `adaptive_threshold` nats per token (absolute; 0: off).

"Significantly" is what keeps the rule from widening on noise: repeated readings of a student that
is not learning differ only by sampling noise and never pass the test (checked on an untrained
model). It never shrinks, logs every move with its reason, and keeps its state in checkpoints, so a
resumed run takes the same decisions. docs/horizon_study.md measured the first version of this rule
(no reading before the first step, the frontier window only, additive growth, patience 3): it
never widened within a 60-step run, and ended as TOPD at H0 did.

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
    beyond_history: list[list[float]] = field(default_factory=list)  # [H, L): [mean, se]
    learned_level: float | None = None  # covered KL when H last widened because it was learned

    def to_dict(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "covered_history": [list(x) for x in
                                                             self.covered_history],
                "frontier_history": [list(x) for x in self.frontier_history],
                "beyond_history": [list(x) for x in self.beyond_history],
                "learned_level": self.learned_level, "moves": list(self.moves)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdaptiveState:
        def pairs(xs: list[Any]) -> list[list[float]]:  # old checkpoints kept means only
            return [list(x) if isinstance(x, list) else [float(x), 0.0] for x in xs]
        return AdaptiveState(int(d["horizon"]), pairs(d["covered_history"]),
                             pairs(d.get("frontier_history", [])), list(d["moves"]),
                             pairs(d.get("beyond_history", [])), d.get("learned_level"))


@dataclass
class AdaptiveRule:
    budget: int  # L
    window: float = 0.1  # frontier width as a fraction of L
    growth: float = 0.1  # widening step as a fraction of L ...
    factor: float = 2.0  # ... or H times this, whichever is larger
    ratio: float = 0.0  # legacy: widen when frontier <= ratio * covered (0: off, see above)
    threshold: float = 0.0  # widen when frontier <= threshold (0: off)
    plateau: float = 0.05  # "stopped falling": < 5% over `patience` checks ...
    patience: int = 1
    drift: float = 0.2  # widen when frontier KL rose > 20% (and significantly) since H was set
    z: float = 3.0  # standard errors that make a change significant rather than noise


def _significant(a: list[float], b: list[float], z: float) -> float:
    """z standard errors of the difference between two readings [mean, se]."""
    return z * math.sqrt(a[1] ** 2 + b[1] ** 2)


def adaptive_update(state: AdaptiveState, rule: AdaptiveRule, step: int,
                    reading: PositionReading) -> AdaptiveState:
    """One decision from one diagnostics reading; returns the (possibly widened) state. The
    reading that set H is its regions' baseline: the learned and drift tests compare later
    readings with it (the absolute threshold needs no history)."""
    L, H = rule.budget, state.horizon
    if H >= L:
        return state
    covered, frontier, beyond = _regions(reading, rule, H)
    history = [*state.covered_history, *([covered.to_list()] if covered else [])]
    fronts = [*state.frontier_history, *([frontier.to_list()] if frontier else [])]
    beyonds = [*state.beyond_history, *([beyond.to_list()] if beyond else [])]
    learned = _learned(history, state.learned_level, rule, H)
    drift = None if learned else _drift(fronts, beyonds, rule)
    reason = learned or drift
    if reason is None and frontier is not None and rule.threshold > 0 and \
            frontier.mean <= rule.threshold:
        reason = f"frontier KL {frontier.mean:.3f} <= threshold {rule.threshold:g}"
    if reason is None and frontier is not None and covered is not None and \
            frontier.mean <= rule.ratio * covered.mean:
        reason = f"frontier KL {frontier.mean:.3f} <= {rule.ratio:g} x covered KL " \
                 f"{covered.mean:.3f}"
    if reason is None:
        return AdaptiveState(H, history, fronts, list(state.moves), beyonds,
                             state.learned_level)
    # a drift: the untrained positions are drifting, so train all of them now
    new_h = L if drift else min(L, max(H + max(1, math.ceil(rule.growth * L)),
                                       math.ceil(rule.factor * H)))
    moves = [*state.moves, {"step": step, "from": H, "to": new_h, "reason": reason}]
    # the covered region's level counts as learned whenever it fell significantly since H was
    # set, whatever made H widen (a drift can come first, as in the testbed's fork regime)
    level = history[-1][0] if learned or _fell(history, rule.z) else state.learned_level
    # a new region, judged against its own readings from now on: this reading is its baseline
    covered, frontier, beyond = _regions(reading, rule, new_h)
    return AdaptiveState(new_h, [covered.to_list()] if covered else [],
                         [frontier.to_list()] if frontier else [], moves,
                         [beyond.to_list()] if beyond else [], level)


def _regions(reading: PositionReading, rule: AdaptiveRule, H: int
             ) -> tuple[Region | None, Region | None, Region | None]:
    L = rule.budget
    w = max(1, math.ceil(rule.window * L))
    return reading.region(0, H), reading.region(H, min(L, H + w)), reading.region(H, L)


def _drift(fronts: list[list[float]], beyonds: list[list[float]], rule: AdaptiveRule
           ) -> str | None:
    """Why training at H is hurting the positions after it (the frontier window, or every
    position past H, rose significantly and by more than `drift` since H was set), or None."""
    for name, xs in (("frontier", fronts), ("beyond", beyonds)):
        if rule.drift > 0 and len(xs) >= 2:
            first, new = xs[0], xs[-1]
            if new[0] - first[0] > max(rule.drift * first[0], _significant(first, new, rule.z)):
                return (f"{name} KL rising ({first[0]:.3f} -> {new[0]:.3f}): training at H is "
                        "hurting the positions after it")
    return None


def _fell(history: list[list[float]], z: float) -> bool:
    """The region's KL fell significantly from its first reading since H was set."""
    return len(history) >= 2 and \
        history[0][0] - history[-1][0] > _significant(history[0], history[-1], z)


def _learned(history: list[list[float]], level: float | None, rule: AdaptiveRule,
             H: int) -> str | None:
    """Why the covered region counts as learned and flat, or None."""
    if len(history) <= rule.patience:
        return None
    first, old, new = history[0], history[-1 - rule.patience], history[-1]
    fell = _fell(history, rule.z)
    # no higher than the earlier region's learned level: within noise, or within a factor of 2
    at_level = level is not None and new[0] - level <= max(rule.z * new[1], level)
    still = old[0] - new[0] > max(rule.plateau * old[0], _significant(old, new, rule.z))
    if not (fell or at_level) or still:
        return None
    how = (f"{first[0]:.3f} -> {new[0]:.3f} since H={H}" if fell else
           f"{new[0]:.3f}, no higher than the previous region's {level:.3f}")
    return (f"covered KL learned ({how}) and flat over {rule.patience} check(s) "
            f"({old[0]:.3f} -> {new[0]:.3f})")


def token_budget_batch(batch_size: int, horizon: int, budget: int, max_batch: int) -> int:
    """Prompts per step so that batch x H stays about batch_size x L (capped at max_batch)."""
    return max(1, min(max_batch, round(batch_size * budget / max(1, horizon))))
