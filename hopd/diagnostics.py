"""Diagnostics that explain *why*: per-position reverse KL and teacher entropy at the full
budget, the teacher-recovery probe, and memory accounting.

Teacher-recovery probe. Every `probe_every` steps, for `probe_n` held-out prompts, the student's
greedy rollout is cut at fractions p of L and the teacher finishes greedily from there; the
teacher's accuracy at each p measures how well it can still give useful feedback on a student
prefix of that length (what the paper calls unreliable late feedback).
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hopd.adaptive import PositionReading
from hopd.distill_config import SamplingConfig
from hopd.evaluate import decode_responses
from hopd.losses import divergence
from hopd.models import response_logits
from hopd.rollout import row_seeds, sample
from hopd.teacher import Teacher

PROBE_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75)


class count_saved_bytes:
    """Sums the bytes autograd saves for backward inside the block: the activation memory."""

    def __enter__(self) -> count_saved_bytes:
        self.bytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.bytes += t.numel() * t.element_size()
            return t

        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ctx.__exit__(*exc)


EXACT_DIAG_MAX_ELEMENTS = 50_000_000  # larger vocab x L x prompts: sampled KL estimate instead


def position_diagnostics(student: PreTrainedModel, teacher: Teacher,
                         prompts: list[list[int]], *, sampling: SamplingConfig, budget: int,
                         vocab: int, eos: int, pad: int, seed: int, step: int, buckets: int,
                         teacher_prompts: list[list[int]] | None = None
                         ) -> tuple[dict[str, Any], PositionReading]:
    """Per-position feedback at the full budget: rollouts of L tokens, bucketed by position.

    rkl_by_pos: mean exact reverse KL(s || t) over the vocabulary at the positions of each
    bucket (s: the student at temperature 1), from one extra no-grad student forward pass; with
    a remote teacher (top-k only), or when (prompts x L x vocab) is too large to hold, the
    sampled estimate log q(y_t) - log t(y_t) instead (`diag_rkl_exact` says which).
    teacher_entropy_by_pos: mean teacher entropy per bucket. Also returns the per-position
    sums the adaptive rule reads.
    """
    student.eval()
    r = sample(student, prompts, budget, eos_id=eos, pad_id=pad, temperature=sampling.temperature,
               row_seeds=row_seeds(seed, step, range(len(prompts)), stream="diag"))
    # exact needs the teacher's whole distribution (not a server's top-k) and (B, L, V) to fit
    full = teacher.full_distributions and \
        len(prompts) * budget * vocab <= EXACT_DIAG_MAX_ELEMENTS
    t = teacher.score(r, "full" if full else "sampled",
                      with_entropy=teacher.full_distributions, prompts=teacher_prompts)
    mask = r.response_mask_B_R.float()
    exact = t.logp_B_R_V is not None
    if exact:
        with torch.no_grad():
            s_logp = response_logits(student, r.ids_B_T, r.attn_B_T, r.prompt_len,
                                     vocab).float().log_softmax(-1)
        rkl = divergence(s_logp, t.logp_B_R_V, "rkl") * mask
    else:
        rkl = (r.sampler_logp_B_R - t.logp_B_R) * mask
    student.train()
    nb = buckets
    bucket_R = (torch.arange(r.response_mask_B_R.size(1)) * nb // budget).clamp(max=nb - 1)
    # a remote teacher returns top-k only: no entropy (NaN in the log)
    ent = (t.entropy_B_R if t.entropy_B_R is not None else torch.full_like(mask, math.nan)) * mask
    mask, rkl, ent = mask.cpu(), rkl.float().cpu(), ent.float().cpu()  # bucketed on the CPU
    zeros = torch.zeros(nb, dtype=torch.float32)
    count = zeros.index_add(0, bucket_R, mask.sum(0))
    rkl_b = zeros.index_add(0, bucket_R, rkl.sum(0)) / count.clamp(min=1)
    ent_b = zeros.index_add(0, bucket_R, ent.float().sum(0)) / count.clamp(min=1)
    nan = float("nan")
    short = budget - mask.size(1)  # all rows ended before L: positions past them hold nothing
    per_pos = [torch.nn.functional.pad(x, (0, short)).tolist()
               for x in (rkl.sum(0), (rkl * rkl).sum(0), mask.sum(0))]
    reading = PositionReading(per_pos[0], per_pos[1], [int(c) for c in per_pos[2]])
    return {"diag_rkl_by_pos": [v if c > 0 else nan for v, c in zip(rkl_b.tolist(), count)],
            "diag_teacher_entropy_by_pos": [v if c > 0 else nan
                                            for v, c in zip(ent_b.tolist(), count)],
            "diag_tokens_by_pos": count.int().tolist(), "diag_rkl_exact": exact}, reading


def peak_memory_mb(device: str) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# ---------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def recovery_probe(student: PreTrainedModel, teacher: PreTrainedModel,
                   tok: PreTrainedTokenizerBase, prompts: list[list[int]], answers: list[str],
                   check: Any, budget: int, fractions: tuple[float, ...] = PROBE_FRACTIONS,
                   teacher_prompts: list[list[int]] | None = None) -> dict[str, Any]:
    """Teacher accuracy when it finishes the student's greedy rollout from position p * L.

    The teacher continues from its own encoding of each prompt (`teacher_prompts`: its system
    turn or chat template, when they differ from the student's) followed by the student's
    response prefix."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    student_was = student.training
    student.eval()
    r = sample(student, prompts, budget, eos_id=eos, pad_id=pad, greedy=True)
    student.train(student_was)
    out: dict[str, Any] = {}
    for p in fractions:
        cut = int(p * budget)
        prefixes, kept = [], []
        for b, prompt in enumerate(teacher_prompts or prompts):
            n = int(r.response_mask_B_R[b].sum())
            ids = r.response_ids_B_R[b, : min(cut, n)].tolist()
            if eos in ids:  # the student finished before p * L: nothing left for the teacher
                ids = ids[: ids.index(eos)]
            kept.append(ids)
            prefixes.append(prompt + ids)
        cont = sample(teacher, prefixes, max(1, budget - cut), eos_id=eos, pad_id=pad,
                      greedy=True)
        texts = decode_responses(tok, cont.response_ids_B_R, cont.response_mask_B_R)
        correct = [check(tok.decode(k, skip_special_tokens=True) + t, a)
                   for k, t, a in zip(kept, texts, answers)]
        out[f"{p:g}"] = statistics.fmean(correct)
    return out
