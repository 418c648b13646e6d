"""Adaptive horizon decisions, token-budget batching, and the teacher-recovery probe."""

from __future__ import annotations

import json

import pytest

from hopd.adaptive import (
    AdaptiveRule,
    AdaptiveState,
    PositionReading,
    adaptive_update,
    token_budget_batch,
)
from hopd.cli import main
from hopd.diagnostics import recovery_probe
from hopd.models import tiny_llama
from hopd.progress import read_metrics
from hopd.tasks import encode_prompts

L = 100
N = 50  # tokens measured at each position


def _reading(covered: float, frontier: float, h: int, noise: float = 0.05, w: int = 10):
    """Per-position KL readings: `covered` on [0, h), `frontier` on [h, h + w), 5.0 after; each
    position's N tokens spread +-noise around its value (so a region's standard error is small
    but not zero)."""
    kl_sum, kl_sq = [], []
    for pos in range(L):
        v = covered if pos < h else frontier if pos < h + w else 5.0
        vals = [v - noise, v + noise] * (N // 2)
        kl_sum.append(sum(vals))
        kl_sq.append(sum(x * x for x in vals))
    return PositionReading(kl_sum, kl_sq, [N] * L)


def test_regions_are_exact_position_ranges():
    r = _reading(0.5, 2.0, 13, noise=0.0)  # H = 13: not on any 10-position bucket edge
    assert r.region(0, 13).mean == pytest.approx(0.5)
    assert r.region(13, 23).mean == pytest.approx(2.0)
    assert r.region(12, 14).mean == pytest.approx(1.25)
    assert r.region(0, 13).se == pytest.approx(0.0, abs=1e-9)


def test_widens_once_the_covered_region_is_learned_and_flat():
    rule = AdaptiveRule(L, window=0.1, growth=0.2, plateau=0.05, patience=2)
    s = AdaptiveState(10)
    for step, covered in enumerate([1.0, 0.7, 0.5]):  # learning: stay
        s = adaptive_update(s, rule, step, _reading(covered, 2.0, 10))
    assert s.horizon == 10
    for step, covered in enumerate([0.49, 0.49], start=3):  # learned and flat: widen
        s = adaptive_update(s, rule, step, _reading(covered, 2.0, 10))
    assert s.horizon == 30 and "learned" in s.moves[-1]["reason"]
    # the new region is judged afresh, against the reading that set it
    assert s.covered_history == [_reading(0.49, 2.0, 10).region(0, 30).to_list()]
    assert s.learned_level == pytest.approx(0.49)


def test_new_positions_that_came_along_by_themselves_widen_at_once():
    """After a widening on a learned region, positions already at the learned level need no
    training of their own: the next flat reading widens again (doubling H: 10, 20, 40, 80, L)."""
    rule = AdaptiveRule(L, growth=0.1, factor=2.0, patience=1)
    s = AdaptiveState(10)
    hs = []
    for step, covered in enumerate([1.0, 0.3, 0.3, 0.3, 0.3, 0.3]):
        # positions up to 80 follow the covered region once it is learned; 5.0 after them
        s = adaptive_update(s, rule, step, _reading(covered, covered, 10, w=70))
        hs.append(s.horizon)
    assert hs == [10, 10, 20, 40, 80, 100]  # learned at step 2 (fell, then flat), then by level
    assert "no higher than the previous region" in s.moves[-1]["reason"]


def test_widens_when_the_positions_past_the_frontier_drift():
    """TOPD's failure in the fork regime: the end of the answer drifts while the frontier window
    stays put. The drift test covers every position past H."""
    rule = AdaptiveRule(L, plateau=0.0, drift=0.2)

    def reading(tail: float) -> PositionReading:
        r = _reading(0.2, 0.5, 10)
        r.kl_sum[60:] = [tail * N] * 40
        r.kl_sq[60:] = [tail * tail * N] * 40
        return r
    s = AdaptiveState(10)
    for step in range(3):
        s = adaptive_update(s, rule, step, reading(0.1))
    assert s.horizon == 10
    s = adaptive_update(s, rule, 3, reading(2.0))
    assert s.horizon == L and "beyond KL rising" in s.moves[-1]["reason"]


def test_flat_but_never_learned_does_not_widen():
    """A flat covered KL that never fell is no evidence of learning: stay."""
    rule = AdaptiveRule(L, plateau=0.05, patience=2)
    s = AdaptiveState(10)
    for step in range(8):
        s = adaptive_update(s, rule, step, _reading(0.8, 2.0, 10))
    assert s.horizon == 10 and not s.moves


def test_the_frontier_is_judged_against_itself_not_the_covered_region():
    """A frontier much harder than the covered region (position difficulty) is no reason to
    stay or to go; only its own change counts."""
    rule = AdaptiveRule(L, plateau=0.0, drift=0.2)
    s = AdaptiveState(10)
    for step in range(4):  # frontier 10x the covered KL, unchanged: stay
        s = adaptive_update(s, rule, step, _reading(0.2, 2.0, 10))
    assert s.horizon == 10
    s = adaptive_update(s, rule, 4, _reading(0.2, 2.6, 10))  # +30%, many standard errors
    assert s.horizon == L and "rising" in s.moves[-1]["reason"]  # a drift: train every position


def test_widens_on_an_absolute_threshold():
    rule = AdaptiveRule(L, threshold=0.3, plateau=0.0)
    assert adaptive_update(AdaptiveState(20), rule, 1, _reading(0.1, 0.5, 20)).horizon == 20
    assert adaptive_update(AdaptiveState(20), rule, 1, _reading(0.1, 0.2, 20)).horizon == 40


def test_never_shrinks_and_stops_at_l():
    rule = AdaptiveRule(L, threshold=10.0, growth=0.3)
    s = AdaptiveState(10)
    hs = []
    for step in range(8):
        s = adaptive_update(s, rule, step, _reading(0.1, 0.1, s.horizon))
        hs.append(s.horizon)
    assert hs == sorted(hs) and hs[-1] == L and max(hs) == L


def test_state_round_trips_and_decides_identically():
    rule = AdaptiveRule(L, plateau=0.05, patience=2)
    readings = [_reading(c, 3.0, 10) for c in (1.0, 0.7, 0.5, 0.49, 0.49, 0.3)]
    a = AdaptiveState(10)
    for i, r in enumerate(readings):
        a = adaptive_update(a, rule, i, r)
    b = AdaptiveState(10)
    for i, r in enumerate(readings[:2]):
        b = adaptive_update(b, rule, i, r)
    b = AdaptiveState.from_dict(json.loads(json.dumps(b.to_dict())))  # a checkpoint between
    for i, r in enumerate(readings[2:], start=2):
        b = adaptive_update(b, rule, i, r)
    assert a.to_dict() == b.to_dict() and a.moves


def test_an_untrained_student_never_widens_on_noise(tokenizer, micro_pair):
    """Real readings of a student that does not learn (the same weights every time, fresh
    rollouts each check) differ by sampling noise only: the rule must not move."""
    from hopd.diagnostics import position_diagnostics
    from hopd.distill import DistillConfig
    from hopd.models import load_model
    from hopd.teacher import LocalTeacher

    s, t = micro_pair
    student, teacher = load_model(str(s)).eval(), load_model(str(t)).eval()
    prompts = encode_prompts(tokenizer, [f"a={i}+{i % 3};" for i in range(12)])
    budget = 40
    rule = AdaptiveRule(budget)  # the defaults a user gets
    state = AdaptiveState(4)
    cfg = DistillConfig()
    means = []
    for step in range(10):
        _, reading = position_diagnostics(student, LocalTeacher(teacher), prompts,
                                          sampling=cfg.sampling, budget=budget,
                                          vocab=len(tokenizer), eos=2, pad=0, seed=cfg.seed,
                                          step=step, buckets=8)
        means.append(reading.region(0, 4).mean)
        state = adaptive_update(state, rule, step, reading)
    assert len(set(means)) > 1  # the readings really differ from check to check
    assert state.horizon == 4 and not state.moves


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
               "diag_n=4", "horizon.kind=adaptive", "horizon.adaptive_threshold=100",
               "probe_every=2", "probe_n=2", "token_budget=true", "max_batch=16"])
    assert rc == 0
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    hs = [r["horizon"] for r in train]
    assert hs == sorted(hs) and hs[-1] > hs[0]  # a generous threshold widens at every check
    assert all("horizon_move" in r for r in train[:-1] if r["horizon"] < 50)
    assert train[0]["batch_prompts"] > 4  # short horizon: more prompts
    assert "probe_teacher_acc_by_cut" in train[1]
    # its readings are a training cost, logged beside the steps' own clock: the step-0 reading
    # before the first step, then each step's (diag_every=1)
    control = [r["control_time_s"] for r in train]
    assert control[0] > train[0]["diag_time_s"] > 0
    for before, now, r in zip(control, control[1:], train[1:]):
        assert now == pytest.approx(before + r["diag_time_s"])
    assert train[-1]["train_time_s"] == pytest.approx(sum(r["step_time_s"] for r in train))


def test_the_probe_gives_the_teacher_its_own_prompts(tokenizer, monkeypatch):
    """With a teacher system prompt or template, the teacher continues from *its* prompt plus
    the student's prefix, not from the student's prompt."""
    import hopd.diagnostics as A

    model = tiny_llama("micro", tokenizer, seed=1)
    prompts = encode_prompts(tokenizer, ["a=1+2;", "a=3*4;"])
    mine = encode_prompts(tokenizer, ["a=1+2;", "a=3*4;"], system_prompt="b=0;")
    seen, real = [], A.sample

    def spy(m, ps, *a, **k):
        seen.append([list(p) for p in ps])
        return real(m, ps, *a, **k)

    monkeypatch.setattr(A, "sample", spy)
    recovery_probe(model, model, tokenizer, prompts, ["x", "y"], lambda t, a: False, budget=8,
                   fractions=(0.0, 0.5), teacher_prompts=mine)
    student_call, *teacher_calls = seen
    assert student_call == prompts
    for call in teacher_calls:
        assert all(c[: len(p)] == p for c, p in zip(call, mine))


def test_a_drift_keeps_the_learned_level_for_later():
    """The fork regime's drifting seed: the covered region is learned, then the tail drifts and
    H goes to L at once; the level the covered region was learned to is kept."""
    rule = AdaptiveRule(L, growth=0.1, factor=2.0, patience=1, drift=0.2)

    def reading(covered: float, tail: float) -> PositionReading:
        r = _reading(covered, 0.01, 10, w=60)  # H0 = 10 at `covered`, positions 10-70 fine
        r.kl_sum[70:] = [tail * N] * 30
        r.kl_sq[70:] = [tail * tail * N] * 30
        return r
    s = AdaptiveState(10)
    hs = []
    for step, (covered, tail) in enumerate([(2.0, 0.1), (0.01, 0.5)]):
        s = adaptive_update(s, rule, step, reading(covered, tail))
        hs.append(s.horizon)
    assert hs == [10, L] and "rising" in s.moves[0]["reason"]
    assert s.learned_level == pytest.approx(0.01)
