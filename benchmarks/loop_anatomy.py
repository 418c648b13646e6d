"""Where a distilled student's loops come from, read against its teacher.

For the student's greedy answers to held-out prompts, the teacher scores every token (teacher
forcing), and the script prints, for the looping answers (`hopd.quality.loops`) and the others:
the teacher's NLL per token in each answer's first and second half, how often the teacher's own
top-1 token is the one the student wrote, how many answers go on past a position where the
teacher's top-1 was EOS ("missed stops"), and where each looping answer's first repeated 4-gram
starts (within H, the unlikelihood term sees it), and how many of all answers' repeated
4-gram tokens lie inside the first H tokens (`--horizon`; the unlikelihood term's greedy
answers reach H unless `loss.unlikelihood_horizon` is set) and how many past it. Then the
teacher itself continues each looping answer greedily from the student's first k tokens, and
the script counts how many of those continuations loop: if the teacher loops too, the loop was
decided by the first k tokens.
`--against B` reads a second student on the same prompts and compares the two on the prompts
where neither loops (`paired`).

    python benchmarks/loop_anatomy.py --model runs/real/opd/model
    python benchmarks/loop_anatomy.py --model S --teacher T --n 65 --prefixes 8,16,32
    python benchmarks/loop_anatomy.py --model A --against B --split val --prefixes ""

Prints a table and one JSON line. Student and teacher must share the teacher's tokenizer, as a
student made by `hopd prune` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hopd.losses import repeated_ngrams
from hopd.models import load_model, load_tokenizer
from hopd.quality import distinct_n, loops, ratio_se
from hopd.rollout import Rollout, sample
from hopd.tasks import PromptSource, encode_prompts
from hopd.teacher import score


@dataclass
class Reading:
    """One greedy answer, read by the teacher."""

    loops: bool
    nll_first: list[float]  # the teacher's NLL of each token in the answer's first half
    nll_second: list[float]  # ... and in its second half
    teacher_agrees: list[bool]  # whether the teacher's top-1 is the token written
    missed_stop: bool  # the teacher's top-1 was EOS before the answer's last token
    first_repeat: int  # where the answer's first repeated 4-gram starts (-1: none)


def strip_eos(answer: list[int], eos: int) -> list[int]:
    """An answer as `hopd.quality` counts it: without its EOS."""
    return [t for t in answer if t != eos]


def repeat_marks(answer: list[int], n: int = 4) -> torch.Tensor:
    """(len(answer),) bool: the tokens of `answer` inside a repeated n-gram (an n-gram that
    occurred, whole, earlier: the tokens loss.unlikelihood pushes down,
    `losses.repeated_ngrams`)."""
    ids = torch.tensor([answer], dtype=torch.long)
    return repeated_ngrams(ids, torch.ones_like(ids), n)[0]


def first_repeat(answer: list[int], n: int = 4) -> int:
    """The position where `answer`'s first repeated n-gram starts (`repeat_marks`); -1 when
    none repeats."""
    at = repeat_marks(answer, n).nonzero() if answer else []
    return int(at[0]) if len(at) else -1


def repeats_inside(answers: list[list[int]], horizon: int, n: int = 4) -> tuple[int, int]:
    """Of all `answers`' tokens inside a repeated n-gram (`repeat_marks`), how many lie in an
    answer's first `horizon` tokens, and how many past them."""
    marks = [repeat_marks(a, n) for a in answers if a]
    return (sum(int(m[:horizon].sum()) for m in marks),
            sum(int(m[horizon:].sum()) for m in marks))


def read_answer(tokens: list[int], teacher_logp: list[float], teacher_top1: list[int],
                eos: int) -> Reading:
    """`tokens`: an answer as generated (its final EOS included when it stopped);
    `teacher_logp[i]`, `teacher_top1[i]`: the teacher's log-prob of tokens[i] and its most likely
    token at that position."""
    n = len(tokens)
    nll = [-x for x in teacher_logp[:n]]
    return Reading(loops=loops(strip_eos(tokens, eos)),
                   nll_first=nll[: n // 2], nll_second=nll[n // 2:],
                   teacher_agrees=[a == b for a, b in zip(teacher_top1, tokens)],
                   missed_stop=any(t == eos for t in teacher_top1[: n - 1]),
                   first_repeat=first_repeat(strip_eos(tokens, eos)))


def summary(readings: list[Reading]) -> dict[str, float]:
    def mean(xs: list) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {"answers": len(readings),
            "nll_first_half": mean([x for r in readings for x in r.nll_first]),
            "nll_second_half": mean([x for r in readings for x in r.nll_second]),
            "teacher_top1_agrees": mean([x for r in readings for x in r.teacher_agrees]),
            "missed_stops": sum(r.missed_stop for r in readings)}


def paired(a: list[Reading], b: list[Reading]) -> dict[str, float]:
    """Two students' readings on the same prompts, over the prompts where neither answer loops:
    each one's teacher NLL per token and teacher top-1 agreement (pooled over tokens), and the
    mean over those prompts of b's NLL per token minus a's, with its standard error and how
    many prompts b reads worse on. A pairing takes the loops and the prompts' own difficulty
    out of the comparison."""
    both = [(x, y) for x, y in zip(a, b, strict=True) if not x.loops and not y.loops]

    def nll(r: Reading) -> list[float]:
        return r.nll_first + r.nll_second

    def pooled(rs: list[Reading]) -> tuple[float, float]:  # per token, over these answers
        counts = [len(nll(r)) for r in rs]
        return (ratio_se([sum(nll(r)) for r in rs], counts)[0],
                ratio_se([sum(r.teacher_agrees) for r in rs], counts)[0])

    diffs = [statistics.fmean(nll(y)) - statistics.fmean(nll(x))
             for x, y in both if nll(x) and nll(y)]
    mean = statistics.fmean(diffs) if diffs else float("nan")
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    (nll_a, agree_a), (nll_b, agree_b) = pooled([x for x, _ in both]), pooled([y for _, y in both])
    return {"prompts": len(both), "nll_a": nll_a, "nll_b": nll_b, "agrees_a": agree_a,
            "agrees_b": agree_b, "nll_diff": mean, "nll_diff_se": se,
            "b_worse_on": sum(d > 0 for d in diffs)}


def greedy_batches(model, prompts: list[list[int]], budget: int, eos: int, pad: int,
                   batch: int = 8) -> Iterator[tuple[Rollout, list[list[int]]]]:
    """Greedy rollouts, `batch` prompts at a time, each with its answers (a row's tokens, with
    its final EOS when it stopped)."""
    for i in range(0, len(prompts), batch):
        r = sample(model, prompts[i:i + batch], budget, eos_id=eos, pad_id=pad, greedy=True)
        yield r, [[t for t, m in zip(ids, mask) if m] for ids, mask in
                  zip(r.response_ids_B_R.tolist(), r.response_mask_B_R.tolist())]


def greedy_answers(model, prompts: list[list[int]], budget: int, eos: int, pad: int
                   ) -> list[list[int]]:
    """Greedy answers, each with its final EOS when it stopped."""
    return [a for _, batch in greedy_batches(model, prompts, budget, eos, pad) for a in batch]


def read_student(student, teacher, prompts: list[list[int]], budget: int, eos: int, pad: int
                 ) -> tuple[list[list[int]], list[Reading]]:
    """The student's greedy answers to `prompts`, and the teacher's reading of each."""
    answers, readings = [], []
    for r, batch in greedy_batches(student, prompts, budget, eos, pad):
        with torch.no_grad():  # the teacher reads each batch of the student's answers
            s = score(teacher, r, "topk", top_k=1)
        answers += batch
        readings += [read_answer(a, s.logp_B_R[b].tolist(), s.topk_ids_B_R_K[b, :, 0].tolist(),
                                 eos) for b, a in enumerate(batch)]
    return answers, readings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the student (a folder or a known name)")
    ap.add_argument("--teacher", default="smollm2:135m-instruct")
    ap.add_argument("--task", default="chat:prompts")
    ap.add_argument("--split", default="test", choices=["val", "test", "eval"],
                    help="eval: both halves of the held-out prompts")
    ap.add_argument("--n", type=int, default=32, help="held-out prompts")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--horizon", type=int, default=32,
                    help="count the repeated 4-grams' tokens inside and past this many tokens")
    ap.add_argument("--prefixes", default="8,16,32",
                    help="the teacher continues looping answers after these many tokens")
    ap.add_argument("--against", default="",
                    help="a second student, read on the same prompts and compared with the "
                         "first on the prompts where neither loops")
    args = ap.parse_args()
    tok = load_tokenizer(args.teacher)
    teacher, student = load_model(args.teacher), load_model(args.model)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    examples = PromptSource(args.task).eval_set(args.n, 0, args.split)
    prompts = encode_prompts(tok, [e.prompt for e in examples])
    answers, readings = read_student(student, teacher, prompts, args.budget, eos, pad)
    del student  # read: its memory is free before --against loads a second one
    looping = [i for i, r in enumerate(readings) if r.loops]
    result = {"model": args.model, "teacher": args.teacher, "n": len(prompts),
              "distinct_2": distinct_n([strip_eos(a, eos) for a in answers]),
              "looping": summary([r for r in readings if r.loops]),
              "loop_starts": sorted(readings[i].first_repeat for i in looping),
              "repeats_inside_past": repeats_inside([strip_eos(a, eos) for a in answers],
                                                    args.horizon),
              "other": summary([r for r in readings if not r.loops]),
              "teacher_continues": {}}
    for k in [int(x) for x in args.prefixes.split(",") if x]:
        if not looping:
            break
        # an answer that ended within its first k tokens stays as the student wrote it
        go_on = [i for i in looping if eos not in answers[i][:k]]
        cont = greedy_answers(teacher, [prompts[i] + answers[i][:k] for i in go_on],
                              args.budget - k, eos, pad) if go_on else []
        whole = {i: answers[i] for i in looping}
        whole.update({i: answers[i][:k] + c for i, c in zip(go_on, cont)})
        result["teacher_continues"][k] = sum(loops(strip_eos(w, eos)) for w in whole.values())

    print(f"{args.model}: {len(prompts)} {args.split} prompts, greedy at L = {args.budget}, "
          f"distinct-2 {result['distinct_2']:.3f}")
    print("| answers | n | teacher NLL, first half | second half | teacher's top-1 agrees "
          "| missed stops |")
    print("|---|---|---|---|---|---|")
    for name in ("looping", "other"):
        s = result[name]
        print(f"| {name} | {s['answers']} | {s['nll_first_half']:.3f} | {s['nll_second_half']:.3f}"
              f" | {s['teacher_top1_agrees']:.2f} | {s['missed_stops']} |")
    print(f"the looping answers' first repeated 4-gram starts at token {result['loop_starts']}")
    inside, past = result["repeats_inside_past"]
    print(f"of all answers' {inside + past} tokens inside a repeated 4-gram, {inside} lie in the "
          f"first {args.horizon} tokens, {past} past them")
    for k, v in result["teacher_continues"].items():
        print(f"the teacher, continuing the {len(looping)} looping answers after their first {k}"
              f" tokens, loops on {v}")
    if args.against:
        _, theirs = read_student(load_model(args.against), teacher, prompts, args.budget, eos, pad)
        p = result["paired"] = {"against": args.against, **paired(readings, theirs)}
        print(f"against {args.against}, on the {p['prompts']} prompts where neither loops: "
              f"teacher NLL {p['nll_a']:.3f} -> {p['nll_b']:.3f} (per prompt "
              f"{p['nll_diff']:+.3f} +- {p['nll_diff_se']:.3f}, worse on {p['b_worse_on']}), "
              f"teacher's top-1 agrees {p['agrees_a']:.2f} -> {p['agrees_b']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
