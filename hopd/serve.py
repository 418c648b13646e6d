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
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hopd.rollout import Rollout
from hopd.teacher import TeacherScores

PROBE = "The teacher and the student must share a tokenizer: 0123456789 =+-*;"


class TeacherUnavailable(ValueError):
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


def make_server(model: PreTrainedModel, tok: PreTrainedTokenizerBase, name: str, host: str,
                port: int) -> ThreadingHTTPServer:
    lock = threading.Lock()  # one forward pass at a time

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep stderr quiet
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path in ("/health", "/v1/models"):
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            except (ValueError, json.JSONDecodeError):
                self._send(400, {"error": "request body is not JSON"})
                return
            if self.path == "/tokenize":
                ids = tok(body.get("prompt", ""), add_special_tokens=False)["input_ids"]
                self._send(200, {"tokens": ids, "count": len(ids)})
                return
            if self.path != "/v1/completions":
                self._send(404, {"error": f"no route {self.path}"})
                return
            prompts = body.get("prompt")
            if prompts and isinstance(prompts[0], int):
                prompts = [prompts]
            if not prompts or not all(isinstance(p, list) and p and
                                       all(isinstance(t, int) for t in p) for p in prompts):
                self._send(400, {"error": "prompt must be a list of token ids (or of lists)"})
                return
            if any(t < 0 or t >= model.config.vocab_size for p in prompts for t in p):
                self._send(400, {"error": "token id out of the model's vocabulary"})
                return
            k = int(body.get("prompt_logprobs") or 0)
            with lock:
                choices = [{"index": i, "text": "", "finish_reason": "length",
                            "prompt_logprobs": prompt_logprobs(model, tok, p, k)}
                           for i, p in enumerate(prompts)]
            self._send(200, {"object": "text_completion", "model": name, "choices": choices})

    return ThreadingHTTPServer((host, port), Handler)


# ---------------------------------------------------------------------------------------------
# Client


class RemoteTeacher:
    """Scores rollouts with a teacher server (hopd serve-teacher, or vLLM)."""

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 3):
        self.url = url.rstrip("/")
        self.timeout_s, self.retries = timeout_s, retries

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:  # the server answered: no point retrying
                detail = e.read().decode(errors="replace")[:200]
                raise TeacherUnavailable(f"teacher server {self.url}{path} answered HTTP "
                                         f"{e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
        raise TeacherUnavailable(
            f"teacher server {self.url} unreachable after {self.retries + 1} tries ({last}); "
            "start it with `hopd serve-teacher MODEL --port N` or fix teacher_url")

    def check_tokenizer(self, tok: PreTrainedTokenizerBase) -> None:
        theirs = self._request("/tokenize", {"prompt": PROBE})["tokens"]
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
        out = self._request("/v1/completions", {"model": "teacher", "prompt": seqs,
                                                "max_tokens": 1, "prompt_logprobs": k})
        choices = sorted(out["choices"], key=lambda c: c["index"])
        logp = torch.zeros(B, R)
        topv = torch.full((B, R, max(k, 1)), -1e4)  # finite: padded positions stay NaN-free
        topi = torch.zeros((B, R, max(k, 1)), dtype=torch.long)
        for b, (c, seq, start) in enumerate(zip(choices, seqs, starts)):
            entries = c["prompt_logprobs"]
            for j in range(len(seq) - start):
                e = entries[start + j]
                logp[b, j] = e[str(seq[start + j])]["logprob"]
                if k:
                    ranked = sorted(((v["rank"], int(t), v["logprob"]) for t, v in e.items()
                                     if v["rank"] <= k))[:k]
                    for r, (_, t, v) in enumerate(ranked):
                        topv[b, j, r], topi[b, j, r] = v, t
        scores = TeacherScores(logp_B_R=logp * rollout.response_mask_B_R)
        if k:
            scores.topk_logp_B_R_K, scores.topk_ids_B_R_K = topv, topi
        return scores.to(rollout.ids_B_T.device)
