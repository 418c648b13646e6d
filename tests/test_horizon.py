import math

import pytest

from hopd.config import ConfigError
from hopd.schedules import HorizonConfig, describe, horizon_at

L, K = 160, 100


def test_full_and_truncated():
    assert all(horizon_at(k, K, L, HorizonConfig("full")) == L for k in range(K))
    assert horizon_at(0, K, L, HorizonConfig("truncated", fraction=0.1)) == 16
    assert horizon_at(50, K, L, HorizonConfig("truncated", tokens=7)) == 7
    assert horizon_at(3, K, L, HorizonConfig("truncated", fraction=1.0)) == L


def test_step_shape_is_the_papers_formula():
    cfg = HorizonConfig("progressive", shape="step", start=0.25, reach_at=0.5, increments=4)
    h0, reach = math.ceil(0.25 * L), math.ceil(0.5 * K)
    dk, dh = reach // 4, math.ceil((L - h0) / 4)
    for k in range(K):
        assert horizon_at(k, K, L, cfg) == min(L, h0 + dh * (k // dk))
    assert horizon_at(reach, K, L, cfg) == L


@pytest.mark.parametrize("shape", ["step", "linear", "cosine", "exp"])
def test_progressive_shapes_grow_monotonically_from_h0_to_l(shape):
    cfg = HorizonConfig("progressive", shape=shape, start=0.1, reach_at=0.6)
    hs = [horizon_at(k, K, L, cfg) for k in range(K)]
    assert hs[0] == 16
    assert all(a <= b for a, b in zip(hs, hs[1:]))
    assert hs[math.ceil(0.6 * K)] == L and hs[-1] == L
    assert all(1 <= h <= L for h in hs)


def test_linear_midpoint_and_exp_is_geometric():
    # 101 steps with reach_at = 1: L at step 100, so step 50 is half-way
    lin = HorizonConfig("progressive", shape="linear", start_tokens=10, reach_at=1.0)
    assert horizon_at(50, K + 1, L, lin) == round(10 + 150 * 0.5)
    ex = HorizonConfig("progressive", shape="exp", start_tokens=10, reach_at=1.0)
    assert horizon_at(50, K + 1, L, ex) == round(10 * (16 ** 0.5))


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match="horizon.fraction"):
        HorizonConfig("truncated", fraction=0).validate(L)
    with pytest.raises(ConfigError, match="H0 <= L"):
        HorizonConfig("progressive", start_tokens=L + 1).validate(L)
    with pytest.raises(ConfigError, match="did you mean|choose one"):
        HorizonConfig("progresive").validate(L)
    with pytest.raises(ConfigError, match="reaches L"):
        HorizonConfig("progressive", reach_at=1.5).validate(L)


def test_describe_lists_rows():
    text = describe(K, L, HorizonConfig("progressive", shape="linear"))
    assert text.split("step->H ")[1].count("->") == 6
    assert "1->16" in text and f"{K}->{L}" in text  # steps counted from 1, like the bar
    staged = describe(60, L, HorizonConfig("progressive", shape="step", start=0.1, reach_at=0.5,
                                           increments=4))
    assert staged.count("H=") == 5 and "steps 1-7: H=16" in staged  # every stage, none skipped


@pytest.mark.parametrize("shape", ["step", "linear", "cosine", "exp"])
@pytest.mark.parametrize("K", [1, 2, 5, 20, 60, 97])
@pytest.mark.parametrize("reach_at", [0.1, 0.5, 0.9, 1.0])
def test_every_progressive_shape_is_at_l_from_its_reach_step(shape, K, reach_at):
    """H equals L at the reach step and after, whatever K, reach_at and the increments; before
    it, H grows without passing L (reach_at = 1: L at the last step)."""
    from hopd.schedules import reach_step

    L = 256
    cfg = HorizonConfig("progressive", shape=shape, start=0.1, reach_at=reach_at, increments=4)
    hs = [horizon_at(k, K, L, cfg) for k in range(K)]
    r = reach_step(K, reach_at)
    assert r == max(0, min(K - 1, math.ceil(reach_at * K) - 1))
    assert all(h == L for h in hs[r:]), hs
    assert all(a <= b for a, b in zip(hs, hs[1:]))
    if reach_at == 1.0:
        assert r == K - 1 and hs[-1] == L
    if r >= 2:
        assert hs[0] < L  # it really starts short
