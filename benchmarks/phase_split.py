"""Where an on-policy distillation step spends its time: hopd, TRL's GKDTrainer and TRL's
DistillationTrainer, across model sizes, batches and horizons.

Every trainer samples with the student, scores with the teacher and trains on the same objective
(full-vocabulary reverse KL: hopd `loss.kind=jsd beta=1`, GKD `lmbda=1 beta=1`, Distillation
`beta=1`), with every rollout forced to exactly H tokens, temperature 1, AdamW, fp32. TRL runs
with its defaults except what must match or what a CPU run needs, each said in the table's
header: gradient checkpointing off and bf16 off (both on by default in TRL's configs; on a CPU
bf16 autocast alone made GKD's step 3.8x slower, see BENCHMARKS.md). Phases:

- generate: the student's sampling (hopd's sampler; GKD `generate_on_policy_outputs`;
  Distillation `_generate`);
- teacher: the teacher's forward (GKD: the whole model; Distillation: its backbone, its lm_head
  runs inside the chunked loss and is counted under learn);
- optim: the optimizer step;
- learn + other: the rest of the step (student forward, loss, backward, clipping, bookkeeping).

Cells are measured interleaved (hopd, GKD, Distillation in turn), medians of the timed steps
after a warm-up step. Prints one table and one JSON line.

    python benchmarks/phase_split.py                  # the table in BENCHMARKS.md
    python benchmarks/phase_split.py --sizes qwen2-0.5b --batches 8 --horizons 32 --steps 2
    python benchmarks/phase_split.py --sizes tiny --batches 8 --horizons 32 --steps 1
    python benchmarks/phase_split.py --sizes smollm2 --batches 8 --horizons 64,256   # the real pair
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    commit,
    machine,
    median,
    print_table,
    random_real_shape,
    smollm2_pair,
    testbed_models,
    testbed_prompts,
    trl_rows,
)

from hopd.context import make_optimizer  # noqa: E402
from hopd.distill import DistillConfig, LossConfig  # noqa: E402
from hopd.distill_config import OptimConfig  # noqa: E402
from hopd.models import build_testbed_tokenizer  # noqa: E402
from hopd.rollout import HFSampler, row_seeds  # noqa: E402
from hopd.step import opd_step  # noqa: E402

# student / teacher shapes: (layers, hidden); heads = hidden / 32, MLP = 4 x hidden
SIZES = {"tiny": ((2, 128), (4, 256)), "small": ((4, 256), (8, 512))}
PHASES = ("generate", "teacher", "optim", "learn")


def llama(layers: int, hidden: int, tok, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True))


def models(size: str):
    if size == "smollm2":  # the real pair: the benchmarks' 24-layer prune and its teacher
        return smollm2_pair("cpu")
    if size == "qwen2-0.5b":  # the real layout with random weights, fp32; the teacher alike
        tok = build_testbed_tokenizer()  # its ids are valid in Qwen's larger vocabulary
        return (random_real_shape("random:qwen2-0.5b", "cpu", torch.float32),
                random_real_shape("random:qwen2-0.5b", "cpu", torch.float32).eval(), tok)
    if size == "testbed":
        return testbed_models("testbed:student", "testbed:teacher", "cpu", max_positions=2048)
    tok = build_testbed_tokenizer()
    (sl, sh), (tl, th) = SIZES[size]
    return llama(sl, sh, tok, 1), llama(tl, th, tok, 2).eval(), tok


class Clock:
    """Seconds per phase within the current step."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, phase: str, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.now[phase] += time.perf_counter() - t
        return timed


class StepTimer(TrainerCallback):
    def __init__(self, clock: Clock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kw):
        self.clock.now = defaultdict(float)
        self.t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.t_opt = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kw):
        self.clock.now["optim"] += time.perf_counter() - self.t_opt

    def on_step_end(self, args, state, control, **kw):
        step = time.perf_counter() - self.t0
        now = self.clock.now
        now["learn"] = step - now["generate"] - now["teacher"] - now["optim"]
        self.clock.steps.append({"step": step, **now})


def trl_run(kind: str, student, teacher, tok, rows, B: int, H: int, steps: int) -> list[dict]:
    """`steps` + 1 optimizer steps of a TRL trainer; the phase split of all but the first."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset

    clock = Clock()
    common = dict(per_device_train_batch_size=B, gradient_accumulation_steps=1,
                  max_steps=steps + 1, learning_rate=1e-6, temperature=1.0, logging_steps=10**6,
                  save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                  disable_tqdm=True, seed=0, gradient_checkpointing=False, bf16=False)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "gkd":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(output_dir=tmp, lmbda=1.0, beta=1.0, max_new_tokens=H,
                             max_length=4096, **common)
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                                 train_dataset=Dataset.from_list(rows["messages"]),
                                 processing_class=tok, callbacks=[StepTimer(clock)])
            trainer.generation_config.min_new_tokens = H  # every rollout exactly H tokens
            trainer.generate_on_policy_outputs = clock.wrap(
                "generate", trainer.generate_on_policy_outputs)
            trainer.teacher_model.forward = clock.wrap("teacher", trainer.teacher_model.forward)
        else:
            from trl import DistillationConfig, DistillationTrainer

            args = DistillationConfig(output_dir=tmp, beta=1.0, max_completion_length=H,
                                      generation_kwargs={"min_new_tokens": H}, **common)
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=Dataset.from_list(rows["prompts"]),
                                          processing_class=tok, callbacks=[StepTimer(clock)])
            trainer._generate = clock.wrap("generate", trainer._generate)
            backbone = trainer.accelerator.unwrap_model(trainer.teacher_model).model
            backbone.forward = clock.wrap("teacher", backbone.forward)
        trainer.train()
    return clock.steps[1:]


def hopd_run(student, teacher, tok, prompts, B: int, H: int, steps: int,
             sampler_dtype: torch.dtype | None = None) -> list[dict]:
    """hopd's step; with `sampler_dtype` (hopd_bf16: `sampling.dtype=bfloat16`), rollouts come
    from a bf16 copy of the student, synced after each step (the sync counted in learn+other)."""
    cfg = DistillConfig(batch_size=B, loss=LossConfig(kind="jsd", beta=1.0))
    opt = make_optimizer(list(student.parameters()), OptimConfig(lr=1e-6))  # as hopd distill
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    sampler = HFSampler(student, -1, tok.pad_token_id,  # EOS off: every row H tokens
                        dtype=sampler_dtype)
    out = []
    for i in range(steps + 1):
        t = time.perf_counter()
        _, _, st = opd_step(student, teacher, opt, prompts[:B], H, cfg, sampler=sampler,
                            vocab=vocab, row_seeds=row_seeds(0, i, range(B)))
        sampler.sync()
        step = time.perf_counter() - t
        out.append({"step": step, "generate": st.sample_time_s, "teacher": st.teacher_time_s,
                    "optim": st.optim_time_s,
                    "learn": step - st.sample_time_s - st.teacher_time_s - st.optim_time_s})
    return out[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="testbed,tiny,small")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--horizons", default="32,128")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per trainer and cell")
    ap.add_argument("--trainers", default="hopd,gkd,distillation",
                    help="hopd, hopd_bf16 (sampling.dtype=bfloat16), gkd, distillation")
    ap.add_argument("--data", default="chain:default",
                    help="prompts: chain:default (74 tokens), chain:tiny (20), chain:hard (206)")
    args = ap.parse_args()
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        print("phase_split: TRL is not installed. Install the bench extra: "
              "pip install -e '.[bench]'")
        return
    warnings.filterwarnings("ignore")
    trainers = args.trainers.split(",")
    cells = []
    for size in args.sizes.split(","):
        data = "chat:prompts" if size == "smollm2" else args.data  # real text for the real pair
        rows = trl_rows(data)
        for B in [int(b) for b in args.batches.split(",")]:
            for H in [int(h) for h in args.horizons.split(",")]:
                cell = {"size": size, "batch": B, "H": H}
                for name in trainers:
                    student, teacher, tok = models(size)  # fresh weights for every trainer
                    prompts, _ = testbed_prompts(tok, B, data)
                    cell["P"] = round(sum(map(len, prompts)) / len(prompts))
                    if name.startswith("hopd"):
                        steps = hopd_run(student, teacher, tok, prompts, B, H, args.steps,
                                         torch.bfloat16 if name == "hopd_bf16" else None)
                    else:
                        steps = trl_run(name, student, teacher, tok, rows, B, H, args.steps)
                    cell[name] = {k: median([s[k] for s in steps]) for k in ("step", *PHASES)}
                    # each trainer's numbers as soon as they exist: a trainer killed later (out
                    # of memory: GKDTrainer at B = 32, H = 256 on the real pair) loses no row
                    print(f"{size} B={B} H={H} {name}: " + ", ".join(
                        f"{k} {v:.3f}s" for k, v in cell[name].items()), file=sys.stderr,
                        flush=True)
                print(f"{size} B={B} H={H}: " + ", ".join(
                    f"{n} {cell[n]['step']:.3f}s" for n in trainers), file=sys.stderr, flush=True)
                cells.append(cell)
    print(f"\nOPD step split by phase: {machine('cpu')}, commit {commit()}, threads "
          f"{torch.get_num_threads()}")
    print(f"prompts of P tokens (mean; {args.data}, chat:prompts for smollm2), rollouts forced "
          f"to H, fp32, median of {args.steps} steps after "
          "1 warm-up; TRL: gradient checkpointing off, bf16 off (both on by default); sizes: "
          "testbed = the bundled 3x96 student / 4x128 teacher, tiny = 2x128 / 4x256, "
          "small = 4x256 / 8x512 (layers x hidden), qwen2-0.5b = Qwen2-0.5B's layout with "
          "random weights for both, smollm2 = SmolLM2-135M-Instruct (30 layers) and its "
          "24-layer prune (the real-pair recipe's first student, real weights)\n")
    bases = [n for n in ("hopd", "hopd_bf16") if n in trainers]  # a ratio column for each
    head = ["size", "P", "B", "H", "trainer", "s/step", "generate", "teacher", "learn+other",
            "optim", *(f"/ {b}" for b in bases)]
    table = []
    for c in cells:
        for n in trainers:
            s = c[n]
            ratios = [f"{s['step'] / c[b]['step']:.2f}x" if n != b else "" for b in bases]
            table.append([c["size"], c["P"], c["batch"], c["H"], n, f"{s['step']:.3f}",
                          *(f"{s[p]:.3f}" for p in ("generate", "teacher", "learn", "optim")),
                          *ratios])
    print_table(head, table)
    print(json.dumps({"cells": cells}))


if __name__ == "__main__":
    main()
