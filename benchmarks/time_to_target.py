"""Time to a held-out KL target on the real pair: TRL's GKDTrainer at the full horizon, hopd OPD
and hopd's recommended strategy, from the same warm-started student.

The arms: `gkd`; `hopd opd` (fp32 rollouts); `hopd opd bf16` (the real-pair recipe's OPD, which
is what the README recommends on a pair like this after the horizon study's round 2: the full
horizon, rollouts from a bfloat16 copy of the student); `hopd adaptive` (the adaptive horizon,
the testbed's candidate).

Every arm trains `--steps` optimizer steps of `--batch` prompts of `chat:prompts`' train half, with
the same optimizer and schedule (hopd's AdamW at `--lr`, 3 warm-up steps, cosine to a tenth; GKD
gets the same optimizer and LambdaLR), temperature 1,
fp32, on the full-vocabulary reverse KL (hopd `loss.kind=rkl`; GKD `lmbda=1 beta=1`: always
on-policy, reverse KL), and every `--eval-every` steps one evaluation scores it: hopd's own
`evaluate` on the same `--eval-n` test prompts with the same seeds (held-out reverse KL at the
full budget, exact over the vocabulary; the greedy answers' degeneration beside it).

- hopd arms run as `hopd distill` (the product as a user runs it); the adaptive arm's
  per-position diagnostics are part of its method, so their time is added to its training time.
- GKD runs in this process with TRL's defaults except what must match or what a CPU needs (its
  prompts are the same half, in its own shuffled order):
  gradient checkpointing off and bf16 off (on a CPU bf16 autocast made GKD's step 3.8x slower;
  BENCHMARKS.md), generation stops at the tokenizer's EOS as hopd's does. Its training time is
  the sum of its steps (on_step_begin -> on_step_end), evaluations excluded.

The target is set after the runs from hopd OPD's own curve, as `hopd report` sets it: 95% of the
way from the start's KL (the same student for every arm) to OPD's final KL. Time and tokens to
target are read at the first evaluation at or under it (so their resolution is `--eval-every`
steps). With `--seeds`, every arm runs once per seed (the seed sets the prompts' order and the
sampler's stream, and the evaluation's rollouts as `hopd distill`'s seed does, the same for every
arm of a seed), interleaved (seed 0's arms, then seed 1's), and each seed has its own target from
its own OPD run. Arms run one after the other: run it on a quiet machine (the load is printed).

    python benchmarks/time_to_target.py --student runs/real_pair/warm/model     # BENCHMARKS.md
    python benchmarks/time_to_target.py --student S --teacher T --data chain:tiny --steps 2 \\
        --eval-every 1 --eval-n 2 --budget 8 --batch 2                           # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import commit, machine, print_table, trl_rows  # noqa: E402

from hopd.context import make_optimizer  # noqa: E402
from hopd.distill_config import OptimConfig  # noqa: E402
from hopd.evaluate import evaluate  # noqa: E402
from hopd.models import load_model, load_tokenizer  # noqa: E402
from hopd.runs import load_run, spent_s  # noqa: E402
from hopd.schedules import warmup_cosine  # noqa: E402
from hopd.tasks import PromptSource  # noqa: E402
from hopd.teacher import LocalTeacher  # noqa: E402

ARMS = {  # hopd arms: the strategy's overrides (as `hopd compare` defines them)
    "hopd opd": ["horizon.kind=full", "diag_every=0"],
    "hopd opd bf16": ["horizon.kind=full", "diag_every=0", "sampling.dtype=bfloat16"],
    "hopd adaptive": ["horizon.kind=adaptive", "horizon.start=0.1", "diag_n=64", "diag_every=5"],
}


def hopd_arm(name: str, args, out: Path, seed: int) -> list[dict]:
    """One `hopd distill` run; its evaluations as {step, rkl, rkl_se, distinct_2, train_s,
    tokens} (the adaptive arm's readings counted as training time: `runs.spent_s`)."""
    run = out / f"{name.replace(' ', '_')}_seed{seed}"
    cmd = [sys.executable, "-m", "hopd", "distill", "--out", str(run), "--overwrite", "--quiet",
           f"seed={seed}", f"student={args.student}", f"teacher={args.teacher}",
           f"data={args.data}", f"budget={args.budget}", f"batch_size={args.batch}",
           f"max_steps={args.steps}", f"optim.lr={args.lr}", "optim.warmup_steps=3",
           "loss.kind=rkl", f"eval_every={args.eval_every}", f"eval_n={args.eval_n}",
           f"eval_kl_n={args.eval_n}", "eval_metric=rkl", "save_every=0", *ARMS[name]]
    subprocess.run(cmd, check=True)
    evals = [{"step": r["step"], "rkl": r["eval_rkl"], "rkl_se": r["eval_rkl_se"],
              "distinct_2": r["eval_distinct_2"], "train_s": spent_s(r),
              "tokens": r["sampled_tokens"]} for r in load_run(run).evals]
    return evals


def gkd_arm(args, out: Path, seed: int) -> list[dict]:
    """TRL's GKDTrainer from the same student, evaluated with hopd's `evaluate`."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = load_tokenizer(args.student)
    student = load_model(args.student)
    teacher = load_model(args.teacher).eval()
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    src = PromptSource(args.data)
    examples = src.eval_set(args.eval_n, seed=seed, part="test")  # what `hopd distill` evaluates
    rows = trl_rows(args.data, args.batch * args.steps, seed=seed)["messages"]
    evals: list[dict] = []
    clock = {"train_s": 0.0, "tokens": 0}

    def record(step: int) -> None:
        ev = evaluate(student, tok, examples, None, args.budget, seed=seed,
                      teacher=LocalTeacher(teacher, vocab), kl_n=args.eval_n, vocab=vocab)
        evals.append({"step": step, "rkl": ev["rkl"], "rkl_se": ev["rkl_se"],
                      "distinct_2": ev["distinct_2"], **clock})

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            record(0)

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            clock["train_s"] += time.perf_counter() - self.t0
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                record(state.global_step)

    config = GKDConfig(
        output_dir=str(out / f"gkd_seed{seed}"), lmbda=1.0, beta=1.0, temperature=1.0,
        max_new_tokens=args.budget, max_length=4096, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
        max_grad_norm=1.0, logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
        seed=seed, dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False,
        bf16=False)
    # hopd's optimizer and schedule (AdamW betas 0.9/0.95, fused; warm-up from a quarter, not
    # from 0 as TRL's would), so that only the trainers' steps differ
    optim = OptimConfig(lr=args.lr, warmup_steps=3)
    opt = make_optimizer(list(student.parameters()), optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(
        k, args.steps, optim.warmup_steps, optim.min_lr_ratio))
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Timer()], optimizers=(opt, sched))
    trainer.generation_config.eos_token_id = tok.eos_token_id  # stop at EOS, as hopd does
    generate = trainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):
        ids, mask, labels = generate(model, inputs, generation_config)
        clock["tokens"] += int((labels != -100).sum())
        return ids, mask, labels

    trainer.generate_on_policy_outputs = counted
    trainer.train()
    return evals


def reach(evals: list[dict], target: float) -> dict | None:
    return next((e for e in evals if e["rkl"] <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="the warm-started student (a folder)")
    ap.add_argument("--teacher", default="smollm2:135m-instruct")
    ap.add_argument("--data", default="chat:prompts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-n", type=int, default=32)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--arms", default="gkd,hopd opd,hopd adaptive",
                    help=f"comma list from gkd, {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="0", help="comma list; each seed runs every arm")
    ap.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    arms, seeds = args.arms.split(","), [int(x) for x in args.seeds.split(",")]
    unknown = [a for a in arms if a != "gkd" and a not in ARMS]
    if unknown:
        sys.exit(f"time_to_target: unknown arm(s) {unknown}: use gkd, {', '.join(ARMS)}")
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        sys.exit("time_to_target: TRL is not installed. Install the bench extra: "
                 "pip install -e '.[bench]'")
    from hopd.gguf_models import cached_folder, is_gguf

    if is_gguf(args.teacher):  # one converted folder for every arm
        args.teacher = str(cached_folder(args.teacher))
    warnings.filterwarnings("ignore")
    curves, load = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            for name in arms:
                print(f"time_to_target: {name}, seed {seed} ({args.steps} steps)...",
                      file=sys.stderr, flush=True)
                load[name, seed] = os.getloadavg()[0]
                curves[name, seed] = (gkd_arm(args, out, seed) if name == "gkd"
                                      else hopd_arm(name, args, out, seed))
    ref = next((a for a in ("hopd opd", "hopd opd bf16") if a in arms), arms[0])
    targets = {}
    for seed in seeds:  # each seed's own target, from its own reference run
        start, final = curves[ref, seed][0]["rkl"], curves[ref, seed][-1]["rkl"]
        targets[seed] = start - 0.95 * (start - final)
    print(f"\nTime to a held-out KL target: {machine('cpu')}, commit {commit()}")
    print(f"student {args.student}, teacher {args.teacher}, {args.data}, batch {args.batch}, "
          f"L = {args.budget}, lr {args.lr:g}, {args.steps} steps, evaluated every "
          f"{args.eval_every} steps on {args.eval_n} test prompts; each seed's target is 95% of "
          f"the way from its start to {ref}'s final KL: "
          + ", ".join(f"seed {s} {t:.4f}" for s, t in targets.items()) + "\n")
    head = ["arm", "seed", "load at start", "KL by eval step", "final KL", "train s", "tokens",
            "to target: step", "train s", "tokens", "GKD / arm (time)"]
    table, reached = [], {name: [] for name in arms}
    for name in arms:
        for seed in seeds:
            c, hit = curves[name, seed], reach(curves[name, seed], targets[seed])
            gkd = reach(curves.get(("gkd", seed), []), targets[seed])
            ratio = f"{gkd['train_s'] / hit['train_s']:.2f}x" if gkd and hit and hit["train_s"] \
                and name != "gkd" else ""
            if hit:
                reached[name].append(hit)
            table.append([name, str(seed), f"{load[name, seed]:.1f}",
                          " ".join(f"{e['step']}:{e['rkl']:.3f}" for e in c),
                          f"{c[-1]['rkl']:.4f} +- {c[-1]['rkl_se']:.4f}",
                          f"{c[-1]['train_s']:.0f}", f"{c[-1]['tokens']:,}",
                          str(hit["step"]) if hit else "not reached",
                          f"{hit['train_s']:.0f}" if hit else "",
                          f"{hit['tokens']:,}" if hit else "", ratio])
    print_table(head, table)
    print()
    for name, hits in reached.items():  # the mean over the seeds that reached their target
        mean = (f"mean to target {sum(h['train_s'] for h in hits) / len(hits):.0f} s, "
                f"{sum(h['tokens'] for h in hits) / len(hits):,.0f} tokens") if hits else ""
        print(f"{name}: reached in {len(hits)} of {len(seeds)} seeds; {mean}")
    print(json.dumps({"targets": targets, "reference": ref,
                      "curves": {f"{n} seed {s}": c for (n, s), c in curves.items()},
                      "load": {f"{n} seed {s}": v for (n, s), v in load.items()}}))


if __name__ == "__main__":
    main()
