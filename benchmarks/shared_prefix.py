"""Padding and a shared prompt prefix taken out of the learner's and teacher's passes: seconds of
the teacher's scoring pass and of the learner's forward and backward, on the real pair's shapes.

Two savings, both the same computation up to float rounding (the test suite checks logits and
gradients in float64):
- a prefix every prompt starts with (a chat template's system prompt: SmolLM2's first 24 tokens
  are alike in every prompt of ~38, a third of a row at H = 32) runs once, as one row, and every
  row continues from its keys and values (`models.response_logits`; HOPD_SHARE_PREFIX=off:
  each row runs it);
- with `grad_accum` > 1, rows go to micro-batches longest response first, and each runs only up
  to its own longest response (`step.micro_batches`): the teacher's answers in the SFT warm
  start end anywhere up to the budget, and one long answer pads a whole batch.

Each setting times the same `--steps` steps (rollouts sampled once, by the learner or with
`--rollouts teacher` by the teacher, at H), interleaved over `--repeats` rounds; reports the
median seconds per step of each pass and the largest difference of the loss from the first
setting's (float rounding only).

    python benchmarks/shared_prefix.py --model runs/real/warm/model     # H = 32, the OPD stage
    python benchmarks/shared_prefix.py --model runs/real/student --rollouts teacher \\
        --loss sft --horizon 128 --accum 1,2,4                            # the SFT warm start
    python benchmarks/shared_prefix.py --model testbed:student --teacher testbed:teacher \\
        --steps 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_sampling_args,
    commit,
    machine,
    median,
    print_table,
    sampling_steps,
)

from hopd.distill_config import LossConfig  # noqa: E402
from hopd.models import load_model, shared_prefix_len  # noqa: E402
from hopd.rollout import HFSampler  # noqa: E402
from hopd.step import learn  # noqa: E402
from hopd.teacher import LocalTeacher, TeacherScores  # noqa: E402


def timed_step(model, teacher: LocalTeacher, rollout, vocab: int, loss: str, accum: int
               ) -> tuple[float, float, float]:
    """(teacher s, learn s, loss) of one step: the full-distribution scoring pass (none for
    sft) and the loss's forward and backward over `accum` micro-batches."""
    t0 = time.perf_counter()
    scores = TeacherScores(logp_B_R=rollout.sampler_logp_B_R) if loss == "sft" else \
        teacher.score(rollout, "full")
    t1 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    stats = learn(model, rollout, scores, LossConfig(kind=loss), vocab=vocab, grad_accum=accum)
    return t1 - t0, time.perf_counter() - t1, stats["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2:135m-instruct",
                    help="the learner: a path, a packaged name or testbed:student")
    ap.add_argument("--teacher", default="smollm2:135m-instruct", help="the scoring model")
    ap.add_argument("--horizon", type=int, default=32, help="H: new tokens at most per row")
    ap.add_argument("--loss", default="rkl", choices=["rkl", "sft"])
    ap.add_argument("--rollouts", default="student", choices=["student", "teacher"],
                    help="who samples the rows (the SFT warm start: the teacher)")
    ap.add_argument("--accum", default="1", help="grad_accum settings, with the prefix shared")
    add_sampling_args(ap, steps=4)
    args = ap.parse_args()
    model, tok, data, steps = sampling_steps(args)
    vocab = model.config.vocab_size
    teacher_model = load_model(args.teacher).eval()
    writer = model if args.rollouts == "student" else teacher_model
    sampler = HFSampler(writer, tok.eos_token_id, tok.pad_token_id)
    rollouts = [sampler.sample(prompts, args.horizon, row_seeds=seeds) for prompts, seeds in steps]
    teacher = LocalTeacher(teacher_model, vocab)
    model.train()
    shared = [shared_prefix_len(r.ids_B_T, r.attn_B_T, r.prompt_len) for r in rollouts]
    tokens = sum(int(r.attn_B_T.sum()) for r in rollouts) / len(rollouts)
    columns = sum(r.ids_B_T.numel() for r in rollouts) / len(rollouts)
    settings = [("off", 1), ("on", 1)] + [("on", int(a)) for a in args.accum.split(",")
                                          if int(a) > 1]
    before = os.environ.get("HOPD_SHARE_PREFIX")
    times = {s: {"teacher": [], "learn": []} for s in settings}
    losses: dict[tuple[str, int], list[float]] = {}
    timed_step(model, teacher, rollouts[0], vocab, args.loss, 1)  # warm-up
    try:
        for _ in range(args.repeats):  # interleaved, so drift hits every setting alike
            for share, accum in settings:
                os.environ["HOPD_SHARE_PREFIX"] = share
                t_teacher = t_learn = 0.0
                losses[share, accum] = []
                for r in rollouts:
                    a, b, loss = timed_step(model, teacher, r, vocab, args.loss, accum)
                    t_teacher, t_learn = t_teacher + a, t_learn + b
                    losses[share, accum].append(loss)
                times[share, accum]["teacher"].append(t_teacher / len(rollouts))
                times[share, accum]["learn"].append(t_learn / len(rollouts))
    finally:
        if before is None:
            os.environ.pop("HOPD_SHARE_PREFIX", None)
        else:
            os.environ["HOPD_SHARE_PREFIX"] = before
    first = losses[settings[0]]
    diff = max(abs(a - b) for s in settings for a, b in zip(first, losses[s]))
    med = {s: {k: median(v) for k, v in d.items()} for s, d in times.items()}
    print(f"\nPadding and a shared prefix out of the passes: {machine('cpu')}, commit {commit()}")
    print(f"learner {args.model}, teacher {args.teacher} (float32), loss {args.loss} on the "
          f"{args.rollouts}'s rollouts; {args.steps} steps x {args.batch} prompts of {data}, "
          f"H = {args.horizon}; {tokens:.0f} real tokens in {columns:.0f} columns a step, "
          f"shared prefix {min(shared)}-{max(shared)} tokens a row; median of {args.repeats}; "
          f"largest loss difference {diff:.1e}\n")
    base = sum(med[settings[0]].values())
    rows = []
    for s in settings:
        both = sum(med[s].values())
        rows.append(["shared" if s[0] == "on" else "each row", s[1],
                     f"{med[s]['teacher']:.2f}" if args.loss != "sft" else "-",
                     f"{med[s]['learn']:.2f}", f"{both:.2f}", f"{base / both:.2f}x"])
    print_table(["prefix", "grad_accum", "teacher s", "learn s", "both s", "speed-up"], rows)
    print(json.dumps({"model": args.model, "teacher": args.teacher, "loss": args.loss,
                      "rollouts": args.rollouts, "batch": args.batch, "horizon": args.horizon,
                      "shared_prefix": [min(shared), max(shared)], "tokens_per_step": tokens,
                      "columns_per_step": columns, "loss_max_diff": diff,
                      "seconds": {f"{s[0]}/{s[1]}": v for s, v in med.items()}}))


if __name__ == "__main__":
    main()
