"""Bad input fails fast and clearly; runs survive kills; resume is exact."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hopd import config as C
from hopd.cli import main
from hopd.distill import DistillConfig
from hopd.models import save_checkpoint, tiny_llama
from hopd.progress import read_metrics
from hopd.tasks.jsonl import DataError, load_rows

TINY = ["data=chain:tiny", "batch_size=4", "eval_n=4", "diag_every=0"]


def _jsonl(tmp: Path, name: str, content: bytes | str) -> str:
    p = tmp / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


def _bad_cases(tmp: Path, pair: tuple[Path, Path], other_tok_model: Path) -> list:
    s, t = pair
    good = [f"student={s}", f"teacher={t}", *TINY]
    yaml_missing = str(tmp / "nope.yaml")
    yaml_bad = _jsonl(tmp, "bad.yaml", "horizon: [1, 2\n")
    yaml_list = _jsonl(tmp, "list.yaml", "- a\n- b\n")
    ok_row = '{"prompt": "a=1+1;", "answer": "2"}\n'
    D = ["distill", "--out", str(tmp / "run")]
    return [
        # configs and overrides
        (D + good + ["max_step=3"], "did you mean 'max_steps'"),
        (D + good + ["horizon.knd=full"], "did you mean 'horizon.kind'"),
        (D + good + ["optim.lrr=1"], "did you mean 'optim.lr'"),
        (D + good + ["batch_size=abc"], "batch_size='abc': expected an integer"),
        (D + good + ["optim.lr=fast"], "optim.lr='fast': expected a number"),
        (D + good + ["horizon=3"], "horizon: expected a mapping"),
        (D + good + ["max_steps"], "write it as key=value"),
        (D + good + ["horizon.kind=sometimes"], "horizon.kind='sometimes'"),
        (D + good + ["horizon.kind=truncated", "horizon.fraction=0"], "horizon.fraction=0"),
        (D + good + ["horizon.fraction=1.5"], "horizon.fraction=1.5"),
        (D + good + ["horizon.reach_at=0"], "horizon.reach_at=0"),
        (D + good + ["horizon.tokens=500"], "exceeds the response budget"),
        (D + good + ["horizon.start_tokens=500"], "H0 <= L"),
        (D + good + ["horizon.shape=zigzag"], "horizon.shape='zigzag'"),
        (D + good + ["max_steps=0"], "max_steps=0"),
        (D + good + ["parallel=zero3"], "parallel='zero3': expected 'ddp' or 'fsdp'"),
        (D + good + ["parallel=fsdp", "lora.rank=8"], "use parallel=ddp"),
        (D + good + ["batch_size=0"], "batch_size=0"),
        (D + good + ["grad_accum=8"], "exceeds batch_size"),
        (D + good + ["loss.kind=l2"], "loss.kind='l2'"),
        (D + good + ["loss.beta=2"], "loss.beta=2"),
        (D + good + ["loss.rollouts=both"], "loss.rollouts='both'"),
        (D + good + ["loss.rollouts=teacher"], "cannot use the teacher's"),
        (D + good + ["sampling.temperature=0"], "sampling.temperature=0"),
        (D + good + ["sampling.top_p=0"], "sampling.top_p=0"),
        (D + good + ["optim.lr=-1"], "optim.lr=-1"),
        (D + good + ["dtype=float8"], "dtype='float8'"),
        (D + good + ["device=cuda:0"] if not torch.cuda.is_available() else D + good + [
            "device=tpu"], "device="),
        (D + good + ["eval_every=-1"], "eval_every=-1"),
        (["distill", yaml_missing, "--out", str(tmp / "run")], "not found"),
        (["distill", yaml_bad, "--out", str(tmp / "run")], "not valid YAML"),
        (["distill", yaml_list, "--out", str(tmp / "run")], "must be a mapping"),
        # data
        (D + good + [f"data={tmp / 'missing.jsonl'}"], "no such file"),
        (D + good + ["data=" + _jsonl(tmp, "j1.jsonl", ok_row + '{"prompt": "x",\n')],
         "j1.jsonl:2: invalid JSON"),
        (D + good + ["data=" + _jsonl(tmp, "j2.jsonl", ok_row.encode() + b'{"prompt": "\xff"}\n')],
         "j2.jsonl:2: not valid UTF-8"),
        (D + good + ["data=" + _jsonl(tmp, "j3.jsonl", "\n\n")], "has no rows"),
        (D + good + ["data=" + _jsonl(tmp, "j4.jsonl", ok_row + '{"prompt": "b=2;"}\n')],
         "j4.jsonl:2: missing field 'answer'"),
        (D + good + ["data=" + _jsonl(tmp, "j5.jsonl", ok_row + '{"prompt": " ", "answer": 1}\n')],
         "j5.jsonl:2: field 'prompt' is empty"),
        (D + good + ["data=" + _jsonl(tmp, "j6.jsonl", ok_row + '{"prompt": 7, "answer": 1}\n')],
         "j6.jsonl:2: field 'prompt' must be a string"),
        (D + good + ["data=" + _jsonl(tmp, "j7.jsonl", ok_row + '[1, 2]\n')],
         "j7.jsonl:2: expected a JSON object"),
        (D + good + ["data=" + _jsonl(tmp, "j8.jsonl", '{"messages": [{"role": "user"}], '
                                                       '"answer": "1"}\n')],
         "j8.jsonl:1: 'messages[0]' must be an object with string 'role' and 'content'"),
        (D + good + ["data=" + _jsonl(tmp, "j9.jsonl", '{"text": "hi", "answer": "1"}\n')],
         "j9.jsonl:1: no prompt field"),
        # models and tokenizers
        (D + [f"student={tmp / 'nowhere'}", f"teacher={t}", *TINY], "is none of a bundled name"),
        (D + [f"student={tmp}", f"teacher={t}", *TINY], "has no config.json"),
        (D + [f"student={s}", f"teacher={other_tok_model}", *TINY], "do not share a tokenizer"),
        (D + good + ["budget=5000"], "exceed the student's context"),
        # other commands
        (["eval", "--model", str(s), "--n", "0"], "--n 0: must be >= 1"),
        (["eval", "--model", "testbed:nope"], "unknown bundled model"),
        (["compare", "--out", str(tmp / "cmp"), "--seeds", "x"], "--seeds 'x'"),
        (["compare", "--out", str(tmp / "cmp"), "--strategies", "opd,fast"], "unknown strategy"),
        (["compare", "--out", str(tmp / "cmp"), "--steps", "3", "--tokens", "9"],
         "give one budget"),
        (["sft", "--out", str(tmp / "sft"), "model=size:huge"], "unknown size"),
        (["sft", "--out", str(tmp / "sft"), "task=data.jsonl"], "SFT needs reference solutions"),
        # values that used to crash or pass silently
        (D + good + ["optim.lr=inf"], "optim.lr=inf: must be a finite number"),
        (D + good + ["optim.lr=1e39"], "optim.lr=1e+39 is far too large"),
        (D + good + ["threads=-1"], "threads=-1: must be >= 0"),
        (D + good + ["loss.kind=rkl", "loss.top_k=1000"], "loss.top_k=1000 exceeds the vocab"),
        (D + good + ["teacher_retries=-1"], "teacher_retries=-1: must be >= 0"),
        (D + good + ["teacher_timeout_s=-1"], "teacher_timeout_s=-1.0: must be a number"),
        (D + good + ["optim.weight_decay=-1"], "optim.weight_decay=-1.0: must be >= 0"),
        (D + good + ["sampling.temperature=inf"], "sampling.temperature=inf: must be finite"),
        (D + good + ["stray"], "override 'stray': write it as key=value"),
        (["distill", "--out", _jsonl(tmp, "afile.txt", "x"), *good], "is a file, not a folder"),
        (["distill", _jsonl(tmp, "dup.yaml", "max_steps: 2\nmax_steps: 3\n"), "--out",
          str(tmp / "run")], "key 'max_steps' is given twice (line 2)"),
        (["eval", "--model", str(s), "--out", str(tmp)], "is a folder: give a file name"),
        (["eval", "--model", str(s), "--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["eval", "--model", str(s), "--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    ] + ([] if torch.cuda.is_available() else [  # a GPU asked for where there is none
        (["demo", "--quick", "--out", str(tmp / "demo"), "--device", "cuda"],
         "CUDA is not available here"),
        (["eval", "--model", str(s), "--device", "cuda"], "CUDA is not available here"),
    ])


@pytest.fixture(scope="module")
def other_tok_model(tmp_path_factory):
    """A checkpoint whose tokenizer maps ids differently from the testbed's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abc=+;\n0123456789")
    vocab = {c: i for i, c in enumerate(["<unk>", "<pad>", "<eos>", "<bos>", *chars])}
    core = Tokenizer(models.WordLevel(vocab, "<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<eos>", bos_token="<bos>")
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path_factory.mktemp("other")
    save_checkpoint(tiny_llama("micro", tok), tok, path)
    return path


def test_at_least_30_bad_inputs_fail_fast_and_clearly(tmp_path, micro_pair, other_tok_model,
                                                       capsys):
    run = tmp_path / "run"
    cases = _bad_cases(tmp_path, micro_pair, other_tok_model)
    assert len(cases) >= 30
    for args, needle in cases:
        t0 = time.perf_counter()
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert needle in err, (args, err)
        assert "Traceback" not in err and err.count("\n") == 1, err  # one line
        assert time.perf_counter() - t0 < 20, args  # before any training
        assert not (run / "metrics.jsonl").exists(), args  # nothing started


def test_existing_run_is_never_overwritten(tmp_path, micro_pair, capsys):
    s, t = micro_pair
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert main(["distill", "--out", str(run), f"student={s}", f"teacher={t}", *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def _run_args(run: Path, pair, steps: int, extra=()) -> list[str]:
    s, t = pair
    return ["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}", *TINY,
            f"max_steps={steps}", "eval_every=2", "save_every=1", "keep_last=2",
            "horizon.kind=progressive", "horizon.shape=linear", "optim.lr=3e-3", "threads=1",
            *extra]


def _deterministic(lines):
    keys = ("step", "horizon", "loss", "eval_accuracy", "sampled_tokens", "grad_norm")
    return [{k: r[k] for k in keys if k in r} for r in lines]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, micro_pair):
    steps = 6
    ref = tmp_path / "ref"
    assert main(_run_args(ref, micro_pair, steps)) == 0
    # the same run in a subprocess, killed hard once step 3 has been logged
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hopd", *_run_args(run, micro_pair, steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = read_metrics(run / "metrics.jsonl")
        if any(r.get("step") == 3 and "loss" in r for r in lines):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists()  # it really died part-way
    written = read_metrics(run / "metrics.jsonl")
    assert main(["distill", "--resume", *_run_args(run, micro_pair, steps)[1:]]) == 0
    resumed = read_metrics(run / "metrics.jsonl")
    assert _deterministic(resumed) == _deterministic(read_metrics(ref / "metrics.jsonl"))
    # nothing that was written before the kill is lost (it is still there, unchanged)
    upto = max(r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r)
    assert upto == steps and len(written) >= 3


def test_sigterm_finishes_the_step_and_saves(tmp_path, micro_pair):
    run = tmp_path / "term"
    cmd = [sys.executable, "-m", "hopd", *_run_args(run, micro_pair, 200,
                                                   ["save_every=0", "eval_every=0"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            "loss" in r for r in read_metrics(run / "metrics.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err  # the conventional status
    result = json.loads((run / "result.json").read_text())
    assert result["stopped_by_signal"] and result["steps"] < 200
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and ckpts[-1].name == f"step_{result['steps']:07d}"
    # saved at once: no evaluation ran after the signal (eval_every=0 would evaluate at the end)
    evals = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "eval_accuracy" in r]
    assert evals == [0]
    # the run goes on from there
    assert main(["distill", "--resume", *_run_args(run, micro_pair, result["steps"] + 1,
                                                   ["save_every=0", "eval_every=0"])[1:]]) == 0


def test_corrupt_checkpoint_gives_a_clear_error_and_keeps_metrics(tmp_path, micro_pair, capsys):
    run = tmp_path / "run"
    assert main(_run_args(run, micro_pair, 2)) == 0
    before = (run / "metrics.jsonl").read_text()
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    (last / "trainer_state.pt").write_bytes(b"\x80\x02not a checkpoint")
    assert main(["distill", "--resume", *_run_args(run, micro_pair, 4)[1:]]) == 2
    assert "is corrupt or incomplete" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated weights
    assert main(["eval", "--model", str(last), "--task", "chain:tiny", "--n", "2"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_non_finite_steps_are_skipped_then_stop(tmp_path, micro_pair, monkeypatch, capsys):
    import hopd.step as D

    real = D.learn
    calls = {"n": 0}

    def flaky(student, rollout, scores, loss_cfg, **kw):
        calls["n"] += 1
        out = real(student, rollout, scores, loss_cfg, **kw)
        if calls["n"] >= 2:  # from the second step on: NaN gradients
            for p in student.parameters():
                p.grad.fill_(math.nan)
            out["loss"] = math.nan
        return out

    monkeypatch.setattr(D, "learn", flaky)
    run = tmp_path / "nan"
    rc = main(_run_args(run, micro_pair, 10, ["max_bad_steps=3"]))
    assert rc == 3
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().err
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["skipped"] for r in train] == [False, True, True, True]
    assert train[-1]["skipped_steps"] == 3
    # the weights never took a NaN step: the last checkpoint is finite
    from hopd.models import load_model

    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert all(torch.isfinite(p).all() for p in load_model(str(last)).parameters())


# ---------------------------------------------------------------------------------------------
# Property-based tests

_key = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)
_scalar = st.one_of(st.integers(-10**6, 10**6), st.booleans(),
                    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.lists(_key, min_size=1, max_size=3).map(".".join), _scalar,
                       max_size=5))
@example({"a": "no"})  # YAML 1.1 would read it as False (found by hypothesis in CI)
@example({"a.b": "on", "c": True, "d": "yes"})
def test_override_parser_round_trips(pairs):
    # keys that are prefixes of other keys would make a value and a section collide
    keys = sorted(pairs)
    if any(b.startswith(a + ".") for a in keys for b in keys):
        return
    items = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in pairs.items()]
    parsed = C.parse_overrides(items)
    for k, v in pairs.items():
        node = parsed
        for part in k.split("."):
            node = node[part]
        assert node == v


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=20))
def test_override_parser_never_crashes_unexpectedly(text):
    try:
        C.parse_overrides([text])
    except C.ConfigError:
        pass


@settings(max_examples=40, deadline=None)
@given(st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True))
def test_config_accepts_only_valid_values(steps, frac):
    try:
        cfg = C.from_dict(DistillConfig, {"max_steps": steps,
                                          "horizon": {"kind": "truncated", "fraction": frac}})
        cfg.validate()
    except C.ConfigError:
        assert steps < 1 or not (0 < frac <= 1)
    else:
        assert steps >= 1 and 0 < frac <= 1


_answer = st.text(min_size=1, max_size=8).filter(lambda s: s.strip() and "####" not in s)
_row = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=30).filter(str.strip),
                              "answer": st.one_of(st.integers(), _answer)})


@settings(max_examples=40, deadline=None)
@given(st.lists(_row, min_size=1, max_size=8))
def test_jsonl_loader_reads_what_was_written(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("j") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got = load_rows(path)
    assert [p for p, _ in got] == [r["prompt"] for r in rows]
    assert [a for _, a in got] == [str(r["answer"]).strip() for r in rows]


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=60))
def test_jsonl_loader_rejects_garbage_cleanly(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("g") / "g.jsonl"
    path.write_bytes(blob)
    try:
        load_rows(path)
    except DataError as e:
        assert str(path) in str(e)


def test_a_second_signal_never_corrupts_the_run(tmp_path, micro_pair):
    run = tmp_path / "twice"
    cmd = [sys.executable, "-m", "hopd", *_run_args(run, micro_pair, 200, ["eval_every=0"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            r.get("step", 0) >= 2 for r in read_metrics(run / "metrics.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # 143: saved, then exited; 130: the second signal cut a step (not a save); -15: it came
    # once the save was done and the handlers were restored
    assert proc.returncode in (130, 143, -signal.SIGTERM), err
    assert not list((run / "checkpoints").glob(".tmp*"))  # no half-written checkpoint...
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines)  # ...and no torn metrics line
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    steps = int(last.name[5:]) + 1
    assert main(["distill", "--resume", *_run_args(run, micro_pair, steps, ["eval_every=0"])[1:]
                 ]) == 0  # every checkpoint left behind loads and the run goes on


def _parallel_compare(out: Path, pair, seeds: str) -> list[str]:
    """`hopd compare --jobs 2` of long OPD runs (400 steps) on the micro pair, one per seed."""
    s, t = pair
    return [sys.executable, "-m", "hopd", "compare", "--out", str(out), "--jobs", "2",
            "--strategies", "opd", "--seeds", seeds, "--steps", "400", "--quiet",
            f"student={s}", f"teacher={t}", "data=chain:tiny", "batch_size=2", "eval_n=2",
            "eval_every=0", "diag_every=0", "save_every=0", "threads=1"]


def test_a_signal_to_a_parallel_compare_saves_the_running_runs_and_starts_no_more(
        tmp_path, micro_pair):
    """`hopd compare --jobs 2` killed with SIGTERM: the signal is forwarded once to the running
    runs, which save and stop; the third run never starts; the exit status is 143."""
    out = tmp_path / "cmp"
    cmd = _parallel_compare(out, micro_pair, "0,1,2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = [out / "opd" / f"seed{k}" for k in range(3)]
    deadline = time.time() + 120
    while time.time() < deadline and not all(
            any("loss" in r for r in read_metrics(run / "metrics.jsonl")) for run in runs[:2]):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log
    for run in runs[:2]:
        result = json.loads((run / "result.json").read_text())
        assert result["stopped_by_signal"] and result["steps"] < 400
        assert (run / "checkpoints" / f"step_{result['steps']:07d}").is_dir()
    assert not runs[2].exists()
    # --resume continues the two stopped runs (they are not finished) and runs the third
    again = [*cmd[3:], "--resume"]
    again[again.index("--steps") + 1] = "3"  # a smaller budget: the stopped ones are done
    assert main(again) == 0
    for run in runs:
        result = json.loads((run / "result.json").read_text())
        assert not result["stopped_by_signal"] and (run / "model" / "config.json").is_file()
    assert (out / "report.md").is_file()


def _children(pid: int) -> list[int]:
    """The compare's worker processes: children of `pid` started by multiprocessing's spawn
    (not its resource tracker), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_one_stopped_worker_fails_the_compare_and_workers_die_with_their_parent(tmp_path,
                                                                               micro_pair):
    out = tmp_path / "cmp"
    cmd = _parallel_compare(out, micro_pair, "0,1")
    runs = [out / "opd" / f"seed{k}" for k in range(2)]

    def started(proc):
        deadline = time.time() + 120
        while time.time() < deadline and not all(
                any("loss" in r for r in read_metrics(run / "metrics.jsonl")) for run in runs):
            time.sleep(0.1)
        while time.time() < deadline and len(_children(proc.pid)) < 2:  # both workers up
            time.sleep(0.1)
        return _children(proc.pid)

    # SIGTERM to one worker: the compare is not finished, says which run stopped, no report
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = started(proc)
    assert workers
    os.kill(workers[0], signal.SIGTERM)  # the other run goes on to its end
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM and not (out / "report.md").exists(), log
    assert "stopped early by a signal: opd, seed" in log
    # kill -9 of the parent: its workers do not outlive it
    out, runs = tmp_path / "cmp2", [tmp_path / "cmp2" / "opd" / f"seed{k}" for k in range(2)]
    cmd[cmd.index("--out") + 1] = str(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = started(proc)
    assert workers
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_worker_is_one_line_naming_what_each_run_kept(tmp_path, micro_pair):
    """kill -9 of one worker (what the OOM killer does): Python's pool then stops the other
    worker too (SIGTERM, so that run saves). The compare exits 3 with one line that names both
    runs and what each one kept, writes no report, and --resume finishes both."""
    out = tmp_path / "cmp"
    cmd = _parallel_compare(out, micro_pair, "0,1")
    runs = [out / "opd" / f"seed{k}" for k in range(2)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (all(
            any("loss" in r for r in read_metrics(run / "metrics.jsonl")) for run in runs)
            and len(_children(proc.pid)) >= 2):
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3 and "Traceback" not in log, log
    line = next(x for x in log.splitlines() if "a worker process died" in x)
    assert "run 1/2 (opd, seed 0)" in line and "run 2/2 (opd, seed 1)" in line
    assert line.count("killed; no checkpoint was written yet") == 1, line
    assert line.count("stopped and saved at step") == 1, line
    assert "--resume" in line and not (out / "report.md").exists()
    for run in runs:  # every metrics line written is whole
        assert all(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())
    again = [*cmd[3:], "--resume"]
    again[again.index("--steps") + 1] = "3"
    assert main(again) == 0 and (out / "report.md").is_file()


@pytest.mark.slow
def test_a_worker_that_fills_the_disk_is_one_line(tmp_path, micro_pair):
    """A full disk inside a parallel worker (torch's writer fails as it does when the disk
    fills, through a sitecustomize that every process of the compare imports): exit 3, one line
    naming the run, its log and what is intact, no traceback, no report, metrics kept."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import torch\n"
        "def _full(*a, **k):\n"
        "    raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 64"
        " vs 0')\n"
        "torch.save = _full\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = tmp_path / "cmp"
    cmd = _parallel_compare(out, micro_pair, "0,1")
    cmd[cmd.index("--steps") + 1] = "2"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "failed: no space left" in err and "its output is in" in err and "seed" in err, err
    assert not (out / "report.md").exists()
    for k in range(2):
        lines = (out / "opd" / f"seed{k}" / "metrics.jsonl").read_text().splitlines()
        assert sum("loss" in json.loads(x) for x in lines) == 2


def test_resume_run_alone_continues_with_the_runs_own_config(tmp_path, micro_pair, capsys):
    """`hopd distill --resume RUN`, no config and no overrides: the run's config.yaml is used,
    and the continued run equals one that was never stopped."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    same = ["horizon.kind=full", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0"]  # nothing
    # that depends on max_steps, so 2 steps then 2 more equal 4 steps
    assert main(_run_args(ref, micro_pair, 4, same)) == 0
    assert main(_run_args(run, micro_pair, 2, same)) == 0  # the same run, stopped after 2
    cfg = (run / "config.yaml").read_text().replace("max_steps: 2", "max_steps: 4")
    (run / "config.yaml").write_text(cfg)  # the user raises the budget in the run's own file
    assert main(["distill", "--resume", str(run), "--quiet"]) == 0
    assert _deterministic(read_metrics(run / "metrics.jsonl")) == \
        _deterministic(read_metrics(ref / "metrics.jsonl"))
    # a folder that does not exist is an error, not a new run
    capsys.readouterr()
    assert main(["distill", "--resume", str(tmp_path / "nowhere")]) == 2
    assert main(["distill", "--out", str(tmp_path / "nowhere"), "--resume",
                 f"student={micro_pair[0]}"]) == 2
    assert "no run" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_a_32_row_jsonl_file_trains_and_evaluates_with_no_new_flags(tmp_path, micro_pair, capsys):
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": f"#### {2 * i + 1}"}
            for i in range(32)]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s, t = micro_pair
    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                 f"data={data}", "budget=8", "batch_size=4", "max_steps=2", "eval_every=0",
                 "diag_every=0", "val_n=4", "eval_kl_n=2"]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 2 and "final_val_accuracy" in result
    err = capsys.readouterr().err
    assert err.count("evaluating on all of them") <= 2  # said once per half, not per evaluation


def test_bounded_parsing_refuses_bombs_and_deep_nesting_and_accepts_merge_keys(tmp_path, capsys):
    from hopd.config import ConfigError, read_yaml
    from hopd.distill_config import load_config
    from hopd.tasks import jsonl

    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for name, prev in zip("bcde", "abcd"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nsystem_prompt: [" + ",".join(["*e"] * 9) + "]\n")
    t0 = time.perf_counter()
    assert main(["distill", str(bomb), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "aliases" in err and len(err) < 500 and time.perf_counter() - t0 < 5
    deep = tmp_path / "deep.yaml"
    deep.write_text("system_prompt: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(ConfigError, match="nested"):
        read_yaml(deep)
    assert main(["distill", "--out", str(tmp_path / "r"), "system_prompt=" + "[" * 5000]) == 2
    rows = tmp_path / "deep.jsonl"
    rows.write_text('{"prompt": "hi", "answer": "1", "x": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        jsonl.load_rows(rows)
    # valid input that was refused: merge keys, and U+2028 inside a JSON string
    merged = tmp_path / "merge.yaml"
    merged.write_text("optim:\n  <<: &base {lr: 2.0e-4, warmup_steps: 3}\n  warmup_steps: 1\n")
    cfg = load_config(str(merged), [])
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (2e-4, 1)  # the explicit key wins
    text = tmp_path / "u2028.jsonl"
    text.write_text("".join(json.dumps({"question": f"a\u2028b {i}?", "answer": str(i)},
                                       ensure_ascii=False) + "\n" for i in range(3)))
    assert [a for _, a in jsonl.load_rows(text)] == ["0", "1", "2"]


@pytest.mark.parametrize("argv, words", [
    (["eval", "--model", "testbed:student", "--n", "2", "--samples", "2", "--temperature", "0"],
     "--temperature 0.0"),
    (["eval", "--model", "testbed:student", "--n", "2", "--budget", "-5"], "--budget -5"),
    (["distill", "--out", "{tmp}/r", "lora.rank=4", "lora.dropout=5"], "lora.dropout=5.0"),
    (["distill", "--out", "{tmp}/r", "log_to=wandb"], "wandb login"),
])
def test_former_tracebacks_are_one_line(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_a_lora_change_cannot_be_forced_on_resume(tmp_path, micro_pair, capsys):
    run = tmp_path / "run"
    args = ["distill", "--out", str(run), "--quiet", *_run_args(run, micro_pair, 1)[4:]]
    assert main(args) == 0
    assert main([*args, "--resume", "--force-config", "lora.rank=4", "max_steps=2"]) == 2
    assert "even with --force-config" in capsys.readouterr().err


def test_a_run_folder_that_becomes_unwritable_is_one_line(tmp_path, micro_pair, capsys,
                                                           monkeypatch):
    from hopd import context

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(context, "save_checkpoint", denied)
    rc = main(_run_args(tmp_path / "run", micro_pair, 2))
    err = capsys.readouterr().err
    assert rc == 1 and "cannot write" in err and "Traceback" not in err


@pytest.mark.parametrize("override, words", [
    ("lr=nan", "finite number > 0"), ("lr=inf", "finite number > 0"),
    ("grad_clip=inf", "grad_clip=inf"), ("weight_decay=-1", "weight_decay=-1.0"),
    ("threads=-2", "threads=-2"), ("log_to=nope", "unknown tracker"),
])
def test_hopd_sft_validates_as_strictly_as_distill(tmp_path, capsys, override, words):
    assert main(["sft", "--out", str(tmp_path / "m"), override]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_compare_rates_that_share_a_folder_are_refused_up_front(tmp_path, micro_pair, capsys):
    s, t = micro_pair
    out = tmp_path / "grid"
    rc = main(["compare", "--out", str(out), "--strategies", "opd", "--lrs", "1e-4,1.0000001e-4",
               "--steps", "1", f"student={s}", f"teacher={t}", "data=chain:tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "share the folder" in err and "Traceback" not in err
    assert not out.exists()
