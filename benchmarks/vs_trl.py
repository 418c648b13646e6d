"""hopd's full-horizon OPD step against TRL's GKDTrainer (on-policy: lmbda=1, beta=1, T=1).

Same student, teacher, tokenizer, prompts, batch and horizon H = L. Both sample with the student
and train on those samples against the teacher; every rollout is exactly H tokens long in both
(EOS disabled for hopd; `min_new_tokens = max_new_tokens = H` for TRL), so they do the same
sampling work. Timed per optimizer step, excluding model loading and warm-up steps, in
alternating rounds (TRL, hopd, TRL, hopd, ...) so that machine drift hits both alike.

hopd runs twice: with `loss.kind=jsd, beta=1` (the full-vocabulary reverse KL, the same objective
as GKD with beta=1) and with its default `sampled_rkl`.

    pip install -e ".[bench]"          # trl, datasets
    python benchmarks/vs_trl.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    commit,
    machine,
    median,
    print_table,
    testbed_models,
    testbed_prompts,
)

from hopd.context import make_optimizer  # noqa: E402
from hopd.distill import DistillConfig, LossConfig  # noqa: E402
from hopd.distill_config import OptimConfig  # noqa: E402
from hopd.rollout import HFSampler, row_seeds  # noqa: E402
from hopd.step import opd_step  # noqa: E402
from hopd.tasks import PromptSource  # noqa: E402


def trl_steps(student, teacher, tok, rows, batch: int, H: int, steps: int, warmup: int,
              device: str, setup=None, checkpointing: bool = True,
              bf16: bool | None = None) -> list[float]:
    """Seconds per optimizer step of GKDTrainer, after `warmup` steps. `setup(trainer)` runs
    once the trainer is built (benchmarks/trl_horizon.py attaches hopd's HorizonCallback);
    `checkpointing` is TRL's gradient checkpointing, on by default in GKDConfig; `bf16`, when
    given, overrides GKDConfig's default (bf16 autocast, on even on a CPU)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = GKDConfig(
            output_dir=tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            max_steps=warmup + steps, learning_rate=1e-6, lmbda=1.0, beta=1.0, temperature=1.0,
            max_new_tokens=H, max_length=4096, logging_steps=10**6, save_strategy="no",
            report_to=[], use_cpu=not device.startswith("cuda"), dataloader_num_workers=0,
            disable_tqdm=True, seed=0, gradient_checkpointing=checkpointing,
            **({} if bf16 is None else {"bf16": bf16}),
        )
        timer = Timer()
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[timer])
        trainer.generation_config.min_new_tokens = H  # every rollout exactly H tokens
        if setup is not None:
            setup(trainer)
        trainer.train()
    return timer.times[warmup:]


def hopd_steps(student, teacher, tok, prompts, batch: int, H: int, steps: int, warmup: int,
               loss: LossConfig, device: str) -> list[float]:
    cfg = DistillConfig(batch_size=batch, loss=loss)
    opt = make_optimizer(list(student.parameters()), OptimConfig(lr=1e-6))  # as hopd distill
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    times = []
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opd_step(student, teacher, opt, prompts[:batch], H, cfg, vocab=vocab,
                 sampler=HFSampler(student, -1, tok.pad_token_id),
                 row_seeds=row_seeds(0, i, range(batch)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="testbed:student", help="path, testbed:*, or random")
    ap.add_argument("--teacher", default="testbed:teacher", help="path, testbed:*, or random")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--horizon", type=int, default=0, help="H (0: the testbed's full L)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        print("vs_trl: TRL is not installed. Install the bench extra: pip install -e '.[bench]'")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    student, teacher, tok = testbed_models(args.student, args.teacher, args.device)
    prompts, L = testbed_prompts(tok, args.batch)
    H = args.horizon or L
    src = PromptSource("chain:default")
    rows = [{"messages": [{"role": "user", "content": e.prompt},
                          {"role": "assistant", "content": e.response}]}
            for e in src.train_batch(0, args.batch * (args.steps + args.warmup) * 2, seed=123)]
    runs = {"TRL GKDTrainer (JSD beta=1)": [], "hopd OPD, full-vocab rKL (jsd beta=1)": [],
            "hopd OPD, sampled rKL": []}
    for r in range(args.rounds):
        runs["TRL GKDTrainer (JSD beta=1)"] += trl_steps(student, teacher, tok, rows, args.batch,
                                                         H, args.steps, args.warmup, args.device)
        runs["hopd OPD, full-vocab rKL (jsd beta=1)"] += hopd_steps(
            student, teacher, tok, prompts, args.batch, H, args.steps, args.warmup,
            LossConfig(kind="jsd", beta=1.0), args.device)
        runs["hopd OPD, sampled rKL"] += hopd_steps(
            student, teacher, tok, prompts, args.batch, H, args.steps, args.warmup,
            LossConfig(kind="sampled_rkl"), args.device)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    trl_s = median(runs["TRL GKDTrainer (JSD beta=1)"])
    print(f"\nhopd vs TRL GKDTrainer: {machine(args.device)}, commit {commit()}")
    print(f"student {args.student}, teacher {args.teacher}, batch {args.batch}, H={H} (rollouts "
          f"forced to H), median of {args.rounds} x {args.steps} steps after warm-up\n")
    print_table(["trainer", "s/step", "sampled tok/s", "speed-up vs TRL"],
                [[k, f"{median(v):.3f}", f"{args.batch * H / median(v):.0f}",
                  f"{trl_s / median(v):.2f}x"] for k, v in runs.items()])
    print(json.dumps({
        "trl_s_per_step": trl_s,
        "hopd_jsd_s_per_step": median(runs["hopd OPD, full-vocab rKL (jsd beta=1)"]),
        "hopd_sampled_rkl_s_per_step": median(runs["hopd OPD, sampled rKL"]),
        "speedup_same_loss": trl_s / median(runs["hopd OPD, full-vocab rKL (jsd beta=1)"]),
        "speedup_default_loss": trl_s / median(runs["hopd OPD, sampled rKL"]),
        "batch": args.batch, "H": H, "device": args.device}))


if __name__ == "__main__":
    main()
