"""Evaluation at the full response budget L: generate, check answers, report.

Whatever horizon training used, evaluation always generates up to L tokens: the question is
whether a student trained on short rollouts is good at complete answers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hopd import evalcache
from hopd.progress import Bar
from hopd.quality import (
    QualityAccumulator,
    answers_of,
    degeneration,
    sampled_rkl,
    student_entropy,
    take_rows,
    teacher_nll,
)
from hopd.rollout import sample
from hopd.tasks import Example, encode_prompts
from hopd.teacher import Teacher


def decode_responses(tokenizer: PreTrainedTokenizerBase, ids_B_R: torch.Tensor,
                     mask_B_R: torch.Tensor) -> list[str]:
    """Response texts without EOS/padding."""
    texts = []
    for ids, m in zip(ids_B_R.tolist(), mask_B_R.tolist()):
        toks = [t for t, keep in zip(ids, m) if keep and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True))
    return texts


@torch.inference_mode()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    check: Callable[[str, str], bool] | None,
    budget: int,
    batch_size: int = 64,
    samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    keep_responses: int = 0,
    system_prompt: str = "",
    progress: bool = False,
    teacher: Teacher | None = None,
    teacher_prompts: list[list[int]] | None = None,
    kl_n: int = 64,
    vocab: int | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Accuracy of `model` on `examples`: greedy when `samples == 1`, else `samples` draws each,
    and the quality metrics of `hopd.quality` on the first pass's answers.

    `check(response, answer)` says whether a response is correct (None: no checker, accuracy is
    NaN). With a `teacher`, the first `kl_n` prompts also get the held-out reverse KL and the
    teacher's NLL (`teacher_prompts`: the same prompts in the teacher's format, if it differs).

    Returns accuracy (mean over all generations), pass@k when sampling, mean response tokens
    (EOS included), the fraction of generations cut by the budget, decode tokens/s, and the
    quality metrics (distinct_2, max_run_share, eos_rate, student_entropy, rkl, teacher_nll...).

    With `cache`, an evaluation of the same weights, prompts, settings and code is read back
    from `hopd.evalcache` instead of run again (its result then says "cached": true, with the
    time it took first as cached_eval_time_s).
    """
    t0 = time.perf_counter()
    prompts = encode_prompts(tokenizer, [e.prompt for e in examples], system_prompt)
    cache_key = None
    if cache and evalcache.cache_dir() is not None and \
            (teacher is None or kl_n <= 0 or getattr(teacher, "model", None) is not None):
        cache_key = evalcache.key({
            "model": evalcache.weights_digest(model),
            "teacher": None if teacher is None or kl_n <= 0 else
            [type(teacher).__name__, getattr(teacher, "vocab", None),
             evalcache.weights_digest(teacher.model)],
            "prompts": prompts, "teacher_prompts": teacher_prompts,
            "examples": [[e.prompt, e.answer] for e in examples],
            "check": None if check is None else [getattr(check, "__module__", ""),
                                                 getattr(check, "__qualname__", repr(check))],
            "settings": [budget, batch_size, samples, temperature, seed, keep_responses, kl_n,
                         vocab, str(next(model.parameters()).device.type)]})
        hit = evalcache.lookup(cache_key)
        if hit is not None:
            return {**hit, "cached": True, "cached_eval_time_s": hit["eval_time_s"],
                    "eval_time_s": time.perf_counter() - t0}
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    correct, tokens, cut, responses = [], 0, 0, []
    bar = Bar(samples * len(examples), "eval", enabled=progress)
    answers, ended, acc = [], [], QualityAccumulator.empty()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for k in range(samples):
        row = []
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            r = sample(model, prompts[i:i + batch_size], budget, eos_id=eos, pad_id=pad,
                       temperature=temperature, greedy=samples == 1, generator=gen)
            texts = decode_responses(tokenizer, r.response_ids_B_R, r.response_mask_B_R)
            row += [check(t, e.answer) if check else math.nan for t, e in zip(texts, batch)]
            if k == 0:  # the quality metrics, on the first pass
                a, e_ = answers_of(r.response_ids_B_R, r.response_mask_B_R, eos)
                answers, ended = answers + a, ended + e_
                student_entropy(model, r, vocab=vocab, acc=acc)
                n_kl = max(0, min(len(batch), kl_n - i)) if teacher is not None else 0
                if n_kl:  # the held-out KL and the teacher's NLL on the first kl_n prompts
                    t_prompts = teacher_prompts[i:i + n_kl] if teacher_prompts else None
                    teacher_nll(teacher, take_rows(r, n_kl), vocab=vocab, acc=acc,
                                teacher_prompts=t_prompts)
                    sampled_rkl(model, teacher, prompts[i:i + n_kl], budget=budget, vocab=vocab,
                                eos=eos, pad=pad, seed=seed, acc=acc, teacher_prompts=t_prompts,
                                first_row=i)
            tokens += r.num_tokens
            cut += int(r.cut_B.sum())
            bar.update(len(batch), acc=sum(row) / len(row))
            if len(responses) < keep_responses:
                responses += [{"prompt": e.prompt, "response": t, "answer": e.answer}
                              for t, e in zip(texts, batch)][: keep_responses - len(responses)]
        correct.append(row)
    bar.close()
    elapsed = time.perf_counter() - t0
    model.train(was_training)
    n_gen = samples * len(examples)
    out: dict[str, Any] = {
        "accuracy": sum(map(sum, correct)) / n_gen if check else math.nan,
        "n": len(examples),
        "samples": samples,
        "mean_response_tokens": tokens / n_gen,
        "truncated_fraction": cut / n_gen,
        "tokens_per_s": tokens / elapsed,
        "eval_time_s": elapsed,
        "budget": budget,
        "greedy": samples == 1,
    }
    out.update(degeneration(answers, ended))
    out.update(acc.result(with_teacher=teacher is not None and kl_n > 0))
    if samples > 1:
        out[f"pass@{samples}"] = sum(any(c) for c in zip(*correct)) / len(examples)
    if keep_responses:
        out["examples"] = responses
    if cache_key is not None:
        evalcache.store(cache_key, out)
    return out
