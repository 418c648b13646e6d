"""One optimizer step of OPD at horizon H: sample -> score -> learn -> clip -> AdamW.

`opd_step` is the whole step for any sampler and any teacher; `learn` is its backward over
micro-batches; `StepStats` is what the step reports, already reduced over every process.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from hopd.diagnostics import count_saved_bytes
from hopd.dist import Dist
from hopd.distill_config import DistillConfig, LossConfig, SamplingConfig
from hopd.losses import (
    chunked_distribution_loss,
    distribution_loss,
    positions_per_chunk,
    repeated_ngrams,
    sampled_rkl,
    sft_loss,
    token_logprobs,
    token_weights,
    unlikelihood,
)
from hopd.models import chunkable, hidden_states_out, left_padding, response_logits
from hopd.rollout import Rollout, Sampler, filter_logits
from hopd.teacher import LocalTeacher, Teacher, TeacherScores


@dataclass
class StepStats:
    """One step's numbers; counts and means are over every process."""

    loss: float
    grad_norm: float
    finite: bool  # loss and gradient finite: the optimizer stepped
    sample_time_s: float
    teacher_time_s: float
    learn_time_s: float  # loss, backward, clipping and the optimizer step
    optim_time_s: float  # the optimizer step alone (on a GPU: as launched, not synchronised)
    sampled_tokens: int
    cut_rows: int  # rollouts that reached H without an EOS
    sampled_rkl: float  # mean over sampled tokens of log q(y) - log t(y)
    rho_mean: float  # importance ratio s(y) / q(y), token mean (sampled_rkl loss only)
    rho_max: float
    act_mem_mb: float  # activation memory autograd saved for backward (largest micro-batch)
    prompt_tokens: int = 0  # real (unpadded) prompt tokens of the step's rollouts
    # loss.unlikelihood: its term (weighted, beside `loss`), the share of the student's greedy
    # answer tokens inside a repeated n-gram, the greedy tokens decoded (prompts included) and
    # the tokens run forward and backward for the term
    ul_loss: float = 0.0
    greedy_repeats: float = 0.0
    greedy_tokens: int = 0
    ul_tokens: int = 0


def teacher_needs(loss: LossConfig) -> str:
    """What the loss needs from the teacher: the sampled tokens' log-probs, top-k, or all."""
    if loss.kind == "sampled_rkl":
        return "sampled"
    return "topk" if loss.top_k else "full"


def chunked(student: torch.nn.Module, rollout: Rollout, vocab: int, grad_accum: int) -> bool:
    """Whether the full-vocabulary loss runs in chunks of positions: when one micro-batch's
    [B, R, V] logits hold more than CHUNK_ELEMENTS and the student's head can be applied per
    chunk (`models.chunkable`); small steps keep the direct path."""
    rows = math.ceil(rollout.ids_B_T.size(0) / grad_accum)
    return (positions_per_chunk(rows, vocab) < rollout.response_ids_B_R.size(1)
            and chunkable(student))


def opd_step(student: PreTrainedModel, teacher: Teacher | PreTrainedModel,
             opt: torch.optim.Optimizer, prompts: list[list[int]], H: int, cfg: DistillConfig,
             *, sampler: Sampler, vocab: int, teacher_prompts: list[list[int]] | None = None,
             row_seeds: list[int] | None = None, dist: Dist | None = None,
             learner: torch.nn.Module | None = None, budget: int = 0,
             greedy: Sampler | None = None, unlearn: bool = True
             ) -> tuple[Rollout, TeacherScores, StepStats]:
    """One optimizer step of OPD at horizon H; returns the rollout, the teacher's scores and the
    step's stats.

    A step whose loss or gradient is not finite is skipped (no optimizer update). `sampler`
    draws the rollouts (the student's; the teacher's for the SFT baseline and supervised KD);
    `learner` is the module that runs forward/backward (the DDP wrapper of `student` when
    distributed); `budget` is L, for the `constant` normaliser. `greedy` is the student's greedy
    sampler, which loss.unlikelihood needs: its answers to the same prompts, to H or to
    loss.unlikelihood_horizon (at most `budget` when given); `unlearn=False` leaves the term out
    of this step (loss.unlikelihood_every).
    """
    ul_horizon = cfg.loss.unlikelihood_horizon or H
    ul_horizon = min(ul_horizon, budget) if budget else ul_horizon
    unlearn = bool(cfg.loss.unlikelihood) and unlearn
    if cfg.loss.unlikelihood and greedy is None:
        raise ValueError(f"loss.unlikelihood={cfg.loss.unlikelihood} needs the student's greedy "
                         "answers: pass greedy= (context.make_greedy builds it), or set "
                         "loss.unlikelihood=0")
    dist = dist or Dist.local()
    t0 = time.perf_counter()
    # 1. sample: <= H tokens per prompt
    with dist.full_weights(student):  # FSDP: the whole student on every rank while sampling
        if unlearn and ul_horizon == H and getattr(greedy, "twin_of", None) is sampler:
            # the twin's greedy answers decoded in the same batch as the rollouts
            rollout, answers = sampler.sample_with_greedy(prompts, H, row_seeds=row_seeds)
        else:
            rollout = sampler.sample(prompts, H, row_seeds=row_seeds)
            answers = greedy.sample(prompts, ul_horizon) if unlearn else None
    t1 = time.perf_counter()
    # 2. score: one teacher forward pass over prompt + response (SFT needs none)
    if cfg.loss.kind == "sft":
        scores = TeacherScores(logp_B_R=rollout.sampler_logp_B_R)
    else:
        if isinstance(teacher, torch.nn.Module):  # a bare model (benchmarks call it so)
            teacher = LocalTeacher(teacher, vocab)
        need = teacher_needs(cfg.loss)
        if need == "full" and chunked(learner or student, rollout, vocab, cfg.grad_accum) and \
                isinstance(teacher, LocalTeacher) and chunkable(teacher.model):
            need = "hidden"  # the teacher's log-probs too, a chunk at a time in the loss
        scores = teacher.score(rollout, need, cfg.loss.top_k, prompts=teacher_prompts)
    t2 = time.perf_counter()
    # 3. learn: per-token loss, backward over micro-batches, clip, AdamW
    opt.zero_grad(set_to_none=True)
    n_tokens, n_seqs = dist.sum([float(rollout.num_tokens), float(rollout.ids_B_T.size(0))])
    ul = {} if answers is None else unlearn_repeats(
        learner or student, answers, cfg.loss, vocab=vocab, grad_accum=cfg.grad_accum, dist=dist)
    local = learn(learner or student, rollout, scores, cfg.loss, sampling=cfg.sampling,
                  grad_accum=cfg.grad_accum, vocab=vocab, dist=dist, budget=budget,
                  totals=(int(n_tokens), n_seqs))
    trainable = [p for p in student.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
    gnorm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: DTensor
    # the step's results, reduced over the processes once
    mask = rollout.response_mask_B_R.float()
    rkl_sum = float(((rollout.sampler_logp_B_R - scores.logp_B_R) * mask).sum())
    n_prompt = float(rollout.attn_B_T[:, :rollout.prompt_len].sum())
    loss, rho_mean, n_cut, rkl_sum, n_prompt = dist.sum([local["loss"], local["rho_mean"],
                                                         float(rollout.cut_B.sum()), rkl_sum,
                                                         n_prompt])
    finite = math.isfinite(loss) and math.isfinite(gnorm)
    t_opt = time.perf_counter()
    if finite:
        opt.step()
    t3 = time.perf_counter()
    return rollout, scores, StepStats(
        loss=loss, grad_norm=gnorm, finite=finite, sample_time_s=t1 - t0,
        teacher_time_s=t2 - t1, learn_time_s=t3 - t2, optim_time_s=t3 - t_opt,
        sampled_tokens=int(n_tokens),
        cut_rows=int(n_cut), sampled_rkl=rkl_sum / max(n_tokens, 1), rho_mean=rho_mean,
        rho_max=local["rho_max"], act_mem_mb=local["act_mem_mb"], prompt_tokens=int(n_prompt),
        **ul)


def unlearn_repeats(learner: torch.nn.Module, answers: Rollout, loss_cfg: LossConfig, *,
                    vocab: int, grad_accum: int = 1, dist: Dist | None = None
                    ) -> dict[str, float | int]:
    """Sequence-level unlikelihood on the student's greedy `answers`: accumulates the gradient
    of loss.unlikelihood x `losses.unlikelihood` over the tokens of their repeated n-grams,
    divided by all their tokens (over every process), and returns the StepStats fields it
    fills. Runs before the step's main backward, without the gradient all-reduce (`no_sync`),
    so that the main backward reduces both. With one process only the answers that repeat are
    run forward; with several, all of them, so that every rank runs the same passes."""
    dist = dist or Dist.local()
    marks = repeated_ngrams(answers.response_ids_B_R, answers.response_mask_B_R,
                            loss_cfg.unlikelihood_n)
    n_tokens, n_marked = dist.sum([float(answers.num_tokens), float(marks.sum())])
    rows = torch.ones(marks.size(0), dtype=torch.bool) if dist.world > 1 else marks.any(-1).cpu()
    idx = rows.nonzero().squeeze(-1).tolist()
    mb = max(1, math.ceil(marks.size(0) / grad_accum))
    total, run = 0.0, 0
    for lo in range(0, len(idx), mb):
        part = torch.tensor(idx[lo:lo + mb], device=answers.ids_B_T.device)
        ids, attn = answers.ids_B_T[part], answers.attn_B_T[part]
        with dist.no_sync(learner, skip=True):
            logits = response_logits(learner, ids, attn, answers.prompt_len, vocab)
            logp = token_logprobs(logits, answers.response_ids_B_R[part])
            loss = loss_cfg.unlikelihood * unlikelihood(logp, marks[part], n_tokens)
            (loss * dist.world).backward()
        total += loss.item()
        run += int(attn.sum())
    total, decoded, run = dist.sum([total, float(answers.attn_B_T.sum()), float(run)])
    return {"ul_loss": total, "greedy_repeats": n_marked / max(n_tokens, 1.0),
            "greedy_tokens": int(decoded), "ul_tokens": int(run)}


def learn(student: PreTrainedModel, rollout: Rollout, teacher: TeacherScores, loss_cfg: LossConfig,
          *, vocab: int, sampling: SamplingConfig | None = None, grad_accum: int = 1,
          dist: Dist | None = None, budget: int = 0, totals: tuple[int, float] | None = None
          ) -> dict[str, float]:
    """Accumulates the step's gradient over `grad_accum` micro-batches; returns this process's
    loss stats (its share of the loss and of the token-mean importance ratio). `sampling` is
    the distribution the rollouts were drawn from (sampled_rkl's importance ratio; default T=1).

    Every micro-batch loss is weighted with the step's totals over all ranks (`totals`: response
    tokens and rows; reduced here when not given; token_mean divides by the token count), so the
    summed gradient equals the full batch's gradient whatever the split. With several ranks the
    backward is scaled by the world size, since DDP averages gradients.
    """
    dist = dist or Dist.local()  # a bare call never starts a process group
    B = rollout.ids_B_T.size(0)
    if totals is None:
        n, s = dist.sum([float(rollout.num_tokens), float(B)])
        totals = (int(n), s)
    n_tokens, n_seqs = totals
    mb = math.ceil(B / grad_accum)
    sampling = sampling or SamplingConfig()
    total, stats, act_bytes = 0.0, {"rho_mean": 0.0, "rho_max": 0.0}, 0
    kind = loss_cfg.kind
    teacher_in = None if kind in ("sampled_rkl", "sft") else teacher.as_loss_input()
    # full-vocabulary losses on long or wide steps: logits a chunk of positions at a time
    chunk = teacher_in is not None and (teacher.hidden_B_R_D is not None
                                        or chunked(student, rollout, vocab, grad_accum))
    R = rollout.response_mask_B_R.size(1)
    for lo, rows, cols in micro_batches(rollout, mb):
        mask = rollout.response_mask_B_R[rows, :cols]
        weight = None if loss_cfg.normalizer == "token_mean" and kind != "sft" else \
            token_weights(mask, loss_cfg.normalizer, n_tokens, n_seqs, budget or R)
        ids, attn, prompt_len = trimmed(rollout, rows, cols)
        with dist.no_sync(student, skip=lo + mb < B), count_saved_bytes() as saved, \
                (hidden_states_out(student) if chunk else nullcontext()) as head:
            logits = response_logits(student, ids, attn, prompt_len, None if chunk else vocab)
            if kind == "sampled_rkl":
                learner_logp = token_logprobs(as_sampled(logits, sampling),
                                              rollout.response_ids_B_R[rows, :cols])
                loss, s = sampled_rkl(learner_logp, rollout.sampler_logp_B_R[rows, :cols],
                                      teacher.logp_B_R[rows, :cols], mask, n_tokens,
                                      gamma=loss_cfg.gamma, clip_eps=loss_cfg.clip_eps,
                                      weight_B_R=weight)
                stats["rho_mean"] += s["rho_mean"] * float(mask.sum()) / max(n_tokens, 1)
                stats["rho_max"] = max(stats["rho_max"], s["rho_max"])
            elif kind == "sft":
                loss = sft_loss(token_logprobs(logits, rollout.response_ids_B_R[rows, :cols]),
                                weight)
            else:
                sub = {k: v[rows, :cols] if isinstance(v, torch.Tensor) else v
                       for k, v in teacher_in.items()}
                if head is not None:  # `logits` are the last hidden states here
                    loss = chunked_distribution_loss(logits, head, sub, mask, n_tokens, kind,
                                                     loss_cfg.beta, weight_B_R=weight,
                                                     vocab=vocab)
                else:
                    loss = distribution_loss(logits, sub, mask, n_tokens, kind, loss_cfg.beta,
                                             weight_B_R=weight)
            (loss * dist.world).backward()
        act_bytes = max(act_bytes, saved.bytes)
        total += loss.item()
    return {"loss": total, "act_mem_mb": act_bytes / 2**20, **stats}


def micro_batches(rollout: Rollout, mb: int) -> list[tuple[int, torch.Tensor, int]]:
    """The step's micro-batches of `mb` rows: (first index, row indices, response columns).
    With several, rows go longest response first, so that each micro-batch holds rows of like
    length and runs only up to its own longest response (`cols`); one micro-batch keeps the
    rows' order and every column."""
    B, R = rollout.response_mask_B_R.shape
    if mb >= B:
        return [(0, torch.arange(B, device=rollout.ids_B_T.device), R)]
    lengths = rollout.response_mask_B_R.sum(-1)
    order = torch.argsort(lengths, descending=True, stable=True)
    return [(lo, order[lo:lo + mb], max(1, int(lengths[order[lo]])))
            for lo in range(0, B, mb)]


def trimmed(rollout: Rollout, rows: torch.Tensor, cols: int
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, attention mask, prompt length) of `rows` up to response column `cols`, without
    the left-padding columns that all of them share: the same tokens at the same positions,
    for less work."""
    attn = rollout.attn_B_T[rows, :rollout.prompt_len + cols]
    pad = int(left_padding(attn[:, :rollout.prompt_len]).min())
    ids = rollout.ids_B_T[rows, pad:rollout.prompt_len + cols]
    return ids, attn[:, pad:], rollout.prompt_len - pad


def as_sampled(logits_B_R_V: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The learner's logits turned into the distribution the sampler drew from: divided by the
    temperature and with the same top-k / top-p filter (verl's convention).

    The importance ratio rho = s(y) / q(y) is then 1 when learner and sampler share weights, and
    the sampled-token reward -(log q - log t) is minus the reverse KL of that tempered, filtered
    student from the teacher. At temperature 1 without filters it is the logits unchanged."""
    T, k, p = sampling.temperature, sampling.top_k, sampling.top_p
    if T == 1.0 and k == 0 and p == 1.0:
        return logits_B_R_V
    flat = logits_B_R_V.float().reshape(-1, logits_B_R_V.size(-1)) / T
    return filter_logits(flat, k, p).reshape(logits_B_R_V.shape)
