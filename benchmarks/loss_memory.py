"""Peak memory of one full-vocabulary OPD learning step (teacher scores + loss + backward), the
direct [B, R, V] computation against the chunked one, at Qwen's vocabulary (151,936).

Each cell runs in a fresh process; its cost is the process's peak resident memory (ru_maxrss)
minus what it held after building the models, so it counts the teacher's scores, the student's
logits or hidden states, the loss's intermediates and the backward. Random models of Qwen2-0.5B's
layout at 2 layers (hidden 896, vocabulary 151,936), fp32, rkl, rollouts forced to length R.

    python benchmarks/loss_memory.py                      # B = 8, R = 1024 chunked; direct at
                                                          # B = 1 and 2 (B = 8 does not fit here)
    python benchmarks/loss_memory.py --cells direct:8:1024,chunked:8:1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cell(mode: str, B: int, R: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import hopd.losses as L
    from hopd.distill_config import LossConfig
    from hopd.rollout import Rollout
    from hopd.step import chunked, learn
    from hopd.teacher import LocalTeacher

    torch.manual_seed(0)
    shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True, max_position_embeddings=4096)
    student = Qwen2ForCausalLM(Qwen2Config(**shape))
    teacher = Qwen2ForCausalLM(Qwen2Config(**shape)).eval()
    P = 16
    ids = torch.randint(10, 150000, (B, P + R))
    r = Rollout(ids, torch.ones_like(ids), torch.ones(B, R), torch.zeros(B, R), P,
                torch.ones(B, dtype=torch.bool), R)
    if mode == "direct":
        L.CHUNK_ELEMENTS = 2 ** 62  # one chunk: the direct path
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    on = chunked(student, r, 151936, 1)
    scores = LocalTeacher(teacher, 151936).score(r, "hidden" if on else "full")
    out = learn(student, r, scores, LossConfig(kind="rkl"), vocab=151936)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "B": B, "R": R, "chunked": on, "peak_mib": (peak - base) / 1024,
            "seconds": time.perf_counter() - t0, "loss": out["loss"],
            "logits_gib": B * R * 151936 * 4 / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="direct:1:1024,direct:2:1024,chunked:1:1024,"
                                       "chunked:8:1024")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        mode, B, R = args.one.split(":")
        print(json.dumps(cell(mode, int(B), int(R))))
        return
    rows = []
    for c in args.cells.split(","):
        p = subprocess.run([sys.executable, __file__, "--one", c], capture_output=True,
                           text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                                     **__import__("os").environ})
        if p.returncode != 0:
            rows.append({"mode": c, "error": p.stderr.strip().splitlines()[-1:]})
            print(f"{c}: failed: {p.stderr[-300:]}", file=sys.stderr)
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"{c}: {rows[-1]['peak_mib']:.0f} MiB in {rows[-1]['seconds']:.0f}s",
              file=sys.stderr, flush=True)
    print("\n| path | B | R | one [B, R, V] fp32 tensor (GiB) | step peak above the models (MiB) "
          "| s | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | | | | failed: {r['error']} | | |")
            continue
        print(f"| {'chunked' if r['chunked'] else 'direct'} | {r['B']} | {r['R']} | "
              f"{r['logits_gib']:.2f} | {r['peak_mib']:,.0f} | {r['seconds']:.0f} | "
              f"{r['loss']:.5f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
