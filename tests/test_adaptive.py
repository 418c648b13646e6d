"""Adaptive horizon decisions, token-budget batching, and the teacher-recovery probe."""

from __future__ import annotations

import pytest

from hopd.adaptive import (
    AdaptiveRule,
    AdaptiveState,
    adaptive_update,
    recovery_probe,
    token_budget_batch,
)
from hopd.cli import main
from hopd.evaluate import encode_prompts
from hopd.models import tiny_llama
from hopd.progress import read_metrics

L = 100
COUNTS = [50] * 10  # 10 buckets of 10 positions, all measured


def _kl(covered: float, frontier: float, h: int) -> list[float]:
    return [covered if b * 10 < h else frontier for b in range(10)]


def test_widens_when_the_frontier_is_as_good_as_the_covered_region():
    rule = AdaptiveRule(L, window=0.1, growth=0.2, ratio=1.0, plateau=0.0)
    s = AdaptiveState(10)
    s = adaptive_update(s, rule, 5, _kl(0.5, 2.0, 10), COUNTS)
    assert s.horizon == 10 and not s.moves  # frontier much worse: stay
    s = adaptive_update(s, rule, 10, _kl(0.5, 0.4, 10), COUNTS)
    assert s.horizon == 30 and s.moves[-1]["from"] == 10 and "frontier" in s.moves[-1]["reason"]


def test_widens_on_an_absolute_threshold():
    rule = AdaptiveRule(L, ratio=0.0, threshold=0.3, plateau=0.0)
    assert adaptive_update(AdaptiveState(20), rule, 1, _kl(0.1, 0.5, 20), COUNTS).horizon == 20
    assert adaptive_update(AdaptiveState(20), rule, 1, _kl(0.1, 0.2, 20), COUNTS).horizon == 30


def test_widens_on_a_plateau_only_after_patience_checks():
    rule = AdaptiveRule(L, ratio=0.0, plateau=0.05, patience=2, growth=0.1)
    s = AdaptiveState(10)
    for step, covered in enumerate([1.0, 0.8, 0.6]):  # still improving fast: stay
        s = adaptive_update(s, rule, step, _kl(covered, 5.0, 10), COUNTS)
    assert s.horizon == 10
    for step, covered in enumerate([0.59, 0.585], start=3):  # flat: widen once
        s = adaptive_update(s, rule, step, _kl(covered, 5.0, 10), COUNTS)
    assert s.horizon == 20 and "plateau" in s.moves[-1]["reason"]
    assert s.covered_history == []  # the new region is judged afresh


def test_never_shrinks_and_stops_at_l():
    rule = AdaptiveRule(L, ratio=10.0, growth=0.3, plateau=0.0)
    s = AdaptiveState(10)
    hs = []
    for step in range(8):
        s = adaptive_update(s, rule, step, _kl(0.1, 0.1, s.horizon), COUNTS)
        hs.append(s.horizon)
    assert hs == sorted(hs) and hs[-1] == L and max(hs) == L


def test_state_round_trips_and_decides_identically():
    rule = AdaptiveRule(L, ratio=0.0, plateau=0.05, patience=2)
    readings = [_kl(c, 3.0, 10) for c in (1.0, 0.99, 0.985, 0.98, 0.5)]
    a = AdaptiveState(10)
    for i, r in enumerate(readings):
        a = adaptive_update(a, rule, i, r, COUNTS)
    b = AdaptiveState(10)
    for i, r in enumerate(readings[:2]):
        b = adaptive_update(b, rule, i, r, COUNTS)
    b = AdaptiveState.from_dict(b.to_dict())  # a checkpoint in between
    for i, r in enumerate(readings[2:], start=2):
        b = adaptive_update(b, rule, i, r, COUNTS)
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("H,expected", [(100, 8), (50, 16), (10, 80), (1, 128)])
def test_token_budget_batch_sizes(H, expected):
    assert token_budget_batch(8, H, 100, max_batch=128) == expected


def test_recovery_probe_on_a_tiny_model(tokenizer):
    student = tiny_llama("micro", tokenizer, seed=1)
    prompts = encode_prompts(tokenizer, ["a=1+2;", "a=3*4;"])
    calls = []

    def check(text, answer):
        calls.append(text)
        return text.endswith(answer)

    out = recovery_probe(student, student, tokenizer, prompts, ["x", "y"], check, budget=20)
    assert set(out) == {"0", "0.1", "0.25", "0.5", "0.75"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    # with the teacher = the student (greedy both), every cut reproduces the same full text
    assert len(set(calls[i] for i in range(0, len(calls), 2))) == 1


def test_adaptive_and_token_budget_runs(tmp_path, micro_pair):
    s, t = micro_pair
    run = tmp_path / "adaptive"
    rc = main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
               "data=chain:tiny", "steps=4", "batch_size=4", "eval_n=2", "diag_every=1",
               "diag_n=4", "horizon.kind=adaptive", "horizon.adaptive_ratio=100",
               "probe_every=2", "probe_n=2", "token_budget=true", "max_batch=16"])
    assert rc == 0
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    hs = [r["horizon"] for r in train]
    assert hs == sorted(hs) and hs[-1] > hs[0]  # a generous ratio widens at every check
    assert all("horizon_move" in r for r in train[:-1] if r["horizon"] < 50)
    assert train[0]["batch_prompts"] > 4  # short horizon: more prompts
    assert "probe_teacher_acc_by_cut" in train[1]


def test_widens_when_training_hurts_the_positions_after_h():
    rule = AdaptiveRule(L, ratio=0.0, plateau=0.0, drift=0.2, growth=0.1)
    s = AdaptiveState(10)
    s = adaptive_update(s, rule, 1, _kl(0.5, 1.0, 10), COUNTS)
    s = adaptive_update(s, rule, 2, _kl(0.4, 1.1, 10), COUNTS)  # +10%: within the drift
    assert s.horizon == 10
    s = adaptive_update(s, rule, 3, _kl(0.3, 1.3, 10), COUNTS)  # +30%: widen
    assert s.horizon == 20 and "rising" in s.moves[-1]["reason"]
    off = AdaptiveRule(L, ratio=0.0, plateau=0.0, drift=0.0)
    t = AdaptiveState(10)
    for i, f in enumerate((1.0, 2.0, 4.0)):
        t = adaptive_update(t, off, i, _kl(0.5, f, 10), COUNTS)
    assert t.horizon == 10  # drift 0 turns the rule off
