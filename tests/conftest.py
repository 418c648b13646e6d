"""Shared fixtures: the testbed tokenizer and tiny random models saved as HF checkpoints."""

from __future__ import annotations

import pytest
import torch

from hopd.models import build_testbed_tokenizer, save_checkpoint, tiny_llama


@pytest.fixture(autouse=True)
def _no_eval_cache(monkeypatch):
    """Tests evaluate afresh (hopd.evalcache off) unless one turns the cache on itself."""
    monkeypatch.setenv("HOPD_EVAL_CACHE", "off")


@pytest.fixture(scope="session")
def tokenizer():
    return build_testbed_tokenizer()


@pytest.fixture(scope="session")
def micro_model(tokenizer):
    torch.manual_seed(0)
    return tiny_llama("micro", tokenizer, seed=0).eval()


@pytest.fixture(scope="session")
def micro_pair(tmp_path_factory, tokenizer):
    """Two different random micro checkpoints on disk: (student_dir, teacher_dir)."""
    root = tmp_path_factory.mktemp("pair")
    s, t = root / "student", root / "teacher"
    save_checkpoint(tiny_llama("micro", tokenizer, seed=1), tokenizer, s)
    save_checkpoint(tiny_llama("micro", tokenizer, seed=2), tokenizer, t)
    return s, t


# Two tiers. `python -m pytest -q` runs the fast tier (minutes); `--slow` adds the tests marked
# slow (recipes, vLLM, several processes, the real SmolLM2 pair), which CI also runs. Slow tests
# are deselected, not skipped, so the fast tier's summary counts only what it ran.
def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
