"""A teacher in another process: hopd serve-teacher on loopback, scored remotely."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch

from hopd.cli import main
from hopd.models import load_model, load_tokenizer
from hopd.progress import read_metrics
from hopd.rollout import sample
from hopd.tasks import encode_prompts
from hopd.teacher import RemoteTeacher, TeacherUnavailable, score


@pytest.fixture(scope="module")
def server(micro_pair):
    _, teacher = micro_pair
    proc = subprocess.Popen([sys.executable, "-m", "hopd", "serve-teacher", str(teacher),
                             "--port", "0"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert m, line
    url = f"http://127.0.0.1:{m.group(1)}"
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_remote_scores_equal_local_scores(server, micro_pair, tokenizer):
    student, teacher = micro_pair
    s_model, t_model = load_model(str(student)).eval(), load_model(str(teacher)).eval()
    prompts = encode_prompts(tokenizer, ["a=1+2;", "a=3*4;b=a-1;", "a=5-5;"])
    r = sample(s_model, prompts, 10, eos_id=14, pad_id=0, temperature=2.0,
               generator=torch.Generator().manual_seed(0))
    remote = RemoteTeacher(server)
    remote.check_tokenizer(load_tokenizer(str(student)))
    local = score(t_model, r, "topk", 5)
    far = remote.score(r, "topk", 5)
    mask = r.response_mask_B_R.bool()
    assert torch.allclose(far.logp_B_R[mask], local.logp_B_R[mask], atol=1e-5)
    assert torch.equal(far.topk_ids_B_R_K[mask], local.topk_ids_B_R_K[mask])
    assert torch.allclose(far.topk_logp_B_R_K[mask], local.topk_logp_B_R_K[mask], atol=1e-5)


def test_distill_with_a_remote_teacher(server, micro_pair, tmp_path):
    student, _ = micro_pair
    run = tmp_path / "run"
    rc = main(["distill", "--out", str(run), "--quiet", f"student={student}",
               f"teacher_url={server}", "data=chain:tiny", "steps=2", "batch_size=4",
               "eval_n=2", "diag_every=1", "diag_n=2", "loss.kind=rkl", "loss.top_k=4"])
    assert rc == 0
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(train) == 2 and all(r["loss"] == r["loss"] for r in train)  # finite, not NaN


def test_unreachable_server_fails_clearly(micro_pair, tmp_path, capsys):
    student, _ = micro_pair
    t0 = time.perf_counter()
    rc = main(["distill", "--out", str(tmp_path / "r"), f"student={student}",
               "teacher_url=http://127.0.0.1:9", "teacher_retries=1", "teacher_timeout_s=2",
               "data=chain:tiny"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "serve-teacher" in err
    assert time.perf_counter() - t0 < 30


def test_full_vocabulary_loss_needs_top_k_remotely(server):
    with pytest.raises(TeacherUnavailable, match="top-k"):
        RemoteTeacher(server).score(None, "full")  # type: ignore[arg-type]


def test_tokenizer_mismatch_is_detected(server):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", *"Thetacrsudn"])}
    core = Tokenizer(models.WordLevel(vocab, "<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    other = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    with pytest.raises(TeacherUnavailable, match="tokenizes differently"):
        RemoteTeacher(server).check_tokenizer(other)


@pytest.fixture(scope="module")
def guarded(micro_pair, tokenizer):
    """An in-process server with a bearer token, on a free loopback port."""
    import threading

    from hopd.serve import make_server

    _, teacher = micro_pair
    server = make_server(load_model(str(teacher)).eval(), tokenizer, "t", "127.0.0.1", 0,
                         token="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _post(url, path, body: bytes, headers=None):
    """(status, parsed JSON answer) of a raw POST."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, data=body, headers={
        "Content-Type": "application/json", "Authorization": "Bearer s3cret", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,headers,code,needle", [
    (b"<html>", {}, 400, "not JSON"),
    (b'{"prompt": [[1, 2]], "prompt_logprobs": -1}', {}, 400, "integer in 0..128"),
    (b'{"prompt": [[1, 2]], "prompt_logprobs": 1000}', {}, 400, "integer in 0..128"),
    (b'{"prompt": [[1, 2]], "prompt_logprobs": "5"}', {}, 400, "integer in 0..128"),
    (b'{"prompt": "text"}', {}, 400, "list of token ids"),
    (b'{"prompt": [[1, 99999]]}', {}, 400, "out of the model's vocabulary"),
    (('{"prompt": [' + ",".join(["[1]"] * 1025) + "]}").encode(), {}, 413, "at most 1024"),
    (('{"prompt": [[' + ",".join(["1"] * 1100) + "]]}").encode(), {}, 413, "context"),
    (b'{"prompt": [[1, 2]]}', {"Authorization": "Bearer wrong"}, 401, "bearer token"),
    (b"{}", {"Content-Length": "999999999999"}, 413, "at most"),
    (('{"prompt": [' + ",".join(["[" + ",".join(["1"] * 1000) + "]"] * 70) + "]}").encode(),
     {}, 413, "65536"),  # 70,000 tokens: past the per-request token cap
    (('{"prompt": [' + ",".join(["[" + ",".join(["1"] * 1000) + "]"] * 40)
      + '], "prompt_logprobs": 64}').encode(), {}, 413, "log-prob entries"),  # the work cap
])
def test_the_server_refuses_bad_requests_with_a_json_error(guarded, body, headers, code, needle):
    status, answer = _post(guarded, "/v1/completions", body, headers)
    assert status == code and needle in answer["error"]


def test_the_server_answers_with_the_token_and_the_client_sends_it(guarded, monkeypatch,
                                                                   tokenizer):
    status, answer = _post(guarded, "/v1/completions",
                           b'{"prompt": [[1, 5, 6]], "prompt_logprobs": 2}')
    assert status == 200 and len(answer["choices"][0]["prompt_logprobs"]) == 3
    with pytest.raises(TeacherUnavailable, match="HTTP 401"):
        RemoteTeacher(guarded, retries=0).check_tokenizer(tokenizer)
    monkeypatch.setenv("HOPD_TEACHER_TOKEN", "s3cret")
    RemoteTeacher(guarded, retries=0).check_tokenizer(tokenizer)  # the same tokenizer: passes


def test_a_skipped_probe_is_announced(server, micro_pair, tmp_path, capsys):
    student, _ = micro_pair
    rc = main(["distill", "--out", str(tmp_path / "run"), "--quiet", f"student={student}",
               f"teacher_url={server}", "data=chain:tiny", "steps=1", "batch_size=2",
               "eval_n=2", "diag_every=0", "probe_every=1", "eval_every=0"])
    assert rc == 0 and "the probe is skipped" in capsys.readouterr().err


def test_tokenize_has_a_length_cap(guarded):
    status, answer = _post(guarded, "/tokenize", ('{"prompt": "' + "a" * 300_000 + '"}').encode())
    assert status == 413 and "at most 200000" in answer["error"]


def _raw(url: str, data: bytes, wait: float = 30.0) -> bytes:
    """Sends raw bytes on one connection and returns what comes back until it closes."""
    import socket

    host, port = url.rsplit(":", 1)
    with socket.create_connection((host.split("//")[1], int(port)), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_slow_clients_do_not_starve_the_server_and_a_burst_is_answered(micro_pair, tokenizer):
    """Clients that trickle header lines are cut after the header deadline, /health answers
    while they hang, and 100 concurrent clients each get 200 or 503, never a reset."""
    import socket
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from hopd import serve

    _, teacher = micro_pair
    server = serve.make_server(load_model(str(teacher)).eval(), tokenizer, "t", "127.0.0.1", 0,
                               workers=12)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    slow = []
    try:
        for _ in range(8):  # 8 clients that send a header line and then nothing for long
            sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nX-Slow: 1\r\n")
            slow.append(sock)
        time.sleep(0.5)
        t0 = time.perf_counter()
        assert b"200 OK" in _raw(url, b"GET /health HTTP/1.0\r\n\r\n")[:40]
        assert time.perf_counter() - t0 < 5
        # the slow ones are dropped once the header deadline has passed
        time.sleep(serve.HEADER_TIMEOUT_S + 1)
        for sock in slow:
            sock.settimeout(5)
            assert sock.recv(100) == b""  # closed by the server
        body = b'{"prompt": [[1, 5, 6]], "prompt_logprobs": 2}'
        request = (b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        with ThreadPoolExecutor(100) as pool:
            answers = list(pool.map(lambda _: _raw(url, request)[:12], range(100)))
        statuses = [a.split(b" ")[1] if a.startswith(b"HTTP/") else a for a in answers]
        assert all(s in (b"200", b"503") for s in statuses), statuses
        assert statuses.count(b"200") >= 12
    finally:
        for sock in slow:
            sock.close()
        server.shutdown()
        server.server_close()
