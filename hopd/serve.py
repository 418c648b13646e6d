"""A teacher in another process or machine, over HTTP, with vLLM's `prompt_logprobs` semantics.

Server (`hopd serve-teacher MODEL`): POST /v1/completions with token-id prompts, `max_tokens: 1`
and `prompt_logprobs: k` answers, per prompt, a list with one entry per prompt token: None for the
first token, then a dict {token_id: {"logprob", "rank", "decoded_token"}} holding the actual
token and the k most likely ones at that position, as vLLM's OpenAI-compatible server does. So a
vLLM or SGLang server of the same teacher can stand in for it. POST /tokenize and GET /v1/models
work as in vLLM (the tokenizer check uses /tokenize).

The client side (`hopd.teacher.RemoteTeacher`) scores rollouts against such a server.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hopd.teacher import TOKEN_ENV

# ---------------------------------------------------------------------------------------------
# Server


class TokenTexts(dict):
    """Each token id's decoded text, decoded once: an answer with k entries per position
    otherwise decodes k x T tokens one call at a time (most of a large request's time)."""

    def __init__(self, tok: PreTrainedTokenizerBase):
        super().__init__()
        self.tok = tok

    def __missing__(self, i: int) -> str:
        text = self[i] = self.tok.decode([i])
        return text


def prompt_logprobs(model: PreTrainedModel, tok: PreTrainedTokenizerBase, ids: list[int],
                    k: int, texts: TokenTexts | None = None
                    ) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM-style prompt logprobs of one token sequence (no padding)."""
    texts = texts if texts is not None else TokenTexts(tok)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    logp = logits.log_softmax(-1)  # (T, V): row t predicts token t + 1
    actual_T = torch.tensor(ids[1:], device=device)
    actual_lp = logp[:-1].gather(-1, actual_T[:, None])  # (T-1, 1)
    ranks = ((logp[:-1] > actual_lp).sum(-1) + 1).tolist()  # one pass, not one per row
    actual_lp = actual_lp[:, 0].tolist()
    if k > 0:
        top_vals, top_idx = torch.topk(logp[:-1], k, dim=-1)
        top_vals, top_idx = top_vals.tolist(), top_idx.tolist()
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for t in range(1, len(ids)):
        actual = ids[t]
        entries: dict[str, dict[str, Any]] = {str(actual): {
            "logprob": actual_lp[t - 1], "rank": ranks[t - 1], "decoded_token": texts[actual]}}
        if k > 0:
            for r, (v, i) in enumerate(zip(top_vals[t - 1], top_idx[t - 1]), start=1):
                entries.setdefault(str(i), {"logprob": v, "rank": r,
                                            "decoded_token": texts[i]})
        out.append(entries)
    return out


# What one request may cost, and how long a client may take. The model runs one request at a
# time; a request holds it for about MAX_WORK scored entries' worth of work at most (a forward
# pass over MAX_TOKENS tokens plus (k + 1) entries per token), a few seconds on a CPU for a
# small teacher. Everything past these limits gets a 4xx naming the limit, at once.
MAX_BODY_BYTES = 8 * 2**20  # request body
MAX_PROMPTS = 1024  # prompts per request
MAX_TOKENS = 65_536  # prompt tokens per request, over all its prompts
MAX_LOGPROBS = 128  # largest prompt_logprobs k (vLLM's own default limit is 20)
MAX_WORK = 2**21  # tokens x (k + 1): the log-prob entries one answer may hold
MAX_TOKENIZE_CHARS = 200_000  # text per /tokenize request
HEADER_TIMEOUT_S = 10.0  # the request line and headers must arrive within this, in total
REQUEST_TIMEOUT_S = 60.0  # a client that stops sending its body is dropped after this long
WORKERS = 32  # connections served at once; past that a client gets 503 with Retry-After
BACKLOG = 256  # connections the kernel queues before accept (a burst is not reset)
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: 1\r\nContent-Length: 27\r\nConnection: close\r\n\r\n"
        b"{\"error\": \"server is busy\"}")


class _BoundedServer(ThreadingHTTPServer):
    """A threading server with at most `WORKERS` connections in service (a burst cannot start
    unbounded threads); one that finds none free gets 503 with Retry-After at once, and the
    accept queue is long enough that a burst of connections is answered, not reset."""

    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, *args: Any, workers: int = WORKERS, **kw: Any):
        super().__init__(*args, **kw)
        self.slots = threading.BoundedSemaphore(workers)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(BUSY)
            except OSError:
                pass
            finally:
                self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (or was cut at the header deadline) is not an error worth
        a traceback on the server's terminal; anything else still prints one."""
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            return
        super().handle_error(request, client_address)

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
    total = sum(len(p) for p in prompts)
    if total > MAX_TOKENS:
        raise BadRequest(413, f"{total} prompt tokens in one request: at most {MAX_TOKENS}; "
                         "split it")
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
    if total * (k + 1) > MAX_WORK:
        raise BadRequest(413, f"{total} tokens x (prompt_logprobs {k} + 1) = {total * (k + 1)} "
                         f"log-prob entries in one answer: at most {MAX_WORK}; send fewer "
                         "tokens per request or a smaller k")
    return prompts, k


def make_server(model: PreTrainedModel, tok: PreTrainedTokenizerBase, name: str, host: str,
                port: int, token: str = "", workers: int = WORKERS) -> ThreadingHTTPServer:
    """The teacher server. Unauthenticated unless `token` is set: then every request must carry
    `Authorization: Bearer TOKEN`. Malformed requests get a 4xx JSON error, never a dropped
    connection; bodies, prompts per request, tokens per prompt and k are capped."""
    lock = threading.Lock()  # one forward pass at a time
    vocab = model.config.vocab_size
    context = getattr(model.config, "max_position_embeddings", 0) or 0

    texts = TokenTexts(tok)

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # socket timeout: a stalled client frees its worker

        def log_message(self, *args: Any) -> None:  # keep stderr quiet
            pass

        def handle_one_request(self) -> None:
            """The request line and headers under one deadline in total: a client trickling
            header lines cannot hold a connection for longer than HEADER_TIMEOUT_S (the socket
            timeout alone restarts at every line)."""
            timer = threading.Timer(HEADER_TIMEOUT_S, self._cut)
            self._headers_done = False
            timer.start()
            try:
                super().handle_one_request()
            finally:
                timer.cancel()

        def _cut(self) -> None:
            if not self._headers_done:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        def parse_request(self) -> bool:
            ok = super().parse_request()
            self._headers_done = True  # the body has its own socket timeout
            return ok

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
                    if len(text) > MAX_TOKENIZE_CHARS:
                        raise BadRequest(413, f"/tokenize takes at most {MAX_TOKENIZE_CHARS} "
                                         f"characters, got {len(text)}")
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    self._send(200, {"tokens": ids, "count": len(ids)})
                    return
                if self.path != "/v1/completions":
                    raise BadRequest(404, f"no route {self.path}")
                prompts, k = _check_completion(body, vocab, context)
                with lock:
                    choices = [{"index": i, "text": "", "finish_reason": "length",
                                "prompt_logprobs": prompt_logprobs(model, tok, p, k, texts)}
                               for i, p in enumerate(prompts)]
                self._send(200, {"object": "text_completion", "model": name,
                                 "choices": choices})
            except BadRequest as e:
                self._send(e.code, {"error": str(e)})
            except Exception as e:  # a server bug: answer, and keep serving
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    return _BoundedServer((host, port), Handler, workers=workers)


