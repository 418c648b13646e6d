"""The teacher: one interface, a model in this process or a server elsewhere.

A `Teacher` scores a rollout: the log-prob of each sampled token, and, when it can, the whole
next-token distribution (`full_distributions`, which the full-vocabulary losses, the teacher's
entropy and the exact per-position KL need) or its top-k. `LocalTeacher` runs one no-grad
forward pass over prompt + response; `RemoteTeacher` asks a server that speaks vLLM's
`prompt_logprobs` protocol (`hopd serve-teacher`, or vLLM itself) and returns top-k at most.

The logits at column P - 1 + r predict response token r, so the R response positions are read
from columns P - 1 .. T - 2 (`logits_to_keep = R + 1` skips the prompt's other logits).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hopd.config import ConfigError
from hopd.losses import entropy, head_logprobs, positions_per_chunk
from hopd.models import hidden_states_out, response_logits
from hopd.rollout import Rollout, left_pad

TOKEN_ENV = "HOPD_TEACHER_TOKEN"  # a bearer token the client sends (and the server may require)
PROBE = "The teacher and the student must share a tokenizer: 0123456789 =+-*;"


RETRY_STATUS = {429, 500, 502, 503, 504}  # busy, overloaded or restarting: worth a retry


def retry_after(value: str | None) -> float:
    """Seconds a Retry-After header asks for (a number of seconds; dates count as 1 s), at most
    60; 0 when absent."""
    try:
        return min(60.0, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 1.0


class TeacherUnavailable(ConfigError):
    """The teacher server cannot be reached or answers badly; the message says what to check."""


class TeacherRefused(TeacherUnavailable):
    """The teacher server answered a request with an HTTP error."""


@dataclass
class TeacherScores:
    logp_B_R: torch.Tensor  # teacher log-prob of each sampled token (float32)
    logp_B_R_V: torch.Tensor | None = None  # full next-token log-distribution (need="full")
    topk_logp_B_R_K: torch.Tensor | None = None  # top-k log-probs (need="topk")
    topk_ids_B_R_K: torch.Tensor | None = None
    entropy_B_R: torch.Tensor | None = None  # teacher entropy per position (diagnostics)
    # need="hidden": the teacher's last hidden states and output head, from which a chunked
    # loss computes its log-probs a chunk of positions at a time (never [B, R, V] at once)
    hidden_B_R_D: torch.Tensor | None = None
    head: torch.nn.Module | None = None

    def as_loss_input(self) -> dict:
        if self.topk_ids_B_R_K is not None:
            return {"topk_logp_B_R_K": self.topk_logp_B_R_K, "topk_ids_B_R_K": self.topk_ids_B_R_K}
        if self.hidden_B_R_D is not None:
            return {"hidden_B_R_D": self.hidden_B_R_D, "head": self.head}
        assert self.logp_B_R_V is not None
        return {"logp_B_R_V": self.logp_B_R_V}

    def to(self, device: torch.device | str) -> TeacherScores:
        move = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                for k, v in self.__dict__.items()}
        return TeacherScores(**move)


@torch.no_grad()
def score(teacher: PreTrainedModel, rollout: Rollout, need: str = "sampled", top_k: int = 0,
          with_entropy: bool = False, vocab: int | None = None,
          prompts: list[list[int]] | None = None) -> TeacherScores:
    """Teacher log-probs of the rollout's tokens; `need` in {sampled, full, topk, hidden}.
    `hidden` (a chunkable teacher; `models.chunkable`) returns the last hidden states and the
    output head instead of [B, R, V] log-probs, and computes the sampled tokens' log-probs a
    chunk of positions at a time.

    `prompts`, when given, are the teacher's own prompt ids (its system prompt or chat
    template); the same response tokens follow them, so positions stay aligned. Runs on the
    teacher's own device and dtype; results come back as float32 on the rollout's device.
    """
    device = next(teacher.parameters()).device
    ids, attn, P = rollout.ids_B_T, rollout.attn_B_T, rollout.prompt_len
    if prompts is not None:
        t_ids, t_attn = left_pad(prompts, pad_id=0)  # padding is masked; any id will do
        resp = rollout.response_ids_B_R
        ids = torch.cat([t_ids, resp], dim=1)
        attn = torch.cat([t_attn, rollout.response_mask_B_R], dim=1)
        P = t_ids.size(1)
    if need == "hidden":
        return _hidden_scores(teacher, rollout, ids.to(device), attn.to(device), P, vocab)
    logits = response_logits(teacher, ids.to(device), attn.to(device), P, vocab).float()
    logp_B_R_V = logits.log_softmax(-1)
    ids = rollout.response_ids_B_R.to(device)
    scores = TeacherScores(logp_B_R=logp_B_R_V.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
    if need == "full":
        scores.logp_B_R_V = logp_B_R_V
    elif need == "topk":
        vals, idx = torch.topk(logp_B_R_V, top_k, dim=-1)
        scores.topk_logp_B_R_K, scores.topk_ids_B_R_K = vals, idx
    elif need != "sampled":
        raise ValueError(f"need={need!r}: choose sampled, full or topk")
    if with_entropy:
        scores.entropy_B_R = entropy(logp_B_R_V)
    return scores.to(rollout.ids_B_T.device)


def _hidden_scores(teacher: PreTrainedModel, rollout: Rollout, ids: torch.Tensor,
                   attn: torch.Tensor, P: int, vocab: int | None) -> TeacherScores:
    """need="hidden": the last hidden states and head, and the sampled tokens' log-probs
    computed per chunk of positions (CHUNK_ELEMENTS logits at a time)."""
    with hidden_states_out(teacher) as head:
        h = response_logits(teacher, ids, attn, P)  # (B, R, D): the head is an identity here
    picked = rollout.response_ids_B_R.to(h.device)
    chunk = positions_per_chunk(h.size(0), vocab or head.weight.size(0))
    parts = []
    for lo in range(0, h.size(1), chunk):
        logp = head_logprobs(head, h[:, lo:lo + chunk], vocab)
        parts.append(logp.gather(-1, picked[:, lo:lo + chunk].unsqueeze(-1)).squeeze(-1))
    scores = TeacherScores(logp_B_R=torch.cat(parts, dim=1), hidden_B_R_D=h)
    scores = scores.to(rollout.ids_B_T.device)
    scores.head = head  # stays where the teacher is
    return scores


class Teacher(Protocol):
    """What the loop, the diagnostics and the probe need from a teacher."""

    full_distributions: bool  # can return (B, R, V) log-probs and entropy
    model: PreTrainedModel | None  # the model itself when it is in this process (the probe)

    def score(self, rollout: Rollout, need: str = "sampled", top_k: int = 0,
              with_entropy: bool = False, prompts: list[list[int]] | None = None
              ) -> TeacherScores: ...


class LocalTeacher:
    """A teacher model in this process (its own device and dtype)."""

    full_distributions = True

    def __init__(self, model: PreTrainedModel, vocab: int | None = None):
        self.model, self.vocab = model, vocab

    def score(self, rollout: Rollout, need: str = "sampled", top_k: int = 0,
              with_entropy: bool = False, prompts: list[list[int]] | None = None
              ) -> TeacherScores:
        return score(self.model, rollout, need, top_k, with_entropy, self.vocab, prompts)


class RemoteTeacher:
    """Scores rollouts with a teacher server (hopd serve-teacher, or vLLM): sends prompt +
    response tokens of each rollout row (padding removed), rebuilds the (B, R) log-probs and the
    (B, R, k) top-k, with a timeout and retries; an unreachable server or a tokenizer mismatch
    gives a clear error before training starts."""

    full_distributions = False  # top-k at most
    model = None

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 3, token: str = ""):
        self.url = url.rstrip("/")
        self.timeout_s, self.retries = timeout_s, retries
        self.token = token or os.environ.get(TOKEN_ENV, "")
        self.model_name: str | None = None

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST (or GET) with retries and backoff on what a busy or restarting server does: a
        refused or reset connection, a timeout, a reply cut short or that is not HTTP, and HTTP
        429/500/502/503/504 (waiting as long as its Retry-After asks, up to a minute). Other HTTP
        errors are answers: no retry. The answer is parsed as JSON."""
        data = json.dumps(body).encode() if body is not None else None
        last: Exception | str | None = None
        for attempt in range(self.retries + 1):
            headers = {"Content-Type": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            req = urllib.request.Request(self.url + path, data=data, headers=headers)
            wait = min(8.0, 0.25 * 2 ** attempt)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:200]
                if e.code not in RETRY_STATUS or attempt == self.retries:
                    raise TeacherRefused(f"teacher server {self.url}{path} answered HTTP "
                                         f"{e.code}: {detail}") from None
                last = f"HTTP {e.code}"
                wait = max(wait, retry_after(e.headers.get("Retry-After")))
                time.sleep(wait)
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError,
                    http.client.HTTPException) as e:  # HTTPException: cut short, or not HTTP
                last = e if str(e) else type(e).__name__
                time.sleep(wait)
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

    def served_model(self) -> str:
        """The name the server serves its model under (vLLM refuses requests for another)."""
        if self.model_name is None:
            try:
                answer = self._request("/v1/models")
            except TeacherRefused:  # it answers, but lists no models: any name will do
                self.model_name = "teacher"
                return self.model_name
            data = answer.get("data") if isinstance(answer, dict) else None
            ids = [m.get("id") for m in data or [] if isinstance(m, dict)]
            if not ids or not isinstance(ids[0], str):
                raise TeacherUnavailable(f"the teacher server at {self.url} lists no model at "
                                         f"/v1/models ({str(answer)[:80]}); is it a vLLM or "
                                         "`hopd serve-teacher` server?")
            self.model_name = ids[0]
        return self.model_name

    def check_tokenizer(self, tok: PreTrainedTokenizerBase) -> None:
        answer = self._request("/tokenize", {"model": self.served_model(), "prompt": PROBE,
                                             "add_special_tokens": False})
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
        body = {"model": self.served_model(), "prompt": seqs, "max_tokens": 1,
                "prompt_logprobs": k}
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
