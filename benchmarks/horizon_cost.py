"""Cost of one OPD step against the rollout horizon H.

For H in {L, 0.5L, 0.25L, 0.1L, 0.05L} with the same batch, times full OPD steps (sample, teacher
score, learn, AdamW) after warm-up and reports medians: step time and its split, sampled tokens
per second, and memory. Every rollout is forced to exactly H tokens (EOS disabled while
sampling), so each horizon does exactly the work its H implies.

Memory: on CUDA, the peak allocated during the step; on CPU, the learner's activation memory
(bytes autograd saves for backward, measured with saved-tensor hooks), since a process's peak RSS
cannot be reset between horizons. Ends with one JSON line.

    python benchmarks/horizon_cost.py            # the table in BENCHMARKS.md
    python benchmarks/horizon_cost.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import commit, machine, median, print_table, testbed_models, testbed_prompts  # noqa: E402

from hopd.context import make_optimizer  # noqa: E402
from hopd.distill import DistillConfig  # noqa: E402
from hopd.distill_config import OptimConfig  # noqa: E402
from hopd.rollout import HFSampler, row_seeds  # noqa: E402
from hopd.step import opd_step  # noqa: E402

FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="testbed:student", help="path, testbed:*, or random")
    ap.add_argument("--teacher", default="testbed:teacher", help="path, testbed:*, or random")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per horizon")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--budget", type=int, default=0,
                    help="full budget L (0: the testbed's); a longer L shows the cost with the "
                    "prompt's share small, as in real reasoning distillation (use random models)")
    ap.add_argument("--quick", action="store_true", help="batch 16, 2 timed steps, 1 warm-up")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup = 16, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    student, teacher, tok = testbed_models(args.student, args.teacher, args.device,
                                           max_positions=max(1024, 2 * args.budget))
    prompts, L = testbed_prompts(tok, args.batch)
    L = args.budget or L
    cfg = DistillConfig(batch_size=args.batch)
    opt = make_optimizer(list(student.parameters()), OptimConfig(lr=1e-6))  # as hopd distill
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    results = []
    for frac in FRACTIONS:
        H = max(1, round(frac * L))
        times, mems = [], []
        for i in range(args.warmup + args.steps):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            _, _, st = opd_step(student, teacher, opt, prompts, H, cfg, vocab=vocab,
                                sampler=HFSampler(student, -1, tok.pad_token_id),
                                row_seeds=row_seeds(0, i, range(len(prompts))))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                mems.append(torch.cuda.max_memory_allocated() / 2**20)
            else:
                mems.append(st.act_mem_mb)
            if i >= args.warmup:
                times.append(asdict(st))
        row = {k: median([t[k] for t in times])
               for k in ("sample_time_s", "teacher_time_s", "learn_time_s")}
        row["step_time_s"] = median([t["sample_time_s"] + t["teacher_time_s"] + t["learn_time_s"]
                                     for t in times])
        row.update(fraction=frac, H=H, mem_mb=max(mems),
                   sampled_tok_s=args.batch * H / row["sample_time_s"])
        results.append(row)
        print(f"H={H:4d} done: {row['step_time_s']:.3f}s/step", file=sys.stderr, flush=True)
    full = results[0]
    print(f"\nOPD step cost against horizon: {machine(args.device)}, commit {commit()}")
    P = max(len(p) for p in prompts)
    print(f"student {args.student}, teacher {args.teacher}, batch {args.batch}, prompt P={P}, "
          f"L={L}, {args.steps} timed steps after {args.warmup} warm-up, medians; rollouts "
          "forced to H\n")
    mem_label = "peak alloc MiB" if args.device.startswith("cuda") else "act. mem MiB"
    print_table(
        ["H", "H/L", "step s", "sample s", "teacher s", "learn s", "sampled tok/s", mem_label,
         "speed-up vs L", "mem vs L"],
        [[r["H"], f"{r['fraction']:.2f}", f"{r['step_time_s']:.3f}", f"{r['sample_time_s']:.3f}",
          f"{r['teacher_time_s']:.3f}", f"{r['learn_time_s']:.3f}", f"{r['sampled_tok_s']:.0f}",
          f"{r['mem_mb']:.1f}", f"{full['step_time_s'] / r['step_time_s']:.2f}x",
          f"{r['mem_mb'] / full['mem_mb']:.3f}"] for r in results])
    at = {f"{r['fraction']:g}": r for r in results}
    print(json.dumps({
        "speedup_at_0.1L": full["step_time_s"] / at["0.1"]["step_time_s"],
        "mem_ratio_at_0.1L": at["0.1"]["mem_mb"] / full["mem_mb"],
        "speedup_at_0.5L": full["step_time_s"] / at["0.5"]["step_time_s"],
        "step_time_s_at_L": full["step_time_s"], "L": L, "prompt_tokens": P,
        "batch": args.batch,
        "device": args.device, "memory_metric": mem_label}))


if __name__ == "__main__":
    main()
