"""Shared fixtures: the testbed tokenizer and tiny random models saved as HF checkpoints."""

from __future__ import annotations

import pytest
import torch

from hopd.models import build_testbed_tokenizer, save_checkpoint, tiny_llama


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
