"""The testbed task: chains of assignments modulo 10, solved step by step.

A problem is a short program; every step assigns to a fresh variable the result of `+`, `-` or `*`
(modulo 10) on two operands, each either a digit or one of the last `reach` variables:

    prompt:   a=3+5;b=a*2;c=b-a;...;l=k+i;
    response: a=3+5=3+5=8
              b=a*2=8*2=6
              c=b-a=6-8=8
              ...
              Answer: 4

Each worked step restates the expression, substitutes the operands' values (found earlier in the
response) and gives the result, so the response grows linearly with the number of steps and every
step depends on earlier ones: a long-horizon reasoning task with an exact checker.

Train and evaluation problems never overlap: a problem belongs to the evaluation split exactly when
a hash of its prompt falls in the evaluation bucket, whatever seed produced it. The evaluation
split is itself cut in two halves by the same hash, `val` (for choosing settings such as the
learning rate) and `test` (for reporting), so a choice made on one never sees the other.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

VARIABLES = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
OPS = {
    "+": lambda x, y: (x + y) % 10,
    "-": lambda x, y: (x - y) % 10,
    "*": lambda x, y: (x * y) % 10,
}
ANSWER_PREFIX = "Answer: "
_ANSWER_RE = re.compile(r"Answer: (\d+)\s*$")
EVAL_BUCKETS = 10  # one prompt hash bucket in EVAL_BUCKETS is the evaluation split


@dataclass(frozen=True)
class ChainSpec:
    """Difficulty of a chain problem."""

    steps: int = 12  # number of assignments; sets the response length (~12 tokens per step)
    reach: int = 4  # operands refer to one of the last `reach` variables
    ops: str = "+-*"  # operations to draw from
    p_const: float = 0.3  # probability that an operand is a digit rather than a variable

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= len(VARIABLES):
            raise ValueError(f"steps={self.steps}: must be in 1..{len(VARIABLES)}")
        if self.reach < 1:
            raise ValueError(f"reach={self.reach}: must be >= 1")
        if not self.ops or any(o not in OPS for o in self.ops):
            raise ValueError(f"ops={self.ops!r}: use a non-empty subset of {''.join(OPS)!r}")
        if not 0.0 <= self.p_const <= 1.0:
            raise ValueError(f"p_const={self.p_const}: must be in [0, 1]")


PRESETS = {
    "default": ChainSpec(steps=12),  # responses of 154 tokens
    "hard": ChainSpec(steps=34, reach=6),  # responses of 418 tokens
    "tiny": ChainSpec(steps=3),  # for tests
    "two": ChainSpec(steps=2),  # two operations: the SFT recipe learns it in seconds (tests)
}


@dataclass(frozen=True)
class Problem:
    prompt: str  # the program, e.g. "a=3+5;b=a*2;"
    response: str  # the worked solution ending in "Answer: N"
    answer: str  # the final value, e.g. "4"


def make_problem(rng: random.Random, spec: ChainSpec) -> Problem:
    """Draws one problem with `rng`."""
    program: list[str] = []
    for i in range(spec.steps):
        name = VARIABLES[i]
        operands = []
        for _ in range(2):
            if i == 0 or rng.random() < spec.p_const:
                operands.append(str(rng.randrange(10)))
            else:
                operands.append(VARIABLES[rng.randrange(max(0, i - spec.reach), i)])
        op = rng.choice(spec.ops)
        program.append(f"{name}={operands[0]}{op}{operands[1]};")
    prompt = "".join(program)
    response = worked_solution(prompt)  # the one place a program is evaluated
    return Problem(prompt, response, response.rpartition(ANSWER_PREFIX)[2])


def worked_solution(prompt: str, ops: dict = OPS) -> str:
    """The worked solution of a program, computing each operation with `ops` (the true table by
    default; another table gives a consistently wrong solution, as a misconception would)."""
    values: dict[str, int] = {}
    lines = []
    for stmt in prompt.rstrip(";").split(";"):
        name, (a, op, b) = stmt[0], stmt[2:]
        x, y = (int(o) if o.isdigit() else values[o] for o in (a, b))
        values[name] = ops[op](x, y)
        lines.append(f"{name}={a}{op}{b}={x}{op}{y}={values[name]}\n")
    return "".join(lines) + ANSWER_PREFIX + str(values[name])


def _bucket(prompt: str) -> int:
    return int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")


def hash_fraction(prompt: str) -> float:
    """A number in [0, 1) fixed by the prompt, independent of the split buckets."""
    return (_bucket(prompt) >> 16) % 1000 / 1000


def split_of(prompt: str) -> str:
    """'eval' or 'train', from a hash of the prompt: the splits can never share a problem."""
    return "eval" if _bucket(prompt) % EVAL_BUCKETS == 0 else "train"


def heldout_part(prompt: str) -> str:
    """'val' or 'test' for a held-out prompt: the two halves of the evaluation split."""
    return "val" if (_bucket(prompt) // EVAL_BUCKETS) % 2 == 0 else "test"


def in_split(prompt: str, split: str) -> bool:
    """Whether `prompt` belongs to `split`: train, eval (= val + test), val or test."""
    top = split_of(prompt)
    if split in ("train", "eval"):
        return top == split
    return top == "eval" and heldout_part(prompt) == split


SPLITS = ("train", "eval", "val", "test")


def generate(n: int, spec: ChainSpec, split: str, seed: int) -> list[Problem]:
    """`n` distinct problems of `split` (train, eval, val or test), deterministic in `seed`.

    Final answers are uniform over 0..9 (each problem is drawn for a target digit, by rejection),
    so that guessing scores 10%: without this, `*` and `x-x` pull a quarter of answers to 0.
    val and test are drawn from the evaluation split's stream, each keeping its own half.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
    stream = "eval" if split in ("val", "test") else split
    rng = random.Random(f"{stream}-{seed}-{spec}")
    out: list[Problem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * n + 10000:
            raise ValueError(f"cannot draw {n} distinct {split} problems for {spec}: too few exist")
        target = str(rng.randrange(10))
        p = make_problem(rng, spec)
        while p.answer != target:
            p = make_problem(rng, spec)
        if p.prompt in seen or not in_split(p.prompt, split):
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


def extract_answer(response: str) -> str | None:
    """The final answer of a response, or None when it has none (cut, malformed, garbage)."""
    m = _ANSWER_RE.search(response)
    return m.group(1) if m else None


def is_correct(response: str, answer: str) -> bool:
    return extract_answer(response) == answer
