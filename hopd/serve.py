"""A teacher in another process or machine, over HTTP, with vLLM's `prompt_logprobs` semantics.

Server (`hopd serve-teacher MODEL`): POST /v1/completions with token-id prompts, `max_tokens: 1`
and `prompt_logprobs: k` answers, per prompt, a list with one entry per prompt token: None for the
first token, then a dict {token_id: {"logprob", "rank", "decoded_token"}} holding the actual
token and the k most likely ones at that position, as vLLM's OpenAI-compatible server does. So a
vLLM or SGLang server of the same teacher can stand in for it. POST /tokenize and GET /v1/models
work as in vLLM (the tokenizer check uses /tokenize).

Client (`RemoteTeacher`): sends prompt + response tokens of each rollout row (padding removed),
rebuilds the (B, R) teacher log-probs and (B, R, k) top-k, with a timeout and retries; an
unreachable server or a tokenizer mismatch gives a clear error before training starts.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hopd.config import ConfigError
from hopd.rollout import Rollout
from hopd.teacher import TeacherScores

TOKEN_ENV = "HOPD_TEACHER_TOKEN"  # a bearer token the client sends (and the server may require)
PROBE = "The teacher and the student must share a tokenizer: 0123456789 =+-*;"


class TeacherUnavailable(ConfigError):
    """The teacher server cannot be reached or answers badly; the message says what to check."""


# ---------------------------------------------------------------------------------------------
# Server


def prompt_logprobs(model: PreTrainedModel, tok: PreTrainedTokenizerBase, ids: list[int],
                    k: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM-style prompt logprobs of one token sequence (no padding)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    logp = logits.log_softmax(-1)  # (T, V): row t predicts token t + 1
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for t in range(1, len(ids)):
        row = logp[t - 1]
        entries: dict[str, dict[str, Any]] = {}
        actual = ids[t]
        rank = int((row > row[actual]).sum()) + 1
        entries[str(actual)] = {"logprob": float(row[actual]), "rank": rank,
                                "decoded_token": tok.decode([actual])}
        if k > 0:
            vals, idx = torch.topk(row, k)
            for r, (v, i) in enumerate(zip(vals.tolist(), idx.tolist()), start=1):
                entries.setdefault(str(i), {"logprob": v, "rank": r,
                                            "decoded_token": tok.decode([i])})
        out.append(entries)
    return out


MAX_BODY_BYTES = 64 * 2**20  # a request larger than this is refused (413)
MAX_PROMPTS = 1024  # prompts per request
MAX_LOGPROBS = 128  # largest prompt_logprobs k (vLLM's own default limit is 20)
REQUEST_TIMEOUT_S = 60.0  # a client that stops sending is dropped after this long
WORKERS = 8  # requests handled at once; more wait, and past that get 503


class _BoundedServer(ThreadingHTTPServer):
    """A threading server with at most `WORKERS` requests in flight (a burst cannot start
    unbounded threads); a request that finds no free worker within the timeout gets 503."""

    daemon_threads = True

    def __init__(self, *args: Any, workers: int = WORKERS, **kw: Any):
        super().__init__(*args, **kw)
        self.slots = threading.BoundedSemaphore(workers)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(timeout=REQUEST_TIMEOUT_S):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nContent-Length: 27\r\nConnection: close"
                                b"\r\n\r\n{\"error\": \"server is busy\"}")
            finally:
                self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class BadRequest(ValueError):
    """A request the server refuses; `code` is the HTTP status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _check_completion(body: Any, vocab: int, context: int) -> tuple[list[list[int]], int]:
    """The prompts (token-id lists) and k of a completions request, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    prompts = body.get("prompt")
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in p) for p in prompts):
        raise BadRequest(400, "prompt must be a list of token ids, or a list of such lists")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(413, f"{len(prompts)} prompts in one request: at most {MAX_PROMPTS}")
    longest = max(len(p) for p in prompts)
    if context and longest > context:
        raise BadRequest(413, f"a prompt of {longest} tokens exceeds the model's context of "
                         f"{context}")
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise BadRequest(400, "token id out of the model's vocabulary")
    k = body.get("prompt_logprobs") or 0
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS:
        raise BadRequest(400, f"prompt_logprobs must be an integer in 0..{MAX_LOGPROBS}, got "
                         f"{k!r}")
    return prompts, k


def make_server(model: PreTrainedModel, tok: PreTrainedTokenizerBase, name: str, host: str,
                port: int, token: str = "", workers: int = WORKERS) -> ThreadingHTTPServer:
    """The teacher server. Unauthenticated unless `token` is set: then every request must carry
    `Authorization: Bearer TOKEN`. Malformed requests get a 4xx JSON error, never a dropped
    connection; bodies, prompts per request, tokens per prompt and k are capped."""
    lock = threading.Lock()  # one forward pass at a time
    vocab = model.config.vocab_size
    context = getattr(model.config, "max_position_embeddings", 0) or 0

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # socket timeout: a stalled client frees its worker

        def log_message(self, *args: Any) -> None:  # keep stderr quiet
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if token and self.headers.get("Authorization", "") != f"Bearer {token}":
                self._send(401, {"error": "missing or wrong bearer token (set "
                                 f"{TOKEN_ENV} on the client)"})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802
            if not self._authorized():
                return
            if self.path in ("/health", "/v1/models"):
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def _body(self) -> Any:
            try:
                n = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise BadRequest(411, "a Content-Length header is required") from None
            if n < 0 or n > MAX_BODY_BYTES:
                raise BadRequest(413, f"request body of {n} bytes: at most {MAX_BODY_BYTES}")
            try:
                return json.loads(self.rfile.read(n))
            except (ValueError, UnicodeDecodeError):
                raise BadRequest(400, "request body is not JSON") from None

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorized():
                return
            try:
                body = self._body()
                if self.path == "/tokenize":
                    text = body.get("prompt", "") if isinstance(body, dict) else None
                    if not isinstance(text, str):
                        raise BadRequest(400, "prompt must be a string")
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    self._send(200, {"tokens": ids, "count": len(ids)})
                    return
                if self.path != "/v1/completions":
                    raise BadRequest(404, f"no route {self.path}")
                prompts, k = _check_completion(body, vocab, context)
                with lock:
                    choices = [{"index": i, "text": "", "finish_reason": "length",
                                "prompt_logprobs": prompt_logprobs(model, tok, p, k)}
                               for i, p in enumerate(prompts)]
                self._send(200, {"object": "text_completion", "model": name,
                                 "choices": choices})
            except BadRequest as e:
                self._send(e.code, {"error": str(e)})
            except Exception as e:  # a server bug: answer, and keep serving
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    return _BoundedServer((host, port), Handler, workers=workers)


# ---------------------------------------------------------------------------------------------
# Client


class RemoteTeacher:
    """Scores rollouts with a teacher server (hopd serve-teacher, or vLLM)."""

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 3, token: str = ""):
        self.url = url.rstrip("/")
        self.timeout_s, self.retries = timeout_s, retries
        self.token = token or os.environ.get(TOKEN_ENV, "")

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST (or GET) with retries on connection errors; the answer parsed as JSON."""
        data = json.dumps(body).encode() if body is not None else None
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            headers = {"Content-Type": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            req = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:  # the server answered: no point retrying
                detail = e.read().decode(errors="replace")[:200]
                raise TeacherUnavailable(f"teacher server {self.url}{path} answered HTTP "
                                         f"{e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
                continue
            try:
                return json.loads(raw)
            except ValueError:
                start = raw[:60].decode(errors="replace")
                raise TeacherUnavailable(
                    f"the teacher server at {self.url}{path} answered with something that is "
                    f"not JSON (it starts {start!r}); check that teacher_url points at a vLLM or "
                    "`hopd serve-teacher` server") from None
        raise TeacherUnavailable(
            f"teacher server {self.url} unreachable after {self.retries + 1} tries ({last}); "
            "start it with `hopd serve-teacher MODEL --port N` or fix teacher_url")

    def check_tokenizer(self, tok: PreTrainedTokenizerBase) -> None:
        answer = self._request("/tokenize", {"prompt": PROBE})
        theirs = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(theirs, list):
            raise TeacherUnavailable(f"the teacher server at {self.url} answered /tokenize "
                                     f"without a 'tokens' list ({str(answer)[:80]}); is it a vLLM "
                                     "or `hopd serve-teacher` server?")
        ours = tok(PROBE, add_special_tokens=False)["input_ids"]
        if list(theirs) != list(ours):
            raise TeacherUnavailable(
                f"the teacher server at {self.url} tokenizes differently from the student "
                f"(probe text gives {theirs[:8]}... vs {ours[:8]}...); serve a teacher that "
                "shares the student's tokenizer")

    def score(self, rollout: Rollout, need: str = "sampled", top_k: int = 0,
              with_entropy: bool = False, prompts: list[list[int]] | None = None
              ) -> TeacherScores:
        """Like `hopd.teacher.score`; entropy needs the full distribution, so it stays None."""
        if need == "full":
            raise TeacherUnavailable("a remote teacher returns top-k log-probs only: set "
                                     "loss.top_k (e.g. 32) or use loss.kind=sampled_rkl")
        B, R = rollout.response_mask_B_R.shape
        seqs, starts = [], []
        for b in range(B):
            prompt = prompts[b] if prompts is not None else [
                t for t, m in zip(rollout.ids_B_T[b, : rollout.prompt_len].tolist(),
                                  rollout.attn_B_T[b, : rollout.prompt_len].tolist()) if m]
            n = int(rollout.response_mask_B_R[b].sum())
            seqs.append(prompt + rollout.response_ids_B_R[b, :n].tolist())
            starts.append(len(prompt))
        k = top_k if need == "topk" else 0
        body = {"model": "teacher", "prompt": seqs, "max_tokens": 1, "prompt_logprobs": k}
        for attempt in range(self.retries + 1):
            try:
                logp, topv, topi = parse_prompt_logprobs(self._request("/v1/completions", body),
                                                         seqs, starts, R, k)
                break
            except BadAnswer as e:  # a partial or malformed answer is never trained on
                if attempt == self.retries:
                    raise TeacherUnavailable(
                        f"the teacher server at {self.url} gave a malformed answer "
                        f"{self.retries + 1} times ({e}); check the server's log") from None
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
        scores = TeacherScores(logp_B_R=logp * rollout.response_mask_B_R)
        if k:
            scores.topk_logp_B_R_K, scores.topk_ids_B_R_K = topv, topi
        return scores.to(rollout.ids_B_T.device)


class BadAnswer(ValueError):
    """A teacher server's answer does not have the shape asked for."""


def parse_prompt_logprobs(out: Any, seqs: list[list[int]], starts: list[int], R: int, k: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, R) log-probs of the response tokens and (B, R, k) top-k from a completions answer.

    Checks every part before use: one choice per prompt (indices 0..B-1), one entry per prompt
    token, the actual token present at every response position, finite log-probs, integer
    ranks. Anything else raises `BadAnswer` naming what was wrong."""
    B = len(seqs)
    choices = out.get("choices") if isinstance(out, dict) else None
    if not isinstance(choices, list):
        raise BadAnswer(f"no 'choices' list in the answer ({str(out)[:80]})")
    if len(choices) != B:
        raise BadAnswer(f"{len(choices)} choices for {B} prompts")
    by_index = {c.get("index"): c for c in choices if isinstance(c, dict)}
    if sorted(i for i in by_index if isinstance(i, int)) != list(range(B)):
        raise BadAnswer(f"choice indices are not 0..{B - 1}")
    logp = torch.zeros(B, R)
    topv = torch.full((B, R, max(k, 1)), -1e4)  # finite: padded positions stay NaN-free
    topi = torch.zeros((B, R, max(k, 1)), dtype=torch.long)
    for b, (seq, start) in enumerate(zip(seqs, starts)):
        entries = by_index[b].get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(seq):
            got = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise BadAnswer(f"choice {b}: prompt_logprobs has {got} entries for {len(seq)} tokens")
        for j in range(len(seq) - start):
            e = entries[start + j]
            actual = e.get(str(seq[start + j])) if isinstance(e, dict) else None
            value = actual.get("logprob") if isinstance(actual, dict) else None
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BadAnswer(f"choice {b}, token {start + j}: no finite log-prob for the "
                                f"token {seq[start + j]}")
            logp[b, j] = value
            if k:
                try:
                    ranked = sorted((int(v["rank"]), int(t), float(v["logprob"]))
                                    for t, v in e.items() if int(v["rank"]) <= k)[:k]
                except (TypeError, ValueError, KeyError):
                    raise BadAnswer(f"choice {b}, token {start + j}: top-k entries need "
                                    "integer 'rank' and numeric 'logprob'") from None
                for r, (_, t, v) in enumerate(ranked):
                    topv[b, j, r], topi[b, j, r] = v, t
    return logp, topv, topi
