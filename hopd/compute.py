"""A cost that the machine's load cannot change: the arithmetic a training step does.

Wall-clock time depends on what else the machine runs (one step of the same run took 0.75 s or
34.7 s on a shared 2-core machine), so the report's verdicts compare strategies on sampled tokens
and on this estimate, and show wall-clock beside them. The estimate is the usual one for
transformers (Kaplan et al., 2020): a forward pass costs 2 FLOPs per weight a token is multiplied
by, and a backward pass twice that. Attention's own arithmetic (quadratic in length) is left out;
at the lengths hopd trains on it is small beside the weights' and the same for every strategy of
one comparison at a given horizon.

Per step, with P the prompt tokens and R the sampled response tokens (padding excluded):
  sampling:  2 F_sampler (P + R)   (prefill, then one cached decode step per token; the sampler
                                    is the teacher for SFT and supervised KD)
  teacher:   2 F_teacher (P + R)   (one scoring pass; none for SFT, which needs only the tokens)
  learning:  6 F_student (P + R)   (forward and backward over prompt and response)
"""

from __future__ import annotations

import torch


def forward_flops_per_token(model: torch.nn.Module | None) -> float:
    """2 x the weights one token is multiplied by in a forward pass: every parameter except the
    input embedding table, which is a lookup (counted once when it is tied to the output head,
    which is a product). 0 for no model (a teacher behind a server, whose size is unknown)."""
    if model is None:
        return 0.0
    unique = {id(p): p for p in model.parameters()}
    total = sum(_numel(p) for p in unique.values())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None:
        tied = head is not None and head.weight is emb.weight
        if not tied:
            total -= _numel(emb.weight)
    return 2.0 * total


def _numel(p: torch.Tensor) -> int:
    """Global element count (a sharded FSDP parameter reports its whole shape)."""
    return int(torch.Size(p.shape).numel())


def step_flops(student: float, teacher: float, prompt_tokens: float, response_tokens: float,
               teacher_samples: bool = False, scored: bool = True) -> float:
    """The estimated FLOPs of one step (module docstring), from per-token forward costs:
    `teacher_samples` when the teacher writes the answers, `scored` when it also scores them."""
    tokens = prompt_tokens + response_tokens
    sampler = teacher if teacher_samples else student
    scoring = teacher if scored else 0.0
    return tokens * (sampler + scoring + 3.0 * student)
