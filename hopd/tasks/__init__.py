"""Prompt sources with answers and their checkers.

A source is named by a string: `chain:PRESET` (the synthetic testbed, presets in `chain.PRESETS`).
Every source yields `Example`s: a user prompt and the reference answer its checker compares with.
"""

from __future__ import annotations

from dataclasses import dataclass

from hopd.tasks import chain


@dataclass(frozen=True)
class Example:
    prompt: str  # user message content
    answer: str  # reference final answer
    response: str = ""  # a reference worked solution, when the source has one (for SFT)


def chain_spec(source: str) -> chain.ChainSpec:
    preset = source.split(":", 1)[1] if ":" in source else "default"
    if preset not in chain.PRESETS:
        raise ValueError(f"unknown testbed preset {preset!r} in {source!r}: choose one of "
                         f"{', '.join('chain:' + p for p in chain.PRESETS)}")
    return chain.PRESETS[preset]


def is_chain(source: str) -> bool:
    return source == "chain" or source.startswith("chain:")


def load_examples(source: str, n: int, split: str, seed: int = 0) -> list[Example]:
    """`n` examples of `split` from `source`."""
    if is_chain(source):
        spec = chain_spec(source)
        return [Example(p.prompt, p.answer, p.response)
                for p in chain.generate(n, spec, split, seed)]
    raise ValueError(f"unknown task source {source!r}: use chain:default, chain:hard or chain:tiny")


def default_budget(source: str) -> int:
    """The full response budget L for a source: the longest worked solution plus slack."""
    if is_chain(source):
        spec = chain_spec(source)
        # every step line is exactly 12 characters; "Answer: N" is 9; plus EOS
        return spec.steps * 12 + 9 + 1 + max(4, spec.steps // 2)
    return 512


def is_correct(response: str, answer: str, source: str) -> bool:
    return chain.is_correct(response, answer)
