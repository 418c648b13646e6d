"""Sampler throughput: hopd's sampler (fast static-cache path and generic path) vs `generate`.

Same model, same prompts, same batch, same number of new tokens: every row decodes exactly H
tokens (EOS disabled for hopd; `min_new_tokens=H` for `generate`), sampling at temperature 1.
Greedy outputs of all three are checked to be identical before timing. Reports decode tokens/s
(median over repeats, after a warm-up) and ends with one JSON line.

    python benchmarks/sampler.py            # the table in BENCHMARKS.md
    python benchmarks/sampler.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    build_testbed_tokenizer,
    commit,
    machine,
    median,
    print_table,
    random_real_shape,
    testbed_models,
    testbed_prompts,
    timed,
)

from hopd.rollout import left_pad, sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed:student",
                    help="path, testbed:student|teacher, or random")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=0, help="new tokens (0: the testbed's L)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.repeats = 16, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model.startswith("random:"):
        model, tok = random_real_shape(args.model, args.device), build_testbed_tokenizer()
    else:
        model, _, tok = testbed_models(args.model, "random", args.device)
    model.eval()
    prompts, L = testbed_prompts(tok, args.batch)
    H = args.tokens or L
    ids, attn = left_pad(prompts, tok.pad_token_id, args.device)

    def hopd(fast: bool, greedy: bool = False, graph: bool = True):
        return sample(model, prompts, H, eos_id=-1, pad_id=tok.pad_token_id, greedy=greedy,
                      fast=fast, generator=torch.Generator(device=args.device).manual_seed(0),
                      cuda_graph=graph)

    def generate(greedy: bool = False):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=H,
                                  min_new_tokens=H, do_sample=not greedy, temperature=1.0,
                                  top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)

    # the same greedy tokens from all three, up to and including each row's EOS (for timing,
    # `generate` suppresses EOS through min_new_tokens while hopd just ignores it, so the
    # tokens after the EOS differ; the work does not)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=H,
                             do_sample=False, pad_token_id=tok.pad_token_id)[:, ids.size(1):]
    cuda = args.device.startswith("cuda")
    exact = next(model.parameters()).dtype == torch.float32
    same = []
    for fast, graph in [(True, True), (False, True)] + [(True, False)] * cuda:
        ours = hopd(fast, greedy=True, graph=graph).response_ids_B_R
        for a, b in zip(ours.tolist(), ref.tolist()):
            n = b.index(tok.eos_token_id) + 1 if tok.eos_token_id in b else len(b)
            # bf16: kernels round differently and near-ties flip; agreement is reported only
            assert a[:n] == b[:n] or not exact, "greedy outputs differ from generate"
            same.append(a[0] == b[0])
    check = "greedy outputs identical to generate's up to EOS" if exact else \
        f"bf16: first greedy token equal to generate's in {sum(same) / len(same):.0%} of rows"

    runs = {"hopd fast (static cache)": lambda: hopd(True)}
    if cuda:  # the same step run eagerly, kernel by kernel, instead of replayed as a graph
        runs["hopd fast, no CUDA graph"] = lambda: hopd(True, graph=False)
    runs.update({"hopd generic (model forward)": lambda: hopd(False),
                 "transformers generate": generate})
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so drift hits all alike
        for name, fn in runs.items():
            times[name].append(timed(fn, args.device))
    tok_s = {k: args.batch * H / median(v) for k, v in times.items()}
    base = tok_s["transformers generate"]
    print(f"\nSampler throughput: {machine(args.device)}, commit {commit()}")
    print(f"model {args.model}, batch {args.batch}, {H} new tokens per row, temperature 1, "
          f"median of {args.repeats}; {check}\n")
    print_table(["sampler", "s per batch", "tokens/s", "vs generate"],
                [[k, f"{median(times[k]):.3f}", f"{v:.0f}", f"{v / base:.2f}x"]
                 for k, v in tok_s.items()])
    print(json.dumps({**({"fast_eager_tok_s": tok_s["hopd fast, no CUDA graph"]} if cuda else {}),
                      "fast_tok_s": tok_s["hopd fast (static cache)"],
                      "generic_tok_s": tok_s["hopd generic (model forward)"],
                      "generate_tok_s": base,
                      "fast_vs_generate": tok_s["hopd fast (static cache)"] / base,
                      "batch": args.batch, "tokens": H, "device": args.device}))


if __name__ == "__main__":
    main()
