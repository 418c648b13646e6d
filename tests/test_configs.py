"""Every shipped YAML recipe loads and validates; the testbed recipes differ only in horizon."""

from pathlib import Path

import pytest

from hopd.config import read_yaml
from hopd.distill import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "hopd" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_validates(path):
    # GPU recipes are checked here with device=cpu: validation rejects an absent CUDA device
    cfg = load_config(path, ["device=cpu"] if "device" in read_yaml(path) else [])
    assert cfg.max_steps >= 1


def test_testbed_recipes_differ_only_in_the_horizon_and_their_own_rate():
    """The three recipes share everything but the horizon and the learning rate, which is each
    strategy's own rate from the study (the demo's rates for the default regime)."""
    from hopd.demo import RATES

    names = {p.stem: read_yaml(p) for p in CONFIGS}

    def rest(cfg):
        return {k: ({**v, "lr": None} if k == "optim" else v) for k, v in cfg.items()
                if k != "horizon"}
    for name in ("popd", "topd"):
        assert rest(names[name]) == rest(names["opd"])
    kinds = {n: names[n]["horizon"]["kind"] for n in ("opd", "popd", "topd")}
    assert kinds == {"opd": "full", "popd": "progressive", "topd": "truncated"}
    rates = {n: names[n]["optim"]["lr"] for n in ("opd", "popd", "topd")}
    assert rates == {"opd": RATES["spread"]["opd"], "popd": RATES["spread"]["popd"],
                     "topd": RATES["spread"]["topd10"]}


def test_top_level_configs_link_points_at_the_recipes():
    top = Path(__file__).parent.parent / "configs"
    assert sorted(p.name for p in top.glob("*.yaml")) == [p.name for p in CONFIGS]


def test_teacher_url_alias():
    cfg = load_config(None, ["teacher.url=http://127.0.0.1:1"])
    assert cfg.teacher_url == "http://127.0.0.1:1"
