"""The real command, end to end, on tiny models."""

import json
import math
import subprocess
import sys

import pytest

from hopd.cli import main
from hopd.progress import read_metrics
from hopd.tasks import default_budget

TRAIN_KEYS = {"step", "horizon", "loss", "step_time_s", "sample_time_s", "teacher_time_s",
              "learn_time_s", "sampled_tokens", "cut_fraction", "peak_mem_mb"}


def test_help_runs_as_a_console_command():
    out = subprocess.run([sys.executable, "-m", "hopd", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("sft", "eval", "distill"):
        assert cmd in out.stdout


def test_sft_then_eval(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["sft", "--out", str(ckpt), "--quiet", "model=size:micro", "task=chain:tiny",
                 "steps=2", "batch_size=4", "eval_n=3"]) == 0
    assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
    assert len(read_metrics(ckpt / "metrics.jsonl")) == 2
    res = tmp_path / "eval.json"
    assert main(["eval", "--model", str(ckpt), "--task", "chain:tiny", "--n", "4",
                 "--out", str(res)]) == 0
    data = json.loads(res.read_text())
    for key in ("accuracy", "n", "mean_response_tokens", "truncated_fraction"):
        assert key in data
    assert data["n"] == 4 and 0 <= data["accuracy"] <= 1


def test_two_step_distill(tmp_path, micro_pair):
    student, teacher = micro_pair
    run = tmp_path / "run"
    rc = main(["distill", "--out", str(run), "--quiet", f"student={student}",
               f"teacher={teacher}", "data=chain:tiny", "steps=2", "batch_size=4",
               "eval_n=3", "diag_every=1", "diag_n=2", "horizon.kind=truncated",
               "horizon.fraction=0.25"])
    assert rc == 0
    lines = read_metrics(run / "metrics.jsonl")
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_accuracy" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(TRAIN_KEYS <= set(r) for r in train)
    assert [r["step"] for r in evals] == [0, 2]
    L = json.loads((run / "result.json").read_text())
    assert L["steps"] == 2
    H = math.ceil(0.25 * default_budget("chain:tiny"))
    assert all(r["horizon"] == H for r in train)
    assert all(r["mean_response_tokens"] <= H for r in train)
    assert len(train[0]["diag_rkl_by_pos"]) == 16
    assert (run / "model" / "model.safetensors").exists()
    assert (run / "config.yaml").exists()


def test_a_bf16_sampler_trains_with_rho_near_one(tmp_path, micro_pair):
    """`sampling.dtype=bfloat16`: rollouts from a bf16 copy of the fp32 student, synced every
    step. The sampled_rkl loss's largest importance ratio (learner / sampler) stays near 1 at
    every step (measured: <= 1.004); a copy left behind by the learner (lr 3e-2 moves it far)
    reaches 2-2.8 by the second step. Its mean is 1 in expectation whatever the copy is, so
    it is no test."""
    student, teacher = micro_pair
    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), "--quiet", f"student={student}",
                 f"teacher={teacher}", "data=chain:tiny", "steps=4", "batch_size=4",
                 "eval_n=2", "diag_every=0", "loss.kind=sampled_rkl", "optim.lr=3e-2",
                 "optim.warmup_steps=0", "sampling.dtype=bfloat16"]) == 0
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(train) == 4 and all(1.0 < r["rho_max"] < 1.1 for r in train), \
        [r["rho_max"] for r in train]  # > 1: the copy's rounding is measured


@pytest.mark.parametrize("args,needle", [
    (["distill", "--out", "X", "horizon.knd=full"], "did you mean 'horizon.kind'"),
    (["distill", "--out", "X", "max_step=3"], "did you mean 'max_steps'"),
    (["distill", "--out", "X", "batch_size=abc"], "batch_size='abc': expected an integer"),
    (["distill", "--out", "X", "horizon.kind=truncated", "horizon.fraction=1.5"],
     "horizon.fraction=1.5"),
    (["distill", "--out", "X", "student=does/not/exist"], "does/not/exist"),
    (["eval", "--model", "testbed:nope", "--n", "2"], "unknown bundled model"),
    (["distill", "--out", "X", "sampling.dtype=int8"], "sampling.dtype='int8': choose one of"),
    (["distill", "--out", "X", "sampling.dtype=bfloat16", "sampling.engine=vllm"],
     "is for engine=hf"),
    (["distill", "--out", "X", "sampling.ahead=0"], "sampling.ahead=0: must be >= 1"),
    (["distill", "--out", "X", "sampling.ahead=4"], "only the teacher's allow"),
    (["distill", "--out", "X", "sampling.ahead=4", "loss.kind=sft", "max_time_s=60"],
     "horizons known in advance"),
])
def test_bad_input_exits_2_with_a_clear_line(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "X").exists()  # nothing created before the failure


def test_overrides_may_follow_options(tmp_path, micro_pair):
    student, teacher = micro_pair
    run = tmp_path / "run"
    rc = main(["distill", f"student={student}",
               "--out", str(run), "--quiet", f"teacher={teacher}", "data=chain:tiny",
               "steps=1", "batch_size=2", "eval_n=2", "diag_every=0"])
    assert rc == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1]


def test_h_alias_means_a_truncated_horizon():
    from hopd.distill_config import load_config

    cfg = load_config(None, ["H=16"])
    assert cfg.horizon.kind == "truncated" and cfg.horizon.tokens == 16
    cfg = load_config(None, ["H=16", "horizon.kind=adaptive"])  # an explicit kind stays
    assert cfg.horizon.kind == "adaptive"


def test_a_bug_mid_training_shows_its_traceback(tmp_path, micro_pair, monkeypatch, capsys):
    """A ValueError raised by a bug is not dressed up as the user's bad input (exit 2)."""
    import pytest

    import hopd.step

    def broken(*a, **k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(hopd.step, "learn", broken)
    s, t = micro_pair
    with pytest.raises(ValueError, match="an internal bug"):
        main(["distill", "--out", str(tmp_path / "run"), "--quiet", f"student={s}",
              f"teacher={t}", "data=chain:tiny", "batch_size=4", "eval_n=2", "max_steps=1"])


def test_version_and_config_show(capsys):
    import dataclasses

    import pytest

    from hopd import __version__
    from hopd.distill_config import DistillConfig
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and f"hopd {__version__}" in capsys.readouterr().out
    assert main(["config", "show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = {line.split(" = ")[0] for line in lines}

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            t = f.type if not isinstance(f.type, str) else eval(f.type, vars(
                __import__("hopd.distill_config", fromlist=["x"])))
            if dataclasses.is_dataclass(t):
                yield from leaves(t, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    assert set(leaves(DistillConfig)) == keys  # every key, nested as section.key
    assert all("# " in line and line.split("# ", 1)[1].strip() for line in lines)  # a meaning
    assert main(["config", "show", "configs/opd.yaml", "optim.lr=3e-3"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr = 0.003" in out and "loss.kind = rkl" in out


def test_eval_accepts_a_run_folder(tmp_path, micro_pair, capsys):
    s, t = micro_pair
    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "batch_size=2", "eval_n=2", "max_steps=1", "eval_every=0",
                 "diag_every=0"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--task", "chain:tiny", "--n", "3"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_the_python_api_runs_a_distillation(tmp_path, micro_pair):
    """README's "From Python" example, on the micro pair."""
    from hopd.distill import distill, load_config

    s, t = micro_pair
    cfg = load_config(None, [f"student={s}", f"teacher={t}", "data=chain:tiny", "max_steps=2",
                             "batch_size=2", "eval_n=2", "eval_every=0", "diag_every=0"])
    result = distill(cfg, tmp_path / "api", progress=False)
    assert result["steps"] == 2 and (tmp_path / "api" / "model" / "config.json").exists()


PINNED = {  # losses of a 4-step run, measured at commit 2c4d14f (torch 2.13 CPU)
    "sampled_rkl": ([-0.06358745694160461, 0.02542763017117977, 0.025566445663571358,
                     0.01009744219481945], [19, 176, 291, 424]),
    "rkl": ([0.012341344729065895, 0.011933415196835995, 0.010831499472260475,
             0.010087192058563232], [19, 176, 307, 440]),
}


def test_pinned_metrics_of_a_short_run(tmp_path, micro_pair):
    """A refactor of the loop must leave a run's numbers as they were: these are the per-step
    losses and sampled tokens of one short progressive run, pinned."""
    import pytest

    from hopd.progress import read_metrics

    s, t = micro_pair
    for kind, (losses, tokens) in PINNED.items():
        run = tmp_path / kind
        assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                     "data=chain:tiny", "max_steps=4", "batch_size=4", "eval_n=4",
                     "eval_every=2", "diag_every=0", "threads=1", f"loss.kind={kind}",
                     "optim.lr=3e-3", "horizon.kind=progressive", "horizon.shape=linear"]) == 0
        train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        assert [r["horizon"] for r in train] == [5, 50, 50, 50]
        assert [r["sampled_tokens"] for r in train] == tokens
        assert [r["loss"] for r in train] == pytest.approx(losses, rel=1e-5, abs=1e-8)


def test_the_sft_baseline_samples_from_the_teacher(tmp_path, micro_pair):
    """loss.kind=sft: the run's sampler is the teacher's, so the first step's loss is the
    student's mean negative log-likelihood of the teacher's answers (drawn with the run's
    per-row seeds; greedy answers would not tell the two random models apart)."""
    import pytest
    import torch

    from hopd.losses import token_logprobs
    from hopd.models import load_model, load_tokenizer, response_logits
    from hopd.progress import read_metrics
    from hopd.rollout import row_seeds, sample
    from hopd.tasks import PromptSource, encode_prompts

    s, t = micro_pair
    run = tmp_path / "sft"
    assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "max_steps=1", "batch_size=4", "eval_n=4", "eval_every=0",
                 "diag_every=0", "threads=1", "loss.kind=sft"]) == 0
    (rec,) = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    source = PromptSource("chain:tiny")
    tok = load_tokenizer(str(t))
    prompts = encode_prompts(tok, [e.prompt for e in source.train_batch(0, 4, 0, start=0)])
    answers = sample(load_model(str(t)).eval(), prompts, source.default_budget(),
                    eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                    row_seeds=row_seeds(0, 0, range(4)))
    student = load_model(str(s)).eval()
    with torch.no_grad():
        logits = response_logits(student, answers.ids_B_T, answers.attn_B_T, answers.prompt_len)
        logp = token_logprobs(logits, answers.response_ids_B_R)
    nll = -(logp * answers.response_mask_B_R).sum() / answers.response_mask_B_R.sum()
    assert rec["loss"] == pytest.approx(float(nll), rel=1e-4)


def test_sampling_ahead_gives_the_sft_run_of_one_step_at_a_time(tmp_path, micro_pair,
                                                                 monkeypatch):
    """sampling.ahead=3: the teacher's answers for steps 1-3, then step 4, are decoded in two
    batches instead of four, and every step trains on the same answers (same losses), under a
    progressive horizon whose H changes within a plan."""
    import pytest

    from hopd.progress import read_metrics
    from hopd.rollout import HFSampler

    calls = []
    real = HFSampler.sample
    monkeypatch.setattr(HFSampler, "sample",
                        lambda self, p, h, **k: calls.append((len(p), h)) or real(self, p, h, **k))
    s, t = micro_pair
    losses = {}
    for ahead in (1, 3):
        calls.clear()
        run = tmp_path / f"ahead{ahead}"
        assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                     "data=chain:tiny", "max_steps=4", "batch_size=4", "eval_n=4",
                     "eval_every=0", "diag_every=0", "threads=1", "loss.kind=sft",
                     "horizon.kind=progressive", "horizon.start=0.5", "horizon.reach_at=0.5",
                     "horizon.shape=step", "horizon.increments=1",
                     f"sampling.ahead={ahead}"]) == 0
        losses[ahead] = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        horizons = [r["horizon"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        assert len(set(horizons)) == 2  # H grows within the first plan
        # ahead=3: step 1 (H=25) alone, steps 2-3 (H=50) together, then step 4
        assert calls == ([(4, 25)] + [(4, 50)] * 3 if ahead == 1 else
                         [(4, 25), (8, 50), (4, 50)])
    assert losses[3] == pytest.approx(losses[1], rel=1e-5)


def test_supervised_kd_takes_the_forward_kl_on_the_teachers_answers(tmp_path, micro_pair):
    """loss.rollouts=teacher with loss.kind=fkl (supervised KD): the first step's loss is the
    forward KL(t || s) per token, over the whole vocabulary, at the teacher's own answers drawn
    with the run's per-row seeds, computed here in float64 from the two models."""
    import pytest
    import torch

    from hopd.models import load_model, load_tokenizer, response_logits
    from hopd.progress import read_metrics
    from hopd.rollout import row_seeds, sample
    from hopd.tasks import PromptSource, encode_prompts

    s, t = micro_pair
    run = tmp_path / "kd"
    assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "max_steps=1", "batch_size=4", "eval_n=4", "eval_every=0",
                 "diag_every=0", "threads=1", "loss.kind=fkl", "loss.rollouts=teacher"]) == 0
    (rec,) = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    source = PromptSource("chain:tiny")
    tok = load_tokenizer(str(t))
    prompts = encode_prompts(tok, [e.prompt for e in source.train_batch(0, 4, 0, start=0)])
    teacher = load_model(str(t)).eval()
    answers = sample(teacher, prompts, source.default_budget(), eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id, row_seeds=row_seeds(0, 0, range(4)))
    with torch.no_grad():
        lp = [response_logits(m.double(), answers.ids_B_T, answers.attn_B_T, answers.prompt_len,
                              len(tok)).log_softmax(-1)
              for m in (load_model(str(s)).eval(), teacher)]
    s_lp, t_lp = lp
    kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    mask = answers.response_mask_B_R.double()
    assert rec["loss"] == pytest.approx(float((kl * mask).sum() / mask.sum()), rel=1e-4)
    # the student's own answers give another loss (the random pair's KL is small, so the
    # margin is relative): the rollouts really were the teacher's
    on_policy = tmp_path / "fkl"
    assert main(["distill", "--out", str(on_policy), "--quiet", f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "max_steps=1", "batch_size=4", "eval_n=4", "eval_every=0",
                 "diag_every=0", "threads=1", "loss.kind=fkl"]) == 0
    (own,) = [r for r in read_metrics(on_policy / "metrics.jsonl") if "loss" in r]
    assert own["loss"] != pytest.approx(rec["loss"], rel=1e-3)
    # `hopd compare --strategies kd` is this setting
    assert main(["compare", "--out", str(tmp_path / "cmp"), "--strategies", "kd", "--steps", "1",
                 f"student={s}", f"teacher={t}", "data=chain:tiny", "batch_size=4", "eval_n=4",
                 "eval_every=0", "diag_every=0", "threads=1", "--quiet"]) == 0
    (kd,) = [r for r in read_metrics(tmp_path / "cmp" / "kd" / "seed0" / "metrics.jsonl")
             if "loss" in r]
    assert kd["loss"] == pytest.approx(rec["loss"], rel=1e-6)


def test_compare_jobs_runs_in_parallel_with_the_numbers_of_a_serial_run(tmp_path, micro_pair,
                                                                         capsys):
    """`--jobs 2` runs the plan two at a time in fresh processes: every run folder is complete,
    each run's log has its own file, and the numbers are those of the same runs one by one."""
    from hopd.progress import read_metrics

    s, t = micro_pair
    common = ["--strategies", "opd,topd10", "--steps", "2", f"student={s}", f"teacher={t}",
              "data=chain:tiny", "batch_size=2", "eval_n=2", "eval_every=0", "diag_every=0",
              "threads=1", "--quiet"]
    assert main(["compare", "--out", str(tmp_path / "serial"), *common]) == 0
    assert main(["compare", "--out", str(tmp_path / "par"), "--jobs", "2", *common]) == 0
    out = capsys.readouterr().out
    assert "2 runs, 2 at a time" in out and out.count("done after") == 2
    for name in ("opd", "topd10"):
        a, b = (read_metrics(tmp_path / d / name / "seed0" / "metrics.jsonl")
                for d in ("serial", "par"))
        assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
        assert (tmp_path / "par" / "logs" / f"{name}_seed0.log").stat().st_size > 0
    assert (tmp_path / "par" / "summary.json").exists()
    assert main(["compare", "--out", str(tmp_path / "bad"), "--jobs", "0", *common]) == 2
    assert "--jobs 0" in capsys.readouterr().err


def test_log_to_tensorboard_writes_the_loss_and_horizon_of_every_step(tmp_path, micro_pair):
    """metrics.jsonl stays the source of truth; TensorBoard gets the same records under TRL's
    names, read back here from the event files."""
    import pytest

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hopd.progress import read_metrics

    s, t = micro_pair
    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "max_steps=3", "batch_size=2", "eval_n=2", "eval_every=3",
                 "diag_every=3", "diag_n=2", "threads=1", "horizon.kind=progressive",
                 "horizon.shape=linear", "log_to=tensorboard"]) == 0
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    horizon = {e.step: e.value for e in events.Scalars("train/horizon")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in train})
    assert horizon == {r["step"]: r["horizon"] for r in train} and len(horizon) == 3
    assert {"train/learning_rate", "eval/accuracy"} <= set(tags["scalars"])
    assert "diag/rkl_by_position" in tags["histograms"]


def test_log_to_an_unknown_or_missing_tracker_fails_before_any_work(tmp_path, micro_pair,
                                                                     capsys, monkeypatch):
    import importlib.util

    s, t = micro_pair
    args = ["distill", "--out", str(tmp_path / "run"), f"student={s}", f"teacher={t}"]
    assert main([*args, "log_to=tensorbored"]) == 2
    assert "unknown tracker 'tensorbored'" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main([*args, "log_to=wandb"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _wandb_records(path):
    """The protobuf records of a W&B run file (its LevelDB-style log: 32 KiB blocks, 7-byte
    record headers), so a test can read an offline run back without the network."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_log_to_wandb_offline_keeps_the_config_and_every_step(tmp_path, micro_pair,
                                                              monkeypatch):
    import json

    import pytest

    pytest.importorskip("wandb")
    from hopd.progress import read_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    s, t = micro_pair
    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "max_steps=2", "batch_size=2", "eval_n=2", "eval_every=0",
                 "diag_every=0", "threads=1", "optim.lr=3e-3", "log_to=wandb"]) == 0
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = list(_wandb_records(path))
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    steps = [h for h in history if "train/loss" in h]
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [h["_step"] for h in steps] == [1, 2]
    assert [h["train/loss"] for h in steps] == pytest.approx([r["loss"] for r in train])
    assert [h["train/horizon"] for h in steps] == [r["horizon"] for r in train]
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
              for i in header.config.update}
    assert config["optim"]["lr"] == 3e-3 and config["max_steps"] == 2  # the resolved config


def test_tracker_names_and_an_empty_position_bucket_keeps_its_place():
    from hopd.trackers import scalars

    values, hists = scalars({"step": 3, "loss": 0.5, "lr": 1e-4, "eval_accuracy": 0.25,
                             "horizon": 16, "diag_rkl_by_pos": [0.5, float("nan"), 0.2],
                             "probe_teacher_acc_by_cut": {"0.5": 0.75}})
    assert values == {"train/loss": 0.5, "train/learning_rate": 1e-4, "eval/accuracy": 0.25,
                      "train/horizon": 16.0, "probe/teacher_acc_from_0.5": 0.75}
    assert hists == {"diag/rkl_by_position": [0.5, 0.0, 0.2]}  # bucket 2 stays bucket 2


@pytest.mark.parametrize("args, words", [
    (["distill", "--out", "{tmp}/r", "optim.lrr=3e-4"], "did you mean 'optim.lr'"),
    (["distill", "--out", "{tmp}/r", "data={tmp}/missing.jsonl"], "no such file"),
    (["distill", "--out", "{tmp}/r", "optim.lr=-1"], "optim.lr=-1.0"),
    (["distill", "--out", "{tmp}/r", "student=Qwen/Qwen2.5-0.5B-Instruct"], "never downloads"),
])
def test_config_mistakes_are_reported_before_torch_loads(tmp_path, args, words):
    """The real command in a fresh interpreter: the config and paths are checked before torch
    or transformers is imported, which is what makes the answer fast (0.4-0.5 s against 12-22 s
    on two busy cores). Asserted on the imports, not on a time a busy machine could stretch."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = ("import sys; from hopd.cli import main; rc = main(sys.argv[1:]); "
            "print('loaded:', sorted(m for m in ('torch', 'transformers') if m in sys.modules)); "
            "sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert p.returncode == 2 and words in p.stderr, p.stderr
    assert "loaded: []" in p.stdout, p.stdout
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, words", [
    ("max_steps: 3\n\tbatch_size: 4\n", "line 2, column 1: a tab character"),
    ("max_steps: 3\ndata: \"abc\nbatch_size: 4\n",
     "line 2, column 7: a quote that is never closed"),
])
def test_a_yaml_error_names_the_line_the_column_and_the_reason(tmp_path, capsys, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["distill", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert words in err and "bad.yaml" in err and len(err.strip().splitlines()) == 1


def test_the_demo_says_what_it_will_do_and_how_long_it_will_take(monkeypatch, capsys):
    from hopd import demo

    monkeypatch.setattr(demo, "calibrate", lambda settings: (0.5, 4.0))  # a fast machine
    demo.announce(demo.DEMO, quick=False, regime="spread")
    out = capsys.readouterr()
    # 4 strategies x 60 steps at their horizon shares, plus 7 evaluations each
    want = demo.estimate_s(demo.DEMO, 0.5, 4.0) / 60
    assert f"about {want:.0f} min on this machine" in out.out and "--quick" not in out.err
    assert demo.estimate_s(demo.DEMO, 1.0, 0.0) == pytest.approx(
        60 * (4 * 0.2 + 0.8 * (1 + 0.6 + 0.1 + 0.25)))
    monkeypatch.setattr(demo, "calibrate", lambda settings: (12.0, 60.0))  # a busy one
    demo.announce(demo.DEMO, quick=False, regime="spread")
    assert "hopd demo --quick` takes about" in capsys.readouterr().err


def test_the_demo_calibration_measures_this_machine(tmp_path, monkeypatch):
    from hopd import demo

    step_s, eval_s = demo.calibrate([*demo.QUICK, "device=cpu", "student=testbed:student",
                                     "eval_n=8", "batch_size=4"])
    assert 0 < step_s < 60 and 0 < eval_s < 60


def test_a_token_budget_bar_counts_the_steps_it_will_take():
    """`--tokens 100000` used to show 1/100000 with an ETA of weeks: the bar's total is the
    estimate from the tokens each step spent so far (and max_steps when that comes first)."""
    from hopd.distill import estimated_steps
    from hopd.distill_config import DistillConfig

    cfg = DistillConfig(max_steps=100_000, max_tokens=100_000)
    assert estimated_steps(1, 1, {"sampled_tokens": 5_000, "train_time_s": 1.0}, cfg) == 20
    assert estimated_steps(4, 4, {"sampled_tokens": 40_000, "train_time_s": 4.0}, cfg) == 10
    timed = DistillConfig(max_steps=30, max_time_s=600.0)
    assert estimated_steps(2, 2, {"sampled_tokens": 10, "train_time_s": 10.0}, timed) == 30
    assert estimated_steps(0, 0, {"sampled_tokens": 0, "train_time_s": 0.0}, cfg) == 100_000
