"""Prompt sources with answers and their checkers.

A source is named by a string: `chain:PRESET` (the synthetic testbed, presets in `chain.PRESETS`),
or the path of a JSONL file / saved Hugging Face dataset (see `hopd.tasks.jsonl`). Every source
yields `Example`s (a user prompt or chat messages, and the reference answer its checker compares
with) in deterministic train batches and a held-out evaluation set that never overlap.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hopd.config import ConfigError
from hopd.tasks import chain, chat_prompts, jsonl

if TYPE_CHECKING:  # transformers is not imported to check a config
    from transformers import PreTrainedTokenizerBase

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    prompt: Prompt  # user message content, or chat messages
    answer: str  # reference final answer
    response: str = ""  # a reference worked solution, when the source has one (for SFT)
    where: str = ""  # FILE:LINE of a row read from a file ("" for generated problems)


def chain_spec(source: str) -> chain.ChainSpec:
    preset = source.split(":", 1)[1] if ":" in source else "default"
    if preset not in chain.PRESETS:
        raise ConfigError(f"unknown testbed preset {preset!r} in {source!r}: choose one of "
                         f"{', '.join('chain:' + p for p in chain.PRESETS)}")
    return chain.PRESETS[preset]


def is_chain(source: str) -> bool:
    return source == "chain" or source.startswith("chain:")


def _prompt_text(p: Prompt) -> str:
    return p if isinstance(p, str) else "\n".join(m["content"] for m in p)


class PromptSource:
    """Train batches and an evaluation set from one source; loading validates the data."""

    def __init__(self, source: str, eval_source: str = "", prompt_field: str = "",
                 answer_field: str = ""):
        self.source = source
        self.chain = chain_spec(source) if is_chain(source) else None
        self.train_rows: list[Example] = []
        self.eval_rows: list[Example] = []
        self._orders: dict[tuple[int, int, int], list[int]] = {}
        self._warned: set[str] = set()
        if self.chain is None:
            if source.startswith("chain"):
                chain_spec(source)  # raises with the list of presets
            source = str(chat_prompts.PATH) if source == chat_prompts.NAME else source
            if not Path(source).exists():
                raise ConfigError(f"data {source!r}: no such file; give chain:default|hard|tiny, "
                                 f"{chat_prompts.NAME}, a JSONL file or a saved dataset folder")
            rows = [Example(p, a, where=w) for p, a, w in
                    jsonl.load_located_rows(source, prompt_field, answer_field)]
            if eval_source:
                self.train_rows = rows
                self.eval_rows = [Example(p, a, where=w) for p, a, w in
                                  jsonl.load_located_rows(eval_source, prompt_field, answer_field)]
            else:  # hold out the prompts whose hash falls in the evaluation bucket
                for ex in rows:
                    split = chain.split_of(_prompt_text(ex.prompt))
                    (self.eval_rows if split == "eval" else self.train_rows).append(ex)
            if not self.train_rows:
                raise ConfigError(f"data {source}: no training rows left after holding out the "
                                 "evaluation split; give more rows or a separate eval_data file")
            self._warn_unparsable_answers()

    @property
    def has_answers(self) -> bool:
        """Whether accuracy means anything here: the testbed, or a file with reference answers."""
        return self.chain is not None or any(e.answer for e in self.all_rows())

    def _warn_unparsable_answers(self) -> None:
        """A prose reference answer never matches: say so now rather than report 0% later."""
        answers = [e.answer for e in self.eval_rows if e.answer]
        if answers and not any(jsonl.looks_like_final_answer(a) for a in answers):
            print(f"warning: none of the {len(answers)} evaluation answers in "
                  f"{self.eval_rows[0].where.rsplit(':', 1)[0]} looks like a final answer (e.g. "
                  f"{answers[0][:60]!r}); accuracy will be 0. Give answers as a number or short "
                  "expression, a GSM8K '#### N' line or a \\boxed{N}, or set data_answer_field",
                  file=sys.stderr)

    def all_rows(self) -> list[Example]:
        """Every row of a file source, train and eval ([] for the generated testbed)."""
        return self.train_rows + self.eval_rows

    def drop_rows(self, keep: Callable[[Example], bool]) -> int:
        """Removes the rows for which `keep` is false; returns how many went."""
        before = len(self.train_rows) + len(self.eval_rows)
        self.train_rows = [e for e in self.train_rows if keep(e)]
        self.eval_rows = [e for e in self.eval_rows if keep(e)]
        if not self.train_rows:
            raise ConfigError(f"data {self.source}: no training rows are left after dropping "
                             "the prompts that are too long; lower budget or shorten the prompts")
        return before - len(self.train_rows) - len(self.eval_rows)

    def train_batch(self, step: int, batch_size: int, seed: int, start: int | None = None
                    ) -> list[Example]:
        """The prompts of optimizer step `step`: a pure function of (seed, step).

        For file sources, `start` (prompts consumed so far) replaces step * batch_size when
        batch sizes vary between steps (token-budget batching).
        """
        if self.chain is not None:
            return [Example(p.prompt, p.answer, p.response) for p in
                    chain.generate(batch_size, self.chain, "train", seed * 1_000_003 + step)]
        n = len(self.train_rows)
        first = step * batch_size if start is None else start
        out = []
        for j in range(first, first + batch_size):
            epoch, i = divmod(j, n)
            out.append(self.train_rows[self._order(seed, epoch)[i]])
        return out

    def _order(self, seed: int, epoch: int) -> list[int]:
        """The shuffled row order of one epoch, computed once (O(rows)), not once per prompt."""
        key = (seed, epoch, len(self.train_rows))
        if key not in self._orders:
            order = list(range(len(self.train_rows)))
            random.Random(f"{seed}-{epoch}").shuffle(order)
            self._orders = {k: v for k, v in self._orders.items() if k[1] >= epoch - 1}
            self._orders[key] = order
        return self._orders[key]

    def eval_set(self, n: int, seed: int = 0, part: str = "eval") -> list[Example]:
        """`n` held-out problems: part 'eval' (all of them), or its disjoint halves 'val' (to
        choose settings on) and 'test' (to report on)."""
        if part not in ("eval", "val", "test"):
            raise ValueError(f"part={part!r}: use eval, val or test")
        if self.chain is not None:
            return [Example(p.prompt, p.answer, p.response)
                    for p in chain.generate(n, self.chain, part, seed)]
        if not self.eval_rows:
            raise ConfigError(f"data {self.source}: no evaluation rows; give eval_data")
        rows = self.eval_rows if part == "eval" else [
            e for e in self.eval_rows if chain.heldout_part(_prompt_text(e.prompt)) == part]
        if not rows:  # a small file: both halves are the held-out rows, said once
            if part not in self._warned:
                self._warned.add(part)
                print(f"warning: data {self.source}: no {part} rows among its "
                      f"{len(self.eval_rows)} held-out rows; evaluating on all of them (val and "
                      "test are then the same rows: give more rows or eval_data to keep them "
                      "apart)", file=sys.stderr)
            rows = self.eval_rows
        return rows[:n]

    def is_correct(self, response: str, answer: str) -> bool:
        if self.chain is not None:
            return chain.is_correct(response, answer)
        return jsonl.math_correct(response, answer)

    def default_budget(self) -> int:
        """The full response budget L: for the testbed, the longest worked solution plus slack."""
        if self.chain is not None:
            # every step line is exactly 12 characters; "Answer: N" is 9; plus EOS
            return self.chain.steps * 12 + 9 + 1 + max(4, self.chain.steps // 2)
        return 512


def load_examples(source: str, n: int, split: str, seed: int = 0) -> list[Example]:
    """`n` examples of `split` from `source` (train: the batch of step 0 with this seed)."""
    src = PromptSource(source)
    if split == "eval":
        return src.eval_set(n, seed)
    if split != "train":
        raise ValueError(f"split={split!r}: use 'train' or 'eval'")
    if src.chain is not None:
        return [Example(p.prompt, p.answer, p.response)
                for p in chain.generate(n, src.chain, "train", seed)]
    return src.train_batch(0, n, seed)


def default_budget(source: str) -> int:
    return PromptSource(source).default_budget() if is_chain(source) else 512


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt],
                   system_prompt: str = "") -> list[list[int]]:
    """Chat-template token ids of prompts (user text or chat messages), ending where the
    assistant's answer starts; `system_prompt` adds a system turn when the prompt has none."""
    out = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        if tokenizer.chat_template is None:
            raise ConfigError("the tokenizer has no chat template; use a chat/instruct "
                             "checkpoint or set tokenizer.chat_template")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out
