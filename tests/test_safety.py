"""A user's files are never lost, a model folder's code never runs, a bad teacher answer is never
trained on: each test here failed before the fix it covers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from hopd.cli import main
from hopd.progress import read_metrics
from hopd.runstate import MARKER, RunLock
from hopd.teacher import BadAnswer, parse_prompt_logprobs

TINY = ["data=chain:tiny", "batch_size=4", "eval_n=4", "diag_every=0", "threads=1"]


def _pair_args(pair) -> list[str]:
    s, t = pair
    return [f"student={s}", f"teacher={t}", *TINY]


def _strict_json(path: Path):
    """Parses `path` as standard JSON: NaN or Infinity fail."""
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _user_folder(root: Path) -> Path:
    """A folder of the user's own that merely looks like a run."""
    root.mkdir()
    (root / "config.yaml").write_text("my: settings\n")
    (root / "result.json").write_text('{"mine": 1}\n')
    (root / "model").mkdir()
    (root / "model" / "weights.bin").write_bytes(b"precious")
    return root


# ---------------------------------------------------------------------------------------------
# 1. --overwrite validates first, deletes only what hopd made, never the working directory

def test_overwrite_validates_before_deleting(tmp_path, micro_pair, capsys):
    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), "--quiet", "max_steps=1", "eval_every=0",
                 *_pair_args(micro_pair)]) == 0
    before = sorted(p.name for p in run.iterdir())
    rc = main(["distill", "--out", str(run), "--overwrite", *_pair_args(micro_pair),
               f"data={tmp_path / 'missing.jsonl'}"])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before  # nothing was deleted
    cmp_dir = tmp_path / "cmp"
    cmp_dir.mkdir()
    (cmp_dir / MARKER).write_text('{"kind": "compare"}')
    (cmp_dir / "report.md").write_text("old report")
    rc = main(["compare", "--out", str(cmp_dir), "--overwrite", "--steps", "1",
               *_pair_args(micro_pair), "bogus_key=1"])
    assert rc == 2 and "unknown config key 'bogus_key'" in capsys.readouterr().err
    assert (cmp_dir / "report.md").read_text() == "old report"


def test_overwrite_refuses_a_folder_hopd_did_not_make(tmp_path, micro_pair, capsys):
    mine = _user_folder(tmp_path / "mine")
    rc = main(["distill", "--out", str(mine), "--overwrite", "--quiet", "max_steps=1",
               *_pair_args(micro_pair)])
    assert rc == 2 and "was not made by hopd" in capsys.readouterr().err
    assert (mine / "model" / "weights.bin").read_bytes() == b"precious"


def test_overwrite_never_deletes_the_working_directory(tmp_path, micro_pair, monkeypatch,
                                                       capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (home / MARKER).write_text('{"kind": "distill"}')  # even one that looks like a run
    sub = home / "sub"
    sub.mkdir()
    (sub / "notes.txt").write_text("mine")
    monkeypatch.chdir(sub)
    for out in (".", ".."):
        rc = main(["distill", "--out", out, "--overwrite", *_pair_args(micro_pair)])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert "not made by hopd" in err or "working directory" in err
    assert (home / "thesis.tex").read_text() == "years of work"
    assert (sub / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# 2. A model folder's code never runs without trust_remote_code=true

def _folder_with_code(root: Path, micro_pair) -> tuple[Path, Path]:
    """A real checkpoint whose config names custom code; the code writes a sentinel file."""
    import shutil

    s, _ = micro_pair
    evil = root / "evil"
    shutil.copytree(s, evil)
    conf = json.loads((evil / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "custom.Cfg", "AutoModelForCausalLM": "custom.Model"}
    (evil / "config.json").write_text(json.dumps(conf))
    sentinel = root / "CODE_RAN"
    (evil / "custom.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    return evil, sentinel


def test_model_folder_code_never_runs_unasked(tmp_path, micro_pair):
    evil, sentinel = _folder_with_code(tmp_path, micro_pair)
    _, t = micro_pair
    for args in (["distill", "--out", str(tmp_path / "run"), f"student={evil}", f"teacher={t}",
                  *TINY], ["eval", "--model", str(evil), "--task", "chain:tiny", "--n", "2"]):
        # a subprocess with no terminal: transformers' "[y/N]" prompt would hang or read EOF
        proc = subprocess.run([sys.executable, "-m", "hopd", *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "trust_remote_code=true" in proc.stderr and "Traceback" not in proc.stderr
        assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------
# 3. --resume continues only a folder hopd made

def test_resume_refuses_a_folder_hopd_did_not_make(tmp_path, micro_pair, capsys):
    mine = _user_folder(tmp_path / "mine")
    rc = main(["distill", "--out", str(mine), "--resume", *_pair_args(micro_pair)])
    assert rc == 2 and "was not made by hopd" in capsys.readouterr().err
    assert (mine / "config.yaml").read_text() == "my: settings\n"
    assert (mine / "result.json").read_text() == '{"mine": 1}\n'
    assert (mine / "model" / "weights.bin").exists()


# ---------------------------------------------------------------------------------------------
# 4. A teacher server's partial or malformed answer is never trained on

def _good_answer(seqs):
    return {"choices": [{"index": i, "prompt_logprobs": [None] + [
        {str(t): {"logprob": -1.0, "rank": 1}} for t in seq[1:]]} for i, seq in enumerate(seqs)]}


@pytest.mark.parametrize("mangle,needle", [
    (lambda a: {"choices": a["choices"][:1]}, "1 choices for 2 prompts"),
    (lambda a: {}, "no 'choices' list"),
    (lambda a: {"choices": [{**c, "prompt_logprobs": c["prompt_logprobs"][:2]}
                            for c in a["choices"]]}, "entries for"),
    (lambda a: {"choices": [{**c, "index": 0} for c in a["choices"]]}, "indices are not"),
    (lambda a: {"choices": [{**c, "prompt_logprobs": [None] + [
        {k: {"logprob": float("nan"), "rank": 1} for k in e} for e in c["prompt_logprobs"][1:]]}
        for c in a["choices"]]}, "no finite log-prob"),
])
def test_malformed_teacher_answers_are_refused(mangle, needle):
    seqs, starts = [[1, 5, 6, 7], [1, 8, 9]], [2, 1]
    logp, _, _ = parse_prompt_logprobs(_good_answer(seqs), seqs, starts, 2, 0)
    assert torch.equal(logp, torch.full((2, 2), -1.0))
    with pytest.raises(BadAnswer, match=needle):
        parse_prompt_logprobs(mangle(_good_answer(seqs)), seqs, starts, 2, 0)


class _BadTeacher:
    """A loopback server that tokenizes like the testbed but answers completions badly."""

    def __init__(self, tokenizer, answer):
        tok = tokenizer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    data = json.dumps({"tokens": tok(body["prompt"], add_special_tokens=False)
                                       ["input_ids"]}).encode()
                else:
                    data = answer(body["prompt"])
                status, length = 200, None
                if isinstance(data, tuple):  # (status, body) or ("raw", bytes) or ("cut", body)
                    status, data = data
                if status == "raw":  # not HTTP at all
                    self.wfile.write(data)
                    self.close_connection = True
                    return
                if status == "cut":  # a Content-Length the body never reaches
                    status, length = 200, len(data) + 100
                self.send_response(status)
                if status in (429, 503):
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(length or len(data)))
                self.end_headers()
                self.wfile.write(data)
                if length:
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("kind", ["short", "html"])
def test_a_bad_teacher_server_stops_the_run_with_its_state_saved(tmp_path, micro_pair, tokenizer,
                                                                kind, capsys):
    def answer(seqs):
        if kind == "html":
            return b"<html><body>502 Bad Gateway</body></html>"
        return json.dumps({"choices": _good_answer(seqs)["choices"][:-1]}).encode()

    server = _BadTeacher(tokenizer, answer)
    try:
        s, _ = micro_pair
        run = tmp_path / "run"
        rc = main(["distill", "--out", str(run), "--quiet", f"student={s}",
                   f"teacher_url={server.url}", "teacher_retries=1", *TINY, "max_steps=3"])
    finally:
        server.close()
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err, err
    assert ("not JSON" in err) if kind == "html" else ("malformed answer" in err and
                                                      "1 choices" not in err)
    assert "--resume" in err
    assert not [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]  # no step taken
    assert (run / "checkpoints" / "step_0000000" / "trainer_state.pt").exists()


def _distill_against(tmp_path, micro_pair, tokenizer, answer, retries: int):
    """A 2-step distill whose teacher is a `_BadTeacher` answering with `answer`."""
    server = _BadTeacher(tokenizer, answer)
    run = tmp_path / "run"
    try:
        rc = main(["distill", "--out", str(run), "--quiet", f"student={micro_pair[0]}",
                   "eval_kl_n=0", f"teacher_url={server.url}", f"teacher_retries={retries}",
                   *TINY, "max_steps=2"])
    finally:
        server.close()
    return rc, run


def test_the_client_rides_out_busy_and_failing_answers(tmp_path, micro_pair, tokenizer):
    """503, 429, 500, a reset and a reply that is not HTTP, each once: the client retries with
    backoff and the run trains as if the server had answered at once."""
    faults = iter([(503, b'{"error": "busy"}'), (429, b"{}"), (500, b"{}"), ("raw", b"\x00junk"),
                   ("cut", b'{"choices": [')])

    def answer(seqs):
        return next(faults, None) or json.dumps(_good_answer(seqs)).encode()

    rc, run = _distill_against(tmp_path, micro_pair, tokenizer, answer, retries=5)
    assert rc == 0
    assert len([r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]) == 2


@pytest.mark.parametrize("fault", ["raw", "cut", 503])
def test_a_teacher_that_keeps_failing_stops_the_run_with_its_state_saved(
        tmp_path, micro_pair, tokenizer, capsys, fault):
    def answer(seqs):
        return (fault, b"\x00 not http" if fault == "raw" else b'{"choices": [')

    rc, run = _distill_against(tmp_path, micro_pair, tokenizer, answer, retries=1)
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err and "--resume" in err, err
    assert (run / "checkpoints" / "step_0000000" / "trainer_state.pt").exists()


# ---------------------------------------------------------------------------------------------
# 5. One run per folder at a time

def test_a_second_run_on_a_locked_folder_fails_naming_the_holder(tmp_path, micro_pair, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text('{"kind": "distill"}')
    with RunLock(run):
        rc = main(["distill", "--out", str(run), "--resume", *_pair_args(micro_pair)])
        err = capsys.readouterr().err
    assert rc == 2 and f"in use by another hopd process (pid {os.getpid()})" in err
    assert not (run / "metrics.jsonl").exists()
    # the lock went with its holder: the folder is usable again
    assert main(["distill", "--out", str(run), "--resume", "--quiet", "max_steps=1",
                 "eval_every=0", *_pair_args(micro_pair)]) == 0


def test_a_lock_file_planted_as_a_symlink_is_never_written_through(tmp_path, micro_pair,
                                                                    capsys):
    """A folder holding only `.hopd-lock` as a link to a user's file is not an empty folder,
    and the user's file keeps its contents, with --overwrite and --resume too."""
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's data")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".hopd-lock").symlink_to(precious)
    for flags in ([], ["--overwrite"], ["--resume"]):
        rc = main(["distill", "--out", str(run), *flags, "--quiet", "max_steps=1",
                   *_pair_args(micro_pair)])
        assert rc == 2, flags
        assert precious.read_text() == "the user's data"
    err = capsys.readouterr().err
    assert "is not empty" in err and "was not made by hopd" in err
    # with a hopd marker the folder is hopd's, and the link still is not followed
    (run / ".hopd-run").write_text('{"kind": "distill"}')
    rc = main(["distill", "--out", str(run), "--resume", "--quiet", "max_steps=1",
               *_pair_args(micro_pair)])
    assert rc == 2 and "not a regular file" in capsys.readouterr().err
    assert precious.read_text() == "the user's data"


# ---------------------------------------------------------------------------------------------
# 6. Resuming a finished run touches nothing; every JSON file is standard JSON

def test_resuming_a_finished_run_changes_nothing(tmp_path, micro_pair, capsys):
    run = tmp_path / "run"
    args = ["distill", "--out", str(run), "--quiet", "max_steps=2", "eval_every=1",
            "save_every=1", *_pair_args(micro_pair)]
    assert main(args) == 0
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".hopd-lock"}
    result = _strict_json(run / "result.json")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "is finished" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in files} == files
    # killed during the final save: result.json and the final model missing
    (run / "result.json").unlink()
    import shutil

    shutil.rmtree(run / "model")
    assert main([*args, "--resume"]) == 0
    again = _strict_json(run / "result.json")
    assert again["steps"] == 2 and again["final_eval_accuracy"] == result["final_eval_accuracy"]
    assert (run / "model" / "model.safetensors").exists()
    for path in [run / "result.json", run / "config.yaml"]:
        assert path.exists()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON: {c}"))


# ---------------------------------------------------------------------------------------------
# 7. A resume may not silently become a different experiment

def test_resume_refuses_config_changes_unless_forced(tmp_path, micro_pair, capsys):
    run = tmp_path / "run"
    base = ["distill", "--out", str(run), "--quiet", "eval_every=0", "save_every=1",
            *_pair_args(micro_pair)]
    assert main([*base, "max_steps=1"]) == 0
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main([*base, "--resume", "max_steps=2", "seed=7", "loss.kind=fkl"]) == 2
    err = capsys.readouterr().err
    assert "seed: 0 -> 7" in err and "loss.kind: 'sampled_rkl' -> 'fkl'" in err
    assert "--force-config" in err and "max_steps" not in err  # steps may change
    assert (run / "config.yaml").read_text() == saved
    assert main([*base, "--resume", "max_steps=2"]) == 0  # a longer run is the same run
    assert main([*base, "--resume", "max_steps=3", "seed=7", "--force-config"]) == 0
    assert "seed: 7" in (run / "config.yaml").read_text()


def test_a_setting_added_since_the_run_was_written_counts_at_its_default(tmp_path, micro_pair):
    """A run folder written by an older hopd lacks the settings added since: resuming it with
    their defaults is the same run; a non-default value is still a change."""
    import yaml

    run = tmp_path / "run"
    base = ["distill", "--out", str(run), "--quiet", "eval_every=0", "save_every=1",
            *_pair_args(micro_pair)]
    assert main([*base, "max_steps=1"]) == 0
    old = yaml.safe_load((run / "config.yaml").read_text())
    del old["sampling"]["engine"], old["loss"]["gamma"]
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    assert main([*base, "--resume", "max_steps=2", "loss.gamma=0.5"]) == 2  # not the default
    assert main([*base, "--resume", "max_steps=2"]) == 0


# ---------------------------------------------------------------------------------------------
# 8. Every prompt is checked against the context, not a sample

def test_a_long_prompt_deep_in_the_file_is_found(tmp_path, micro_pair, capsys):
    rows = [{"prompt": f"a={i % 10}+1;" + "b=a;" * (i // 10), "answer": str((i + 1) % 10)}
            for i in range(300)]
    rows[250]["prompt"] = "a=1;" * 300  # 1,200 characters: past the 1,024-token context
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["distill", "--out", str(tmp_path / "run"), "--quiet", *_pair_args(micro_pair),
            f"data={data}", "budget=16", "max_steps=1", "eval_every=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{data}:251 (1202 tokens)" in err and "drop_long_prompts=true" in err
    assert main([*args, "drop_long_prompts=true", "--overwrite"]) == 0
    assert "dropped 1 prompts" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 10. A full disk: one clear line, the previous checkpoint intact, and the run resumes

def _fills_the_disk(module, name: str, error: Exception) -> Callable:
    """Replaces module.name with a writer that works once, then raises `error`; returns the
    original."""
    real, calls = getattr(module, name), {"n": 0}

    def full_after_one(*a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise error
        return real(*a, **k)

    setattr(module, name, full_after_one)
    return real


def _run_into_a_full_disk(tmp_path, micro_pair, capsys) -> tuple[Path, list[str]]:
    """A 3-step run saving every step whose second save finds the disk full: one line, no
    traceback, the first checkpoint alone on disk (no half-written folder beside it)."""
    run = tmp_path / "run"
    args = ["distill", "--out", str(run), "--quiet", "max_steps=3", "eval_every=0",
            "save_every=1", *_pair_args(micro_pair)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "step_0000001 is intact" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001"]
    return run, args


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, micro_pair, monkeypatch, capsys):
    import hopd.runstate as R

    monkeypatch.setattr(R.torch, "save", R.torch.save)  # restored after the test
    # what torch's zip writer raises when the disk fills
    real = _fills_the_disk(R.torch, "save", RuntimeError(
        "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"))
    run, args = _run_into_a_full_disk(tmp_path, micro_pair, capsys)
    R.torch.save = real
    assert main([*args, "--resume"]) == 0
    assert _strict_json(run / "result.json")["steps"] == 3


def test_a_full_disk_inside_safetensors_is_one_line(tmp_path, micro_pair, monkeypatch, capsys):
    """safetensors raises its own error type (not an OSError) when the disk fills while the
    weights are written; it gets the same one line, and the previous checkpoint stays."""
    import transformers.modeling_utils as M
    from safetensors import SafetensorError

    monkeypatch.setattr(M, "safe_save_file", M.safe_save_file)  # restored after the test
    _fills_the_disk(M, "safe_save_file", SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
        'left on device" })'))
    run, _ = _run_into_a_full_disk(tmp_path, micro_pair, capsys)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert any('"step": 2' in x for x in lines)  # the metrics written before the failure stay


# ---------------------------------------------------------------------------------------------
# 11. Data edge cases

def test_a_fifo_is_refused_and_a_bom_is_accepted(tmp_path, micro_pair, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    rc = main(["distill", "--out", str(tmp_path / "r1"), *_pair_args(micro_pair),
               f"data={fifo}"])
    assert rc == 2 and "not a regular file" in capsys.readouterr().err
    bom = tmp_path / "bom.jsonl"
    rows = "".join(json.dumps({"prompt": f"a={i % 10};", "answer": str(i % 10)}) + "\n"
                   for i in range(40))
    bom.write_bytes(b"\xef\xbb\xbf" + rows.encode())
    from hopd.tasks.jsonl import load_rows

    assert load_rows(bom)[0] == ("a=0;", "0")


def test_prose_reference_answers_give_a_warning(tmp_path, capsys):
    from hopd.tasks import PromptSource

    prose = tmp_path / "prose.jsonl"
    prose.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"She has {i} apples "
                                         "left because she ate one"}) + "\n" for i in range(60)))
    PromptSource(str(prose))
    assert "looks like a final answer" in capsys.readouterr().err
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"so {i} \\boxed{{{i}}}"})
                          + "\n" for i in range(60)))
    src = PromptSource(str(ok))
    assert capsys.readouterr().err == ""
    assert all(e.answer == e.prompt[1:] for e in src.all_rows())  # \boxed{} content


# ---------------------------------------------------------------------------------------------
# 12. An update that makes the weights non-finite stops the run before they are used or saved

def test_non_finite_weights_stop_the_run(tmp_path, micro_pair, monkeypatch, capsys):
    real = torch.optim.AdamW.step

    def overflowing(self, *a, **k):  # an update past float range (a huge lr, an fp16 overflow)
        out = real(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    run = tmp_path / "run"
    rc = main(["distill", "--out", str(run), "--quiet", "max_steps=3", "eval_every=0",
               "save_every=1", *_pair_args(micro_pair)])
    err = capsys.readouterr().err
    assert rc == 3 and "weights became non-finite at step 1" in err and "Traceback" not in err
    assert "no checkpoint was saved" in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
