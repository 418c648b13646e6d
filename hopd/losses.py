"""Per-token distillation objectives.

Notation: s = student (learner, pi_theta), q = the sampler that drew the rollout (pi_old), t =
teacher. Inputs are per response position: (B, R) for sampled-token terms, (B, R, V) for
distributions. `mask_B_R` is 1 on sampled tokens (EOS included) and 0 on padding after EOS or past
the horizon.

Normalisation: every loss is a *sum* over masked positions divided by `num_tokens`, the number of
response tokens in the whole optimizer step (all micro-batches, all ranks). Summing the losses of
micro-batches therefore gives exactly the token mean of the full batch, so gradient accumulation
and batch splitting do not change the gradient (unlike dividing each micro-batch by its own count,
or by the count of reference-answer tokens). Other normalisers (`token_weights`) pass per-token
weights instead, built from step-wide counts for the same reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

# loss.normalizer: how the per-token terms of one optimizer step are weighted. Under AdamW the
# choice barely changes the size of an update (Adam divides by the gradient's running scale), so
# it decides how positions and sequences share the update, not how large it is.
from hopd.distill_config import NORMALIZERS  # noqa: E402  (names and meanings)


def token_weights(mask_B_R: torch.Tensor, normalizer: str, step_tokens: float,
                  step_seqs: float, budget: int) -> torch.Tensor:
    """(B, R) weights w with loss = sum_t w_t * term_t, for one micro-batch of a step.

    `step_tokens` and `step_seqs` count the whole optimizer step (all micro-batches and ranks),
    so that the summed micro-batch losses equal the full batch's loss for every normaliser.
    token_mean: mask / N;  seq_mean: mask / (len_b * S);  constant: mask / (S * L);  sum: mask.
    """
    mask = mask_B_R.double()  # float64: exact counts, cast to the loss dtype by each loss
    if normalizer == "token_mean":
        return mask / max(step_tokens, 1.0)
    if normalizer == "seq_mean":
        lengths = mask.sum(-1, keepdim=True).clamp(min=1)
        return mask / lengths / max(step_seqs, 1.0)
    if normalizer == "constant":
        return mask / max(step_seqs * budget, 1.0)
    if normalizer == "sum":
        return mask
    raise ValueError(f"unknown normalizer {normalizer!r}: choose one of {', '.join(NORMALIZERS)}")


def token_logprobs(logits_B_R_V: torch.Tensor, ids_B_R: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[id] at each position, in float32 or higher."""
    logits = logits_B_R_V if logits_B_R_V.dtype == torch.float64 else logits_B_R_V.float()
    return logits.log_softmax(-1).gather(-1, ids_B_R.unsqueeze(-1)).squeeze(-1)


def discounted_returns(reward_B_R: torch.Tensor, mask_B_R: torch.Tensor, gamma: float
                       ) -> torch.Tensor:
    """G_t = sum_{u >= t} gamma^(u - t) r_u over masked positions; G_t = r_t when gamma == 0."""
    r = reward_B_R * mask_B_R
    if gamma == 0.0:
        return r
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.size(1) - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out * mask_B_R


def sampled_rkl(
    learner_logp_B_R: torch.Tensor,
    sampler_logp_B_R: torch.Tensor,
    teacher_logp_B_R: torch.Tensor,
    mask_B_R: torch.Tensor,
    num_tokens: int | float,
    gamma: float = 0.0,
    clip_eps: float = 0.0,
    weight_B_R: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sampled-token reverse KL used as a per-token advantage (Thinking Machines / tinker recipe).

    r_t = -(log q(y_t) - log t(y_t))                  (detached; minus the per-token reverse KL)
    A_t = sum_{u >= t} gamma^(u - t) r_u               (gamma = 0: A_t = r_t, the default)
    rho_t = exp(log s(y_t) - log q(y_t))               (importance ratio learner / sampler)
    loss = -sum_t mask_t * rho_t * A_t / num_tokens     (or -sum_t w_t rho_t A_t with weights)

    With `clip_eps` > 0 the PPO surrogate min(rho A, clip(rho, 1 - eps, 1 + eps) A) replaces
    rho A. At rho = 1 the gradient is -A_t grad log s(y_t): the REINFORCE gradient of the
    reverse KL with the teacher's log-prob ratio as reward.
    """
    mask = mask_B_R.to(learner_logp_B_R.dtype)
    reward = -(sampler_logp_B_R - teacher_logp_B_R).detach().to(learner_logp_B_R.dtype)
    adv = discounted_returns(reward, mask, gamma)
    rho = torch.exp(learner_logp_B_R - sampler_logp_B_R.detach())
    surrogate = rho * adv
    if clip_eps > 0:
        surrogate = torch.minimum(surrogate, rho.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if weight_B_R is not None:
        loss = -(surrogate * weight_B_R.to(surrogate.dtype)).sum()
    else:
        loss = -(surrogate * mask).sum() / max(float(num_tokens), 1.0)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {"sampled_rkl_sum": float(-(reward * mask).sum()),
                 "rho_mean": float((rho * mask).sum() / n),
                 "rho_max": float((rho * mask).max()) if mask.any() else 1.0}
    return loss, stats


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last axis, from log-probabilities (0 * log 0 taken as 0)."""
    p_a = logp_a.exp()
    return torch.where(p_a > 0, p_a * (logp_a - logp_b), torch.zeros_like(p_a)).sum(-1)


def divergence(student_logp_B_R_V: torch.Tensor, teacher_logp_B_R_V: torch.Tensor, kind: str,
               beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence (B, R) between full next-token distributions.

    rkl: KL(s || t) = sum_v s_v (log s_v - log t_v)
    fkl: KL(t || s) = sum_v t_v (log t_v - log s_v)
    jsd: generalized JSD with weight beta (GKD; TRL's convention): with m = beta t + (1 - beta) s,
         JSD_beta = beta KL(t || m) + (1 - beta) KL(s || m); beta = 0 is fkl and beta = 1 is rkl.
    """
    s, t = student_logp_B_R_V, teacher_logp_B_R_V
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl(s, t)
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl(t, s)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta={beta}: must be in [0, 1]")
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        m = torch.logsumexp(torch.stack([t + torch.log(b), s + torch.log1p(-b)]), dim=0)
        return beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    raise ValueError(f"unknown divergence {kind!r}: choose rkl, fkl or jsd")


def topk_with_tail(student_logp_B_R_V: torch.Tensor, teacher_topk_logp_B_R_K: torch.Tensor,
                   teacher_topk_ids_B_R_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions restricted to the teacher's top-k tokens plus one tail bucket.

    Returns (student, teacher) log-probs of shape (B, R, K + 1): the K tokens, then log(1 - mass).
    A divergence on these coarsened distributions is a lower bound of the full one (data
    processing inequality) and equals it when the teacher's tail mass is zero.
    """
    s_k = student_logp_B_R_V.gather(-1, teacher_topk_ids_B_R_K)
    return _with_tail(s_k), _with_tail(teacher_topk_logp_B_R_K)


TAIL_FLOOR = 1e-10


def _with_tail(logp_k: torch.Tensor) -> torch.Tensor:
    mass = torch.logsumexp(logp_k, dim=-1, keepdim=True)
    # log(1 - exp(mass)) via expm1 for accuracy; the floor keeps the value and its gradient
    # finite when the tail is (numerically) empty
    tail = torch.log((-torch.expm1(mass)).clamp(min=TAIL_FLOOR))
    return torch.cat([logp_k, tail], dim=-1)


def distribution_loss(student_logits_B_R_V: torch.Tensor, teacher: dict[str, torch.Tensor],
                      mask_B_R: torch.Tensor, num_tokens: int | float, kind: str,
                      beta: float = 0.5, weight_B_R: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """sum_t mask_t * D_t / num_tokens for D in {rkl, fkl, jsd} on full or top-k distributions
    (sum_t w_t * D_t when per-token weights are given).

    `teacher` holds either `logp_B_R_V` (full) or `topk_logp_B_R_K` and `topk_ids_B_R_K`.
    """
    dtype = torch.float64 if student_logits_B_R_V.dtype == torch.float64 else torch.float32
    s = student_logits_B_R_V.to(dtype).log_softmax(-1)
    if "topk_ids_B_R_K" in teacher:
        s, t = topk_with_tail(s, teacher["topk_logp_B_R_K"].to(dtype), teacher["topk_ids_B_R_K"])
    else:
        t = teacher["logp_B_R_V"].to(dtype)
    d = divergence(s, t, kind, beta)
    if weight_B_R is not None:
        return (d * weight_B_R.to(dtype)).sum()
    return (d * mask_B_R.to(dtype)).sum() / max(float(num_tokens), 1.0)


def sft_loss(learner_logp_B_R: torch.Tensor, weight_B_R: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the given response tokens: -sum_t w_t log s(y_t).

    The off-policy baseline (sequence-level KD): y are the teacher's own samples, not the
    student's, so the student learns from states it may never reach itself."""
    return -(learner_logp_B_R * weight_B_R.to(learner_logp_B_R.dtype)).sum()


def repeated_ngrams(ids_B_R: torch.Tensor, mask_B_R: torch.Tensor, n: int) -> torch.Tensor:
    """(B, R) bool: the tokens of every n-gram that already occurred, whole, earlier in its
    row's response (masked positions only). These are sequence-level unlikelihood's negative
    candidates (Welleck et al., 2020). An earlier occurrence must end before the n-gram
    starts: in "a b a b a" with n = 2, "a b" at positions 2-3 repeats the one at 0-1 and "b a"
    at 3-4 the one at 1-2, so positions 2, 3 and 4 are marked; in "x x x x", positions 2 and 3."""
    out = torch.zeros(ids_B_R.shape, dtype=torch.bool)
    for b, (row, m) in enumerate(zip(ids_B_R.tolist(), mask_B_R.tolist(), strict=True)):
        tokens = row[:int(sum(m))]
        first: dict[tuple[int, ...], int] = {}  # n-gram -> where its first occurrence ends
        for s in range(len(tokens) - n + 1):
            g = tuple(tokens[s:s + n])
            if g in first and first[g] <= s:
                out[b, s:s + n] = True
            first.setdefault(g, s + n)
    return out.to(ids_B_R.device)


def unlikelihood(learner_logp_B_R: torch.Tensor, marks_B_R: torch.Tensor,
                 num_tokens: int | float) -> torch.Tensor:
    """-sum_t marks_t log(1 - s(y_t)) / num_tokens: pushes down the probability of each marked
    token where it stands (sequence-level unlikelihood). log(1 - p) is computed as
    log(-expm1(log p)), floored at TAIL_FLOOR so that p = 1 keeps a finite value and gradient."""
    one_minus = (-torch.expm1(learner_logp_B_R)).clamp(min=TAIL_FLOOR)
    marks = marks_B_R.to(learner_logp_B_R.dtype)
    return -(torch.log(one_minus) * marks).sum() / max(float(num_tokens), 1.0)


def entropy(logp_B_R_V: torch.Tensor) -> torch.Tensor:
    p = logp_B_R_V.exp()
    return -torch.where(p > 0, p * logp_B_R_V, torch.zeros_like(p)).sum(-1)


# Logits elements one chunk of positions may hold (512 MiB in float32): the full-vocabulary
# losses never hold a [B, R, V] tensor (nor its gradient) past this, whatever B, R and V are.
# Below it the direct path runs (no recomputation: the real pair's B = 8 x 128 x 49,152 stays
# direct). HOPD_CHUNK_ELEMENTS sets it (smaller: less memory, more head passes; tests: tiny).
CHUNK_ELEMENTS = int(os.environ.get("HOPD_CHUNK_ELEMENTS", 2 ** 27))


def positions_per_chunk(rows: int, vocab: int) -> int:
    """Positions per chunk so that `rows` x positions x `vocab` <= CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(1, rows * vocab))


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, vocab: int | None
                  ) -> torch.Tensor:
    """float32 log-probs from last hidden states through an output head (on the head's
    device), cut to `vocab`: how a teacher's chunk of log-probs is made, as `teacher.score`
    makes its full ones."""
    logits = head(hidden.to(head.weight.device))
    logits = logits[..., :vocab] if vocab else logits
    return logits.float().log_softmax(-1)


def chunked_distribution_loss(hidden_B_R_D: torch.Tensor, head: Callable[[torch.Tensor],
                              torch.Tensor], teacher: dict, mask_B_R: torch.Tensor,
                              num_tokens: int | float, kind: str, beta: float = 0.5,
                              weight_B_R: torch.Tensor | None = None, vocab: int | None = None,
                              chunk: int = 0) -> torch.Tensor:
    """`distribution_loss` from the student's last hidden states, a chunk of positions at a
    time, each chunk under `torch.utils.checkpoint`: its logits (`head`), log-softmax and
    divergence exist only while that chunk is computed, forward and again in backward, so
    peak memory holds one chunk's [B, c, V] tensors instead of the whole [B, R, V] and its
    gradient. The sum over chunks equals the unchunked loss (the same per-position terms).

    `teacher` holds either the teacher's top-k (`topk_logp_B_R_K`, `topk_ids_B_R_K`), its full
    log-probs (`logp_B_R_V`), or its own last hidden states and head (`hidden_B_R_D`, `head`),
    whose log-probs are then computed per chunk too, without gradient.
    """
    R = mask_B_R.size(1)
    chunk = chunk or positions_per_chunk(mask_B_R.size(0), vocab or head.weight.size(0))
    keys = [k for k, v in teacher.items() if isinstance(v, torch.Tensor)]
    t_head = teacher.get("head")

    def part(sl: slice, h: torch.Tensor, *t_vals: torch.Tensor) -> torch.Tensor:
        logits = head(h)[..., :vocab] if vocab else head(h)
        t = dict(zip(keys, t_vals))
        if t_head is not None:  # the teacher's log-probs of this chunk, on its own device
            with torch.no_grad():
                th = t.pop("hidden_B_R_D")
                t["logp_B_R_V"] = head_logprobs(t_head, th, vocab).to(logits.device)
        w = weight_B_R[:, sl] if weight_B_R is not None else None
        return distribution_loss(logits, t, mask_B_R[:, sl], num_tokens, kind, beta,
                                 weight_B_R=w)

    total = hidden_B_R_D.new_zeros((), dtype=torch.float64 if hidden_B_R_D.dtype ==
                                   torch.float64 else torch.float32)
    for lo in range(0, R, chunk):
        sl = slice(lo, min(R, lo + chunk))
        args = [hidden_B_R_D[:, sl], *(teacher[k][:, sl] for k in keys)]
        total = total + checkpoint(part, sl, *args, use_reentrant=False)
    return total
