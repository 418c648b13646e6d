"""Two processes on the gloo backend give the same update as one process with the whole batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from hopd.cli import main
from hopd.progress import read_metrics

pytest.importorskip("accelerate")


def _args(run, pair, extra=()):
    s, t = pair
    return ["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
            "data=chain:tiny", "steps=3", "batch_size=8", "eval_n=4", "eval_every=3",
            "diag_every=0", "save_every=2", "threads=1", "optim.lr=3e-3", *extra]


@pytest.mark.parametrize("loss", ["sampled_rkl", "fkl"])
def test_two_ranks_match_one_process(tmp_path, micro_pair, loss):
    one = tmp_path / "one"
    assert main(_args(one, micro_pair, [f"loss.kind={loss}"])) == 0
    two = tmp_path / "two"
    torchrun = shutil.which("torchrun") or [sys.executable, "-m", "torch.distributed.run"]
    cmd = ([torchrun] if isinstance(torchrun, str) else torchrun) + [
        "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
        "-m", "hopd", *_args(two, micro_pair, [f"loss.kind={loss}", "grad_accum=2"])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "over 2 processes" in out.stdout
    a = [r for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_metrics(two / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["sampled_tokens"] == ra["sampled_tokens"]  # the same rollouts, split in two
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-7)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4, abs=1e-7)
    # rank 0 alone wrote the run folder: one metrics file with one line per step and eval
    evals = [r for r in read_metrics(two / "metrics.jsonl") if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert (two / "model" / "model.safetensors").exists()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_0000002",
                                                                       "step_0000003"]
