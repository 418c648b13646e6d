"""Two processes on the gloo backend give the same update as one process with the whole batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from hopd.cli import main
from hopd.dist import free_port
from hopd.progress import read_metrics

pytestmark = pytest.mark.slow  # the full tier: python -m pytest --slow

pytest.importorskip("accelerate")


def _args(run, pair, extra=()):
    s, t = pair
    return ["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
            "data=chain:tiny", "steps=3", "batch_size=8", "eval_n=4", "eval_every=3",
            "diag_every=0", "save_every=2", "threads=1", "optim.lr=3e-3", *extra]


def _torchrun(run, pair, extra, resume=False, env=()):
    torchrun = shutil.which("torchrun") or [sys.executable, "-m", "torch.distributed.run"]
    cmd = ([torchrun] if isinstance(torchrun, str) else torchrun) + [
        "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "hopd", *_args(run, pair, extra), *(["--resume"] if resume else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "over 2 processes" in out.stdout
    return out


def _same_steps(one, two, steps=(1, 2, 3)):
    a = [r for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_metrics(two / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in b] == list(steps)
    for ra, rb in zip(a, b):
        assert rb["sampled_tokens"] == ra["sampled_tokens"]  # the same rollouts, split in two
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-7)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("loss", ["sampled_rkl", "fkl", "fkl-chunked", "fkl-ul", "fkl-ul+fsdp"])
def test_two_ranks_match_one_process(tmp_path, micro_pair, loss):
    """fkl-chunked: the two ranks compute the loss a few positions at a time (the swapped-out
    head under DDP, the teacher's log-probs from its hidden states), the one process directly.
    fkl-ul: with loss.unlikelihood, whose pass runs before the main backward without the
    all-reduce, on every greedy answer on two ranks and on the repeating ones alone on one
    (+fsdp: the sharded student, its gradients reduce-scattered by the main backward)."""
    loss, _, variant = loss.partition("-")
    extra = [f"loss.kind={loss}"] + (["loss.unlikelihood=1", "loss.unlikelihood_n=2"]
                                     if "ul" in variant else [])
    one = tmp_path / "one"
    assert main(_args(one, micro_pair, extra)) == 0
    two = tmp_path / "two"
    _torchrun(two, micro_pair, extra + ["grad_accum=2"] + (["parallel=fsdp"] if "fsdp" in
                                                           variant else []),
              env={"HOPD_CHUNK_ELEMENTS": "200"} if variant == "chunked" else {})
    _same_steps(one, two)
    if "ul" in variant:
        a = [r for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
        b = [r for r in read_metrics(two / "metrics.jsonl") if "loss" in r]
        assert all(r["greedy_repeats"] > 0 for r in a)
        for ra, rb in zip(a, b):
            assert rb["ul_loss"] == pytest.approx(ra["ul_loss"], rel=1e-4)
            assert rb["greedy_repeats"] == pytest.approx(ra["greedy_repeats"])
    if loss == "sampled_rkl":  # resume from step 2's checkpoint: step 3 comes out the same
        shutil.rmtree(two / "checkpoints" / "step_0000003")
        _torchrun(two, micro_pair, [f"loss.kind={loss}", "grad_accum=2"], resume=True)
        _same_steps(one, two)
    # rank 0 alone wrote the run folder: one metrics file with one line per step and eval
    evals = [r for r in read_metrics(two / "metrics.jsonl") if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert (two / "model" / "model.safetensors").exists()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_0000002",
                                                                       "step_0000003"]


def test_fsdp_two_ranks_match_one_process_and_resume(tmp_path, micro_pair, capsys):
    """FSDP (sharded weights, gradients and AdamW state) gives one process's updates; a run
    resumed from a sharded run's checkpoint continues with the same numbers."""
    one = tmp_path / "one"
    assert main(_args(one, micro_pair, ["loss.kind=fkl"])) == 0
    two = tmp_path / "two"
    out = _torchrun(two, micro_pair, ["loss.kind=fkl", "parallel=fsdp", "grad_accum=2"])
    assert "(FSDP)" in out.stdout
    _same_steps(one, two)
    final = two / "model" / "model.safetensors"
    assert final.exists()
    from safetensors.torch import load_file
    whole = load_file(str(final))  # the full student, gathered from the shards
    ref = load_file(str(one / "model" / "model.safetensors"))
    assert whole.keys() == ref.keys()
    for k in ref:
        assert whole[k].shape == ref[k].shape
        assert torch.allclose(whole[k], ref[k], atol=1e-5), k
    # resume: drop the last checkpoint and its line; step 3 is recomputed from step 2's state.
    # FSDP chosen the way `accelerate launch --use_fsdp` says it, through the environment
    shutil.rmtree(two / "checkpoints" / "step_0000003")
    out = _torchrun(two, micro_pair, ["loss.kind=fkl", "grad_accum=2"], resume=True,
                    env={"ACCELERATE_USE_FSDP": "true"})
    assert "(FSDP)" in out.stdout
    _same_steps(one, two)
    # a sharded run's optimizer state does not load into one process: a clear error instead
    assert main(_args(two, micro_pair, ["loss.kind=fkl"]) + ["--resume"]) == 2
    assert "parallel=fsdp" in capsys.readouterr().err


def test_two_ranks_agree_on_a_time_budget(tmp_path, micro_pair):
    """With max_time_s each rank used to read its own clock: ranks could pick different H and
    LR and disagree on the last step, and the barriers then hung. Both now count the slowest
    rank's time, so the run ends on the same step everywhere."""
    run = tmp_path / "timed"
    _torchrun(run, micro_pair, ["max_time_s=3", "steps=100000", "eval_every=0",
                                "save_every=0", "horizon.kind=progressive"])
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert train and train[-1]["train_time_s"] >= 3
    assert (run / "result.json").exists()
