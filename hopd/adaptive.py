"""Beyond the paper: an adaptive horizon, token-budget batching and a teacher-recovery probe.

Adaptive horizon. Hand-set schedules make the user guess H0, the growth rate and when to reach L.
The adaptive schedule starts at H0 and widens H when a measured signal says the positions just
past the horizon now carry reliable feedback. Every `diag_every` steps the loop samples rollouts
at the full budget and measures the per-position sampled reverse KL (the same diagnostics the
report plots). With `covered` = mean KL over positions [0, H) and `frontier` = mean KL over
[H, H + w), w = `adaptive_window` * L, the schedule widens by `adaptive_growth` * L when

  - the frontier is no worse than the trained region: frontier <= `adaptive_ratio` * covered, or
    frontier <= `adaptive_threshold` (absolute, nats per token); or
  - the trained region has plateaued: covered improved by less than `adaptive_plateau` (relative)
    over the last `adaptive_patience` checks, so more steps at this H would teach little; or
  - training at H is hurting the positions after it: the frontier KL has risen by more than
    `adaptive_drift` (relative) since the first check at this H. (Added after the testbed showed
    truncated training pushing the KL past the horizon up while the covered KL fell.)

It never shrinks, logs every move with its reason, and keeps its state in checkpoints, so a
resumed run takes the same decisions.

Token-budget batching. With a short horizon a step is cheap; `token_budget` spends the savings
on more prompts: prompts per step = min(`max_batch`, round(batch_size * L / H)), so that every
step samples about as many tokens as a full-horizon step.

Teacher-recovery probe. Every `probe_every` steps, for `probe_n` held-out prompts, the student's
greedy rollout is cut at fractions p of L and the teacher finishes greedily from there; the
teacher's accuracy at each p measures how well it can still give useful feedback on a student
prefix of that length (what the paper calls unreliable late feedback).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hopd.evaluate import decode_responses
from hopd.rollout import sample

PROBE_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75)


@dataclass
class AdaptiveState:
    horizon: int  # current H
    covered_history: list[float] = field(default_factory=list)  # covered KL at each check
    frontier_history: list[float] = field(default_factory=list)  # frontier KL at each check
    moves: list[dict[str, Any]] = field(default_factory=list)  # step, from, to, reason

    def to_dict(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "covered_history": list(self.covered_history),
                "frontier_history": list(self.frontier_history), "moves": list(self.moves)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdaptiveState:
        return AdaptiveState(int(d["horizon"]), list(d["covered_history"]),
                             list(d.get("frontier_history", [])), list(d["moves"]))


@dataclass
class AdaptiveRule:
    budget: int  # L
    window: float = 0.1  # frontier width as a fraction of L
    growth: float = 0.1  # widening step as a fraction of L
    ratio: float = 1.0  # widen when frontier <= ratio * covered
    threshold: float = 0.0  # ... or when frontier <= threshold (0: off)
    plateau: float = 0.05  # ... or when covered improved < 5% over `patience` checks
    patience: int = 3
    drift: float = 0.2  # ... or when frontier KL rose > 20% since the first check at this H


def _mean_over(values: list[float], counts: list[int], lo: int, hi: int, budget: int
               ) -> float | None:
    """Token-weighted mean of per-bucket values whose bucket starts in [lo, hi) (positions)."""
    n = len(values)
    num = den = 0.0
    for b, (v, c) in enumerate(zip(values, counts)):
        start = b * budget / n
        if lo <= start < hi and c > 0 and v == v:
            num += v * c
            den += c
    return num / den if den > 0 else None


def adaptive_update(state: AdaptiveState, rule: AdaptiveRule, step: int,
                    rkl_by_pos: list[float], tokens_by_pos: list[int]) -> AdaptiveState:
    """One decision from one diagnostics reading; returns the (possibly widened) state."""
    L, H = rule.budget, state.horizon
    if H >= L:
        return state
    covered = _mean_over(rkl_by_pos, tokens_by_pos, 0, H, L)
    w = max(1, math.ceil(rule.window * L))
    frontier = _mean_over(rkl_by_pos, tokens_by_pos, H, H + w, L)
    history = [*state.covered_history, covered] if covered is not None else \
        list(state.covered_history)
    fronts = [*state.frontier_history, frontier] if frontier is not None else \
        list(state.frontier_history)
    reason = None
    if frontier is not None and covered is not None and frontier <= rule.ratio * covered:
        reason = f"frontier KL {frontier:.3f} <= {rule.ratio:g} x covered KL {covered:.3f}"
    elif frontier is not None and rule.threshold > 0 and frontier <= rule.threshold:
        reason = f"frontier KL {frontier:.3f} <= threshold {rule.threshold:g}"
    elif rule.drift > 0 and len(fronts) >= 2 and fronts[0] > 0 and \
            fronts[-1] > (1 + rule.drift) * fronts[0]:
        reason = (f"frontier KL rising ({fronts[0]:.3f} -> {fronts[-1]:.3f}): training at H is "
                  "hurting the positions after it")
    elif len(history) > rule.patience:
        old, new = history[-1 - rule.patience], history[-1]
        if old > 0 and (old - new) / old < rule.plateau:
            reason = (f"covered KL plateaued ({old:.3f} -> {new:.3f} over {rule.patience} "
                      f"checks)")
    moves = list(state.moves)
    if reason is not None:
        new_h = min(L, H + max(1, math.ceil(rule.growth * L)))
        moves.append({"step": step, "from": H, "to": new_h, "reason": reason})
        history, fronts = [], []  # a new region: judge it afresh
        H = new_h
    return AdaptiveState(H, history, fronts, moves)


def token_budget_batch(batch_size: int, horizon: int, budget: int, max_batch: int) -> int:
    """Prompts per step so that batch x H stays about batch_size x L (capped at max_batch)."""
    return max(1, min(max_batch, round(batch_size * budget / max(1, horizon))))


@torch.no_grad()
def recovery_probe(student: PreTrainedModel, teacher: PreTrainedModel,
                   tok: PreTrainedTokenizerBase, prompts: list[list[int]], answers: list[str],
                   check: Any, budget: int, fractions: tuple[float, ...] = PROBE_FRACTIONS,
                   ) -> dict[str, Any]:
    """Teacher accuracy when it finishes the student's greedy rollout from position p * L."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    student_was = student.training
    student.eval()
    r = sample(student, prompts, budget, eos, pad, greedy=True)
    student.train(student_was)
    out: dict[str, Any] = {}
    for p in fractions:
        cut = int(p * budget)
        prefixes, kept = [], []
        for b, prompt in enumerate(prompts):
            n = int(r.response_mask_B_R[b].sum())
            ids = r.response_ids_B_R[b, : min(cut, n)].tolist()
            if eos in ids:  # the student finished before p * L: nothing left for the teacher
                ids = ids[: ids.index(eos)]
            kept.append(ids)
            prefixes.append(prompt + ids)
        cont = sample(teacher, prefixes, max(1, budget - cut), eos, pad, greedy=True)
        texts = decode_responses(tok, cont.response_ids_B_R, cont.response_mask_B_R)
        correct = [check(tok.decode(k, skip_special_tokens=True) + t, a)
                   for k, t, a in zip(kept, texts, answers)]
        out[f"{p:g}"] = statistics.fmean(correct)
    return out
