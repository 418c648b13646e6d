"""On-policy distillation with a rollout-horizon schedule: the loop, top to bottom.

Each optimizer step:  H = schedule(step) -> the student samples <= H tokens per prompt -> the
teacher scores them in one forward pass -> per-token loss, backward over micro-batches -> clip,
AdamW, LR schedule -> one flushed line in metrics.jsonl. Every few steps: a full-budget greedy
evaluation, per-position diagnostics, a checkpoint. Each phase is timed.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel

from hopd import config as C
from hopd.adaptive import (
    AdaptiveRule,
    AdaptiveState,
    adaptive_update,
    recovery_probe,
    token_budget_batch,
)
from hopd.dist import Dist
from hopd.distill_config import (  # noqa: F401  (re-exported: the loop's public settings)
    ALIASES,
    LOSSES,
    DistillConfig,
    LoraSection,
    LossConfig,
    OptimConfig,
    SamplingConfig,
    TrainingStopped,
    load_config,
)
from hopd.evaluate import encode_prompts, evaluate
from hopd.horizon import describe, horizon_at, initial_horizon
from hopd.losses import distribution_loss, divergence, sampled_rkl, token_logprobs
from hopd.models import (
    attach_lora,
    check_compatible,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from hopd.progress import Bar, MetricsLog
from hopd.rollout import Rollout, sample
from hopd.runstate import (
    StopFlag,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    truncate_metrics,
)
from hopd.serve import RemoteTeacher, TeacherUnavailable
from hopd.sft import warmup_cosine
from hopd.tasks import PromptSource
from hopd.teacher import TeacherScores, response_logits, score

# ---------------------------------------------------------------------------------------------
# Pieces of one step


Scorer = Callable[..., TeacherScores]  # (rollout, need, top_k, with_entropy, prompts) -> scores


def local_scorer(teacher_model: PreTrainedModel, vocab: int | None = None) -> Scorer:
    def scorer(rollout: Rollout, need: str = "sampled", top_k: int = 0,
               with_entropy: bool = False, prompts: list[list[int]] | None = None
               ) -> TeacherScores:
        return score(teacher_model, rollout, need, top_k, with_entropy, vocab, prompts)
    return scorer


def opd_step(student: PreTrainedModel, teacher: PreTrainedModel | Scorer,
             opt: torch.optim.Optimizer,
             prompts: list[list[int]], H: int, cfg: DistillConfig, vocab: int, eos: int, pad: int,
             gen: torch.Generator | None, teacher_prompts: list[list[int]] | None = None,
             need: str = "sampled", row_seeds: list[int] | None = None,
             dist: Dist | None = None, learner: torch.nn.Module | None = None,
             ) -> tuple[Rollout, TeacherScores, dict[str, Any]]:
    """One optimizer step of OPD at horizon H: sample -> score -> learn -> clip -> AdamW.

    A step whose loss or gradient is not finite is skipped (no optimizer update). Pass
    eos = -1 to force every rollout to the full H (benchmarks compare equal lengths that way).
    `learner` is the module that runs forward/backward (the DDP wrapper of `student` when
    distributed); sampling always uses the plain `student`.
    """
    t0 = time.perf_counter()
    # 1. sample: the student draws <= H tokens per prompt
    dist = dist or Dist.local()
    student.eval()
    with dist.full_weights(student):  # FSDP: the whole student on every rank while sampling
        rollout = sample(student, prompts, H, eos, pad, cfg.sampling.temperature,
                         cfg.sampling.top_k, cfg.sampling.top_p, generator=gen,
                         row_seeds=row_seeds, cuda_graph=cfg.sampling.cuda_graph)
    student.train()
    t1 = time.perf_counter()
    # 2. score: one teacher forward pass over prompt + response
    scorer = local_scorer(teacher, vocab) if isinstance(teacher, torch.nn.Module) else teacher
    scores = scorer(rollout, need, cfg.loss.top_k, prompts=teacher_prompts)
    t2 = time.perf_counter()
    # 3. learn: per-token loss, backward over micro-batches, clip, AdamW
    opt.zero_grad(set_to_none=True)
    stats = learn(learner or student, rollout, scores, cfg, vocab, dist)
    trainable = [p for p in student.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
    gnorm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: DTensor
    finite = math.isfinite(stats["loss"]) and math.isfinite(gnorm)
    if finite:
        opt.step()
    t3 = time.perf_counter()
    stats.update(grad_norm=gnorm, finite=finite, sample_time_s=t1 - t0,
                 teacher_time_s=t2 - t1, learn_time_s=t3 - t2)
    return rollout, scores, stats


def schedule_step(step: int, totals: dict[str, float], cfg: DistillConfig) -> int:
    """The step that the horizon and LR schedules see.

    With a steps budget it is the optimizer step. With a time or token budget, schedules follow
    the fraction of that budget already spent, mapped onto max_steps, so that a progressive
    schedule reaches L at the same fraction of the budget for every strategy.
    """
    fractions = [step / cfg.max_steps]
    if cfg.max_time_s:
        fractions.append(totals["train_time_s"] / cfg.max_time_s)
    if cfg.max_tokens:
        fractions.append(totals["sampled_tokens"] / cfg.max_tokens)
    return min(cfg.max_steps - 1, int(max(fractions) * cfg.max_steps))


def budget_spent(step: int, totals: dict[str, float], cfg: DistillConfig) -> bool:
    return (step >= cfg.max_steps
            or (cfg.max_time_s > 0 and totals["train_time_s"] >= cfg.max_time_s)
            or (cfg.max_tokens > 0 and totals["sampled_tokens"] >= cfg.max_tokens))


def learn(student: PreTrainedModel, rollout: Rollout, teacher: TeacherScores, cfg: DistillConfig,
          vocab: int, dist: Dist | None = None) -> dict[str, float]:
    """Accumulates the step's gradient over `grad_accum` micro-batches; returns loss stats.

    Every micro-batch loss is divided by the step's total response-token count (over all ranks),
    so the summed gradient equals the full batch's token-mean gradient whatever the split. With
    several ranks the backward is scaled by the world size, since DDP averages gradients.
    """
    dist = dist or Dist.local()  # a bare call never starts a process group
    n_tokens = int(dist.sum([float(rollout.num_tokens)])[0])
    B = rollout.ids_B_T.size(0)
    mb = math.ceil(B / cfg.grad_accum)
    total, stats, act_bytes = 0.0, {"rho_mean": 0.0, "rho_max": 0.0}, 0
    teacher_in = None if cfg.loss.kind == "sampled_rkl" else teacher.as_loss_input()
    for lo in range(0, B, mb):
        rows = slice(lo, lo + mb)
        mask = rollout.response_mask_B_R[rows]
        with dist.no_sync(student, skip=lo + mb < B), _count_saved_bytes() as saved:
            logits = response_logits(student, rollout.ids_B_T[rows], rollout.attn_B_T[rows],
                                     rollout.prompt_len, vocab)
            if cfg.loss.kind == "sampled_rkl":
                learner_logp = token_logprobs(logits, rollout.response_ids_B_R[rows])
                loss, s = sampled_rkl(learner_logp, rollout.sampler_logp_B_R[rows],
                                      teacher.logp_B_R[rows], mask, n_tokens,
                                      gamma=cfg.loss.gamma, clip_eps=cfg.loss.clip_eps)
                stats["rho_mean"] += s["rho_mean"] * float(mask.sum()) / max(n_tokens, 1)
                stats["rho_max"] = max(stats["rho_max"], s["rho_max"])
            else:
                sub = {k: v[rows] for k, v in teacher_in.items()}
                loss = distribution_loss(logits, sub, mask, n_tokens, cfg.loss.kind,
                                         cfg.loss.beta)
            (loss * dist.world).backward()
        act_bytes = max(act_bytes, saved.bytes)
        total += loss.item()
    total, stats["rho_mean"] = dist.sum([total, stats["rho_mean"]])
    return {"loss": total, "act_mem_mb": act_bytes / 2**20, **stats}


class _count_saved_bytes:
    """Sums the bytes autograd saves for backward inside the block: the activation memory."""

    def __enter__(self) -> _count_saved_bytes:
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


def position_diagnostics(student: PreTrainedModel, scorer: Scorer,
                         prompts: list[list[int]], cfg: DistillConfig, budget: int, vocab: int,
                         eos: int, pad: int, step: int,
                         teacher_prompts: list[list[int]] | None = None) -> dict[str, Any]:
    """Per-position feedback at the full budget: rollouts of L tokens, bucketed by position.

    rkl_by_pos: mean exact reverse KL(s || t) over the vocabulary at the positions of each
    bucket (s: the student at temperature 1), from one extra no-grad student forward pass; with
    a remote teacher (top-k only), or when (prompts x L x vocab) is too large to hold, the
    sampled estimate log q(y_t) - log t(y_t) instead (`diag_rkl_exact` says which).
    teacher_entropy_by_pos: mean teacher entropy per bucket.
    """
    student.eval()
    r = sample(student, prompts, budget, eos, pad, temperature=cfg.sampling.temperature,
               row_seeds=[(cfg.seed * 7919 + step) * 4099 + i for i in range(len(prompts))])
    t = None
    if len(prompts) * budget * vocab <= EXACT_DIAG_MAX_ELEMENTS:  # (B, L, V) fits comfortably
        try:
            t = scorer(r, "full", with_entropy=True, prompts=teacher_prompts)
        except TeacherUnavailable:  # a remote teacher: sampled tokens only
            pass
    if t is None:
        t = scorer(r, with_entropy=True, prompts=teacher_prompts)
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
    nb = cfg.diag_buckets
    bucket_R = (torch.arange(r.response_mask_B_R.size(1)) * nb // budget).clamp(max=nb - 1)
    # a remote teacher returns top-k only: no entropy (NaN in the log)
    ent = (t.entropy_B_R if t.entropy_B_R is not None else torch.full_like(mask, math.nan)) * mask
    mask, rkl, ent = mask.cpu(), rkl.float().cpu(), ent.float().cpu()  # bucketed on the CPU
    zeros = torch.zeros(nb, dtype=torch.float32)
    count = zeros.index_add(0, bucket_R, mask.sum(0))
    rkl_b = zeros.index_add(0, bucket_R, rkl.sum(0)) / count.clamp(min=1)
    ent_b = zeros.index_add(0, bucket_R, ent.float().sum(0)) / count.clamp(min=1)
    nan = float("nan")
    return {"diag_rkl_by_pos": [v if c > 0 else nan for v, c in zip(rkl_b.tolist(), count)],
            "diag_teacher_entropy_by_pos": [v if c > 0 else nan
                                            for v, c in zip(ent_b.tolist(), count)],
            "diag_tokens_by_pos": count.int().tolist(), "diag_rkl_exact": exact}


def peak_memory_mb(device: str) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# ---------------------------------------------------------------------------------------------
# The loop


def distill(cfg: DistillConfig, run: Path, resume: bool = False, progress: bool = True
            ) -> dict[str, Any]:
    """Runs OPD with the configured horizon schedule; writes everything under `run`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = Dist(cfg.device, parallel=cfg.parallel)  # one process, or a rank of several
    device = dist.device
    if cfg.batch_size % dist.world:
        raise C.ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {dist.world} "
                            "processes: each rank takes an equal slice of every step's prompts")
    # Everything that can be wrong is checked before any model is loaded or token sampled:
    # the data, the horizon against the budget, the tokenizer pair, the context length.
    source = PromptSource(cfg.data, cfg.eval_data, cfg.data_prompt_field, cfg.data_answer_field)
    budget = cfg.budget or source.default_budget()
    cfg.horizon.validate(budget)
    s_path = resolve_model_path(cfg.student)
    tok = load_tokenizer(str(s_path))
    s_conf = json.loads((s_path / "config.json").read_text())
    s_vocab = s_conf.get("vocab_size", len(tok))
    remote = None
    if cfg.teacher_url:  # the teacher runs elsewhere: check it answers and shares the tokenizer
        remote = RemoteTeacher(cfg.teacher_url, cfg.teacher_timeout_s, cfg.teacher_retries)
        remote.check_tokenizer(tok)
        t_tok, t_conf, vocab = tok, {}, s_vocab
    else:
        t_path = resolve_model_path(cfg.teacher)
        t_tok = load_tokenizer(str(t_path))
        t_conf = json.loads((t_path / "config.json").read_text())
        t_vocab = t_conf.get("vocab_size", len(t_tok))
        check_compatible(t_tok, tok, t_vocab, s_vocab)
        vocab = min(s_vocab, t_vocab)
    eval_examples = source.eval_set(cfg.eval_n, seed=cfg.seed)
    teacher_system = cfg.teacher_system_prompt or cfg.system_prompt
    separate_teacher_prompt = bool(cfg.teacher_system_prompt) or (
        t_tok.chat_template != tok.chat_template)
    probe = [e.prompt for e in eval_examples] + [
        e.prompt for e in source.train_batch(0, cfg.batch_size, cfg.seed)]
    longest = max(len(p) for p in encode_prompts(tok, probe, cfg.system_prompt))
    if separate_teacher_prompt:
        longest = max(longest, max(len(p) for p in encode_prompts(t_tok, probe, teacher_system)))
    for name, conf in (("student", s_conf), ("teacher", t_conf)):
        ctx = conf.get("max_position_embeddings")
        if ctx and longest + budget > ctx:
            raise C.ConfigError(
                f"prompts of up to {longest} tokens plus the budget L={budget} exceed the "
                f"{name}'s context of {ctx} tokens: lower budget or use shorter prompts")

    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    ckpt = latest_checkpoint(run) if resume else None
    state = load_trainer_state(ckpt) if ckpt is not None else None
    # FSDP saves the optimizer state keyed by parameter name, DDP by position: not interchangeable
    written = state.get("parallel", "ddp") if state is not None else dist.parallel
    if written != dist.parallel:
        raise C.ConfigError(
            f"{ckpt} was written with parallel={written} and this run is "
            f"parallel={dist.parallel} "
            "(one process counts as ddp): resume it the way it was run, or start again with "
            "--overwrite")
    if cfg.lora.rank:  # checkpoints hold the adapter only; the base comes from `student`
        student = attach_lora(load_model(str(s_path), device, cfg.dtype), cfg.lora.rank,
                              cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                              adapter=ckpt)
    else:
        student = load_model(str(ckpt or s_path), device, cfg.dtype)
    if remote is not None:
        scorer: Scorer = remote.score
    else:
        teacher_model = load_model(str(t_path), cfg.teacher_device or device,
                                   cfg.teacher_dtype or cfg.dtype).eval()
        teacher_model.requires_grad_(False)
        scorer = local_scorer(teacher_model, vocab)
    student.train()
    learner = dist.wrap(student)  # DDP wrapper or FSDP-sharded student: forward/backward
    trainable = [p for p in student.parameters() if p.requires_grad]  # sharded under FSDP
    opt = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.optim.weight_decay)
    start, totals = 0, {"train_time_s": 0.0, "sampled_tokens": 0, "skipped_steps": 0,
                        "prompts": 0}
    adaptive = AdaptiveState(initial_horizon(cfg.horizon, budget))
    rule = AdaptiveRule(budget, cfg.horizon.adaptive_window, cfg.horizon.adaptive_growth,
                        cfg.horizon.adaptive_ratio, cfg.horizon.adaptive_threshold,
                        cfg.horizon.adaptive_plateau, cfg.horizon.adaptive_patience,
                        cfg.horizon.adaptive_drift)
    if ckpt is not None and state is not None:
        dist.load_optimizer_state(student, opt, state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, totals = state["step"], {**totals, **state["totals"]}
        if "adaptive" in state:
            adaptive = AdaptiveState.from_dict(json.loads(state["adaptive"]))
        if dist.main:
            truncate_metrics(run / "metrics.jsonl", start)
            print(f"distill: resuming from {ckpt.name} (step {start})", flush=True)
    elif resume and (run / "metrics.jsonl").exists() and dist.main:
        truncate_metrics(run / "metrics.jsonl", -1)  # no checkpoint yet: start over
    if dist.main:
        (run / "config.yaml").write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
    dist.barrier()

    eos, pad = tok.eos_token_id, tok.pad_token_id
    diag_examples = eval_examples[: cfg.diag_n]
    diag_prompts = encode_prompts(tok, [e.prompt for e in diag_examples], cfg.system_prompt)
    diag_teacher = (encode_prompts(t_tok, [e.prompt for e in diag_examples], teacher_system)
                    if separate_teacher_prompt else None)
    need = "sampled" if cfg.loss.kind == "sampled_rkl" else ("topk" if cfg.loss.top_k else "full")
    if dist.main:
        print(describe(cfg.max_steps, budget, cfg.horizon), flush=True)
        print(f"distill: student {cfg.student} -> teacher {cfg.teacher or cfg.teacher_url}, loss "
              f"{cfg.loss.kind}, {cfg.max_steps} steps x {cfg.batch_size} prompts"
              + (f" over {dist.world} processes ({dist.parallel.upper()})"
                 if dist.world > 1 else "")
              + f", run folder {run}", flush=True)

    log = MetricsLog(run / "metrics.jsonl") if dist.main else None

    def write(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(record)

    def run_eval(step: int) -> float:
        """Rank 0 evaluates; the others wait."""
        accuracy = float("nan")
        with dist.full_weights(student):
            if dist.main:
                ev = evaluate(student, tok, eval_examples, source.is_correct, budget,
                              seed=cfg.seed, system_prompt=cfg.system_prompt)
                write({"step": step, "eval_accuracy": ev["accuracy"],
                       "eval_mean_response_tokens": ev["mean_response_tokens"],
                       "eval_truncated_fraction": ev["truncated_fraction"],
                       "eval_time_s": ev["eval_time_s"], **totals})
                accuracy = ev["accuracy"]
            dist.barrier()
        return accuracy

    acc = run_eval(0) if start == 0 else float("nan")
    bar = Bar(cfg.max_steps, f"distill[{cfg.horizon.kind}]", enabled=progress and dist.main)
    bar.update(start)
    bad_in_row, stopped_by_signal, step = 0, False, start
    with StopFlag() as flag:
        while not budget_spent(step, totals, cfg):
            t_step = time.perf_counter()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
            k = schedule_step(step, totals, cfg)
            H = adaptive.horizon if cfg.horizon.kind == "adaptive" else \
                horizon_at(k, cfg.max_steps, budget, cfg.horizon)
            lr = cfg.optim.lr * warmup_cosine(k, cfg.max_steps, cfg.optim.warmup_steps,
                                              cfg.optim.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr

            n_prompts = cfg.batch_size
            if cfg.token_budget:  # spend a short horizon's savings on more prompts
                n_prompts = token_budget_batch(cfg.batch_size, H, budget, cfg.max_batch)
                n_prompts -= n_prompts % dist.world
            examples = source.train_batch(step, n_prompts, cfg.seed, start=totals["prompts"])
            per_rank = n_prompts // dist.world
            rows = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)  # this rank's slice
            batch = [examples[i].prompt for i in rows]
            prompts = encode_prompts(tok, batch, cfg.system_prompt)
            t_prompts = encode_prompts(t_tok, batch, teacher_system) if separate_teacher_prompt \
                else None
            # one random stream per global row: rollouts do not depend on how rows are split
            seeds = [(cfg.seed * 1_000_003 + step) * 4099 + i for i in rows]
            rollout, scores, stats = opd_step(student, scorer, opt, prompts, H, cfg, vocab,
                                              eos, pad, None, t_prompts, need, seeds, dist,
                                              learner)
            finite = stats["finite"]
            gnorm = stats["grad_norm"]
            if finite:
                bad_in_row = 0
            else:
                bad_in_row += 1
                totals["skipped_steps"] += 1
            t_end = time.perf_counter()
            t_sampled = t_step + stats["sample_time_s"]
            t_scored = t_sampled + stats["teacher_time_s"]

            # 4. log
            mask = rollout.response_mask_B_R.float()
            n_tok, n_cut, rkl_sum = dist.sum([
                float(rollout.num_tokens), float(rollout.cut_B.sum()),
                float(((rollout.sampler_logp_B_R - scores.logp_B_R) * mask).sum())])
            n_tok = int(n_tok)
            totals["train_time_s"] += t_end - t_step
            totals["sampled_tokens"] += n_tok
            totals["prompts"] += n_prompts
            rkl = rkl_sum / max(n_tok, 1)
            rec = {
                "step": step + 1, "horizon": H, "loss": stats["loss"],
                "step_time_s": t_end - t_step, "sample_time_s": t_sampled - t_step,
                "teacher_time_s": t_scored - t_sampled, "learn_time_s": t_end - t_scored,
                "sampled_tokens": n_tok, "cut_fraction": n_cut / n_prompts,
                "eos_fraction": 1.0 - n_cut / n_prompts, "batch_prompts": n_prompts,
                "mean_response_tokens": n_tok / n_prompts, "sampled_rkl": rkl,
                "tokens_per_s": n_tok / max(t_sampled - t_step, 1e-9),
                "lr": lr, "grad_norm": gnorm, "skipped": not finite,
                "rho_mean": stats["rho_mean"], "act_mem_mb": stats["act_mem_mb"],
                "peak_mem_mb": peak_memory_mb(device), **totals,
            }
            diag_now = bool(cfg.diag_every) and (step + 1) % cfg.diag_every == 0
            probe_now = bool(cfg.probe_every) and (step + 1) % cfg.probe_every == 0 \
                and remote is None
            with dist.full_weights(student) if diag_now or probe_now else nullcontext():
                if diag_now and dist.main:
                    t0 = time.perf_counter()
                    rec.update(position_diagnostics(student, scorer, diag_prompts, cfg, budget,
                                                    vocab, eos, pad, step, diag_teacher))
                    rec["diag_time_s"] = time.perf_counter() - t0
                if probe_now and dist.main:
                    t0 = time.perf_counter()
                    probe = eval_examples[: cfg.probe_n]
                    rec["probe_teacher_acc_by_cut"] = recovery_probe(
                        student, teacher_model, tok,
                        encode_prompts(tok, [e.prompt for e in probe], cfg.system_prompt),
                        [e.answer for e in probe], source.is_correct, budget)
                    rec["probe_time_s"] = time.perf_counter() - t0
            if cfg.horizon.kind == "adaptive" and diag_now:
                if dist.main:
                    n_moves = len(adaptive.moves)
                    adaptive = adaptive_update(adaptive, rule, step + 1, rec["diag_rkl_by_pos"],
                                               rec["diag_tokens_by_pos"])
                    if len(adaptive.moves) > n_moves:
                        rec["horizon_move"] = adaptive.moves[-1]
                adaptive.horizon = int(dist.max([float(adaptive.horizon)])[0])
            write(rec)
            # one snapshot of the stop flag, agreed by all ranks; a later signal waits a step
            stop_now = dist.max([float(flag.stop)])[0] > 0
            last = budget_spent(step + 1, totals, cfg) or stop_now
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                acc = run_eval(step + 1)
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:
                opt_state = dist.optimizer_state(student, opt)  # FSDP: gathered by all ranks
                weights = dist.model_state(student)
                if dist.main:
                    save_checkpoint(run, step + 1, student, tok, opt_state,
                                    {"totals": totals,
                                     "adaptive": json.dumps(adaptive.to_dict()),
                                     "parallel": dist.parallel},
                                    cfg.keep_last, weights)
            dist.barrier()
            bar.update(1, H=H, loss=rec["loss"], rkl=rkl, acc=acc)
            if bad_in_row >= cfg.max_bad_steps:
                bar.close()
                if log is not None:
                    log.close()
                raise TrainingStopped(
                    f"{bad_in_row} steps in a row had a non-finite loss or gradient (last at step "
                    f"{step + 1}); stopping. The last good checkpoint is in {run / 'checkpoints'}; "
                    "lower optim.lr or check the models' dtype")
            if stop_now:
                stopped_by_signal = True
            step += 1
            if stopped_by_signal:
                break
    bar.close()
    if log is not None:
        log.close()
    result = {"final_eval_accuracy": acc, "steps": step, "stopped_by_signal": stopped_by_signal,
              **totals}
    if not stopped_by_signal:
        weights = dist.model_state(student)  # FSDP: gathered by all ranks
        if dist.main:
            final = run / "model"
            shutil.rmtree(final, ignore_errors=True)
            to_save = student.merge_and_unload() if cfg.lora.rank and cfg.lora.merge \
                else student
            to_save.save_pretrained(final, state_dict=weights)
            tok.save_pretrained(final)
    if not dist.main:
        return result
    (run / "result.json").write_text(json.dumps(result, indent=2))
    print(f"distill: {'stopped' if stopped_by_signal else 'done'} at step {step}, full-budget "
          f"accuracy {acc:.3f}, {totals['train_time_s']:.0f}s training, "
          f"{totals['sampled_tokens']} sampled tokens", flush=True)
    return result
