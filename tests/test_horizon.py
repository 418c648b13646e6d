import math

import pytest

from hopd.config import ConfigError
from hopd.horizon import HorizonConfig, describe, horizon_at

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
    lin = HorizonConfig("progressive", shape="linear", start_tokens=10, reach_at=1.0)
    assert horizon_at(50, K, L, lin) == round(10 + 150 * 0.5)
    ex = HorizonConfig("progressive", shape="exp", start_tokens=10, reach_at=1.0)
    assert horizon_at(50, K, L, ex) == round(10 * (16 ** 0.5))


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
    assert "0->16" in text and f"{K - 1}->{L}" in text
