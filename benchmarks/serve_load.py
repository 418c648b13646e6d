"""Load on `hopd serve-teacher`: a burst of clients, slow clients, and what one request may cost.

Starts the server in this process on a loopback port with the bundled teacher (or --model), then:
1. N concurrent clients each send one small completions request: how many got 200, 503 (busy,
   with Retry-After) or nothing (a reset), and the slowest answer;
2. 8 clients open connections and trickle one header line each, then stop: how long /health
   takes while they hang, and whether they are cut at the header deadline;
3. the largest request the caps allow (tokens x (k + 1) = MAX_WORK), timed, and one past the cap.

    python benchmarks/serve_load.py [--clients 100] [--model testbed:teacher]

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from hopd import serve
from hopd.models import load_model, load_tokenizer


def raw(port: int, data: bytes, wait: float = 120.0) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return b""  # reset or refused


def post(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


def status(answer: bytes) -> str:
    return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "reset"


def burst(port: int, clients: int) -> dict:
    request = post({"prompt": [[1, 5, 6, 7, 8]], "prompt_logprobs": 4})

    def one(_: int) -> tuple[str, float]:
        t0 = time.perf_counter()
        return status(raw(port, request)), time.perf_counter() - t0

    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, range(clients)))
    codes = [c for c, _ in out]
    return {"clients": clients, "ok_200": codes.count("200"), "busy_503": codes.count("503"),
            "reset": codes.count("reset"), "slowest_s": max(t for _, t in out)}


def slow_clients(port: int) -> dict:
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nX-Slow: 1\r\n")
        socks.append(s)
    time.sleep(0.5)
    t0 = time.perf_counter()
    health = status(raw(port, b"GET /health HTTP/1.0\r\n\r\n"))
    health_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in socks:
        s.settimeout(serve.HEADER_TIMEOUT_S + 10)
        try:
            s.recv(10)
        except OSError:
            pass
        s.close()
    return {"health_status": health, "health_s": health_s,
            "slow_clients_cut_after_s": time.perf_counter() - t0 + 0.5}


def capped(port: int, vocab: int) -> dict:
    k = 64
    tokens = serve.MAX_WORK // (k + 1)
    prompt = [(7 * i) % vocab for i in range(1000)]
    prompts = [prompt] * (tokens // 1000)
    t0 = time.perf_counter()
    at_cap = status(raw(port, post({"prompt": prompts, "prompt_logprobs": k})))
    at_cap_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    past = status(raw(port, post({"prompt": prompts + [prompt], "prompt_logprobs": k})))
    return {"cap_entries": serve.MAX_WORK, "at_cap_tokens": len(prompts) * 1000, "k": k,
            "at_cap_status": at_cap, "at_cap_s": at_cap_s, "past_cap_status": past,
            "past_cap_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed:teacher")
    ap.add_argument("--clients", type=int, default=100)
    args = ap.parse_args()
    model, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    server = serve.make_server(model, tok, "t", "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    res = {"model": args.model, "workers": serve.WORKERS, "backlog": serve.BACKLOG,
           **burst(port, args.clients), **slow_clients(port),
           **capped(port, model.config.vocab_size)}
    server.shutdown()
    print(f"| clients | 200 | 503 (Retry-After) | reset | slowest (s) |\n|---|---|---|---|---|\n"
          f"| {res['clients']} | {res['ok_200']} | {res['busy_503']} | {res['reset']} | "
          f"{res['slowest_s']:.2f} |\n")
    print("| 8 slow clients: /health | answered in (s) | slow ones cut after (s) |\n"
          "|---|---|---|\n"
          f"| {res['health_status']} | {res['health_s']:.3f} | "
          f"{res['slow_clients_cut_after_s']:.1f} |\n")
    print(f"| request | tokens | k | status | time (s) |\n|---|---|---|---|---|\n"
          f"| at the cap ({serve.MAX_WORK:,} entries) | {res['at_cap_tokens']} | {res['k']} | "
          f"{res['at_cap_status']} | {res['at_cap_s']:.2f} |\n"
          f"| one prompt past it | {res['at_cap_tokens'] + 1000} | {res['k']} | "
          f"{res['past_cap_status']} | {res['past_cap_s']:.2f} |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
