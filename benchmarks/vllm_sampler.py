"""Rollout throughput: hopd's static-cache sampler against an in-process vLLM engine.

The same model, prompts and sampling (temperature 1, per-row seeds) through both engines'
`Sampler.sample`; every row decodes exactly H tokens (EOS disabled). The model has the bundled
teacher's shape (4 layers, hidden 128, head size 32, which vLLM's CPU kernels support) with
random weights and 2,048 positions, so H = 1,600 fits. One timed run per cell after a warm-up,
both engines interleaved; prints a table and one JSON line.

    python benchmarks/vllm_sampler.py                   # batches 32 and 256, H 160 and 1600
    python benchmarks/vllm_sampler.py --batches 32 --horizons 160
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import build_testbed_tokenizer, commit, machine, print_table, testbed_prompts  # noqa: E402

from hopd.models import TINY_SIZES, load_model, save_checkpoint, tiny_llama  # noqa: E402
from hopd.rollout import HFSampler, row_seeds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--horizons", default="160,1600")
    ap.add_argument("--kv-gib", type=float, default=4.0, help="vLLM's CPU KV cache")
    args = ap.parse_args()
    from hopd.vllm_sampler import VLLMSampler

    assert TINY_SIZES["teacher"].hidden // TINY_SIZES["teacher"].heads == 32
    tok = build_testbed_tokenizer()
    batches = [int(b) for b in args.batches.split(",")]
    horizons = [int(h) for h in args.horizons.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        save_checkpoint(tiny_llama("teacher", tok, max_positions=2048, seed=0), tok, path)
        model = load_model(str(path)).eval()
        hf = HFSampler(model, -1, tok.pad_token_id)
        t0 = time.perf_counter()
        vl = VLLMSampler(model, str(path), eos_id=-1, pad_id=tok.pad_token_id, max_len=2048,
                         kv_cache_gib=args.kv_gib, max_num_seqs=max(batches))
        start_s = time.perf_counter() - t0
        rows = []
        for B in batches:
            prompts, _ = testbed_prompts(tok, B)
            for H in horizons:
                seeds = row_seeds(0, 0, range(B))
                cell = {"batch": B, "H": H}
                for name, engine in (("hf", hf), ("vllm", vl)):
                    engine.sample(prompts, 8, row_seeds=seeds)  # warm-up
                    t = time.perf_counter()
                    r = engine.sample(prompts, H, row_seeds=seeds)
                    dt = time.perf_counter() - t
                    assert r.num_tokens == B * H, (name, r.num_tokens)
                    cell[f"{name}_tok_s"] = B * H / dt
                cell["vllm_vs_hf"] = cell["vllm_tok_s"] / cell["hf_tok_s"]
                rows.append(cell)
                print(f"B={B} H={H}: hf {cell['hf_tok_s']:.0f} tok/s, vLLM "
                      f"{cell['vllm_tok_s']:.0f} tok/s", file=sys.stderr, flush=True)
    print(f"\nRollout throughput, hf fast sampler vs in-process vLLM: {machine('cpu')}, "
          f"commit {commit()}, torch threads {torch.get_num_threads()}")
    print(f"model: the bundled teacher's shape, random weights; temperature 1, every row H "
          f"tokens; one timed run per cell; vLLM engine start {start_s:.0f} s\n")
    print_table(["batch", "H", "hf tokens/s", "vLLM tokens/s", "vLLM / hf"],
                [[c["batch"], c["H"], f"{c['hf_tok_s']:.0f}", f"{c['vllm_tok_s']:.0f}",
                  f"{c['vllm_vs_hf']:.2f}x"] for c in rows])
    print(json.dumps({"rows": rows, "vllm_start_s": start_s}))


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
