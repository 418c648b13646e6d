"""On-policy distillation with a rollout-horizon schedule: the loop, top to bottom.

Each optimizer step:  H = schedule(step) -> the student samples <= H tokens per prompt -> the
teacher scores them in one forward pass -> per-token loss, backward over micro-batches -> clip,
AdamW, LR schedule -> one flushed line in metrics.jsonl. Every few steps: a full-budget greedy
evaluation, per-position diagnostics, a checkpoint. Each phase is timed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel

from hopd import config as C
from hopd.adaptive import AdaptiveRule, AdaptiveState, adaptive_update, token_budget_batch
from hopd.diagnostics import (
    count_saved_bytes,
    peak_memory_mb,
    position_diagnostics,
    recovery_probe,
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
    resolve_device,
)
from hopd.evaluate import evaluate
from hopd.losses import (
    distribution_loss,
    sampled_rkl,
    sft_loss,
    token_logprobs,
    token_weights,
)
from hopd.models import (
    attach_lora,
    load_model,
)
from hopd.preflight import Inputs, check_inputs, check_resume_config
from hopd.progress import Bar, MetricsLog
from hopd.rollout import Rollout, filter_logits, sample
from hopd.runstate import (
    StopFlag,
    check_out,
    latest_checkpoint,
    load_trainer_state,
    prepare_out,
    save_checkpoint,
    truncate_metrics,
    write_folder,
    write_json,
)
from hopd.schedules import describe, horizon_at, initial_horizon, warmup_cosine
from hopd.tasks import encode_prompts
from hopd.teacher import (
    LocalTeacher,
    Teacher,
    TeacherScores,
    TeacherUnavailable,
    response_logits,
)
from hopd.trackers import Trackers

# ---------------------------------------------------------------------------------------------
# Pieces of one step


def opd_step(student: PreTrainedModel, teacher: Teacher | PreTrainedModel,
             opt: torch.optim.Optimizer,
             prompts: list[list[int]], H: int, cfg: DistillConfig, vocab: int, eos: int, pad: int,
             gen: torch.Generator | None, teacher_prompts: list[list[int]] | None = None,
             need: str = "sampled", row_seeds: list[int] | None = None,
             dist: Dist | None = None, learner: torch.nn.Module | None = None,
             teacher_model: PreTrainedModel | None = None, budget: int = 0,
             ) -> tuple[Rollout, TeacherScores, dict[str, Any]]:
    """One optimizer step of OPD at horizon H: sample -> score -> learn -> clip -> AdamW.

    A step whose loss or gradient is not finite is skipped (no optimizer update). Pass
    eos = -1 to force every rollout to the full H (benchmarks compare equal lengths that way).
    `learner` is the module that runs forward/backward (the DDP wrapper of `student` when
    distributed); sampling uses the plain `student`, or `teacher_model` for the SFT baseline
    (loss.kind=sft). `budget` is L, for the `constant` normaliser.
    """
    t0 = time.perf_counter()
    # 1. sample: the student draws <= H tokens per prompt (the SFT baseline: the teacher does)
    dist = dist or Dist.local()
    sampler = teacher_model if cfg.loss.kind == "sft" else student
    sampler.eval()
    with dist.full_weights(student):  # FSDP: the whole student on every rank while sampling
        rollout = sample(sampler, prompts, H, eos, pad, cfg.sampling.temperature,
                         cfg.sampling.top_k, cfg.sampling.top_p, generator=gen,
                         row_seeds=row_seeds, cuda_graph=cfg.sampling.cuda_graph,
                         greedy=cfg.loss.kind == "sft" and cfg.loss.sft_greedy)
    student.train()
    t1 = time.perf_counter()
    # 2. score: one teacher forward pass over prompt + response (SFT needs none)
    if cfg.loss.kind == "sft":
        scores = TeacherScores(logp_B_R=rollout.sampler_logp_B_R)
    else:
        if isinstance(teacher, torch.nn.Module):  # a bare model (benchmarks call it so)
            teacher = LocalTeacher(teacher, vocab)
        scores = teacher.score(rollout, need, cfg.loss.top_k, prompts=teacher_prompts)
    t2 = time.perf_counter()
    # 3. learn: per-token loss, backward over micro-batches, clip, AdamW
    opt.zero_grad(set_to_none=True)
    stats = learn(learner or student, rollout, scores, cfg, vocab, dist, budget)
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
          vocab: int, dist: Dist | None = None, budget: int = 0) -> dict[str, float]:
    """Accumulates the step's gradient over `grad_accum` micro-batches; returns loss stats.

    Every micro-batch loss is weighted with the step's totals over all ranks (token_mean: divided
    by the step's response-token count), so the summed gradient equals the full batch's gradient
    whatever the split. With several ranks the backward is scaled by the world size, since DDP
    averages gradients.
    """
    dist = dist or Dist.local()  # a bare call never starts a process group
    B = rollout.ids_B_T.size(0)
    n_tokens, n_seqs = dist.sum([float(rollout.num_tokens), float(B)])
    n_tokens = int(n_tokens)
    mb = math.ceil(B / cfg.grad_accum)
    total, stats, act_bytes = 0.0, {"rho_mean": 0.0, "rho_max": 0.0}, 0
    kind = cfg.loss.kind
    teacher_in = None if kind in ("sampled_rkl", "sft") else teacher.as_loss_input()
    for lo in range(0, B, mb):
        rows = slice(lo, lo + mb)
        mask = rollout.response_mask_B_R[rows]
        weight = None if cfg.loss.normalizer == "token_mean" and kind != "sft" else \
            token_weights(mask, cfg.loss.normalizer, n_tokens, n_seqs, budget or mask.size(1))
        with dist.no_sync(student, skip=lo + mb < B), count_saved_bytes() as saved:
            logits = response_logits(student, rollout.ids_B_T[rows], rollout.attn_B_T[rows],
                                     rollout.prompt_len, vocab)
            if kind == "sampled_rkl":
                learner_logp = token_logprobs(as_sampled(logits, cfg.sampling),
                                              rollout.response_ids_B_R[rows])
                loss, s = sampled_rkl(learner_logp, rollout.sampler_logp_B_R[rows],
                                      teacher.logp_B_R[rows], mask, n_tokens,
                                      gamma=cfg.loss.gamma, clip_eps=cfg.loss.clip_eps,
                                      weight_B_R=weight)
                stats["rho_mean"] += s["rho_mean"] * float(mask.sum()) / max(n_tokens, 1)
                stats["rho_max"] = max(stats["rho_max"], s["rho_max"])
            elif kind == "sft":
                loss = sft_loss(token_logprobs(logits, rollout.response_ids_B_R[rows]), weight)
            else:
                sub = {k: v[rows] for k, v in teacher_in.items()}
                loss = distribution_loss(logits, sub, mask, n_tokens, kind, cfg.loss.beta,
                                         weight_B_R=weight)
            (loss * dist.world).backward()
        act_bytes = max(act_bytes, saved.bytes)
        total += loss.item()
    total, stats["rho_mean"] = dist.sum([total, stats["rho_mean"]])
    return {"loss": total, "act_mem_mb": act_bytes / 2**20, **stats}


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


def distill(cfg: DistillConfig, run: Path, resume: bool = False, progress: bool = True,
            overwrite: bool = False, force_config: bool = False) -> dict[str, Any]:
    """Runs OPD with the configured horizon schedule; writes everything under `run`.

    Every input is checked before the run folder is touched; `overwrite` replaces the folder
    (only one hopd made), `resume` continues it (refusing config changes that make it a different
    experiment unless `force_config`)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg = replace(cfg, device=resolve_device(cfg.device))
    dist = Dist(cfg.device, parallel=cfg.parallel)  # one process, or a rank of several
    cfg = replace(cfg, parallel=dist.parallel)  # as run (accelerate's environment may pick FSDP)
    if cfg.batch_size % dist.world:
        raise C.ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {dist.world} "
                            "processes: each rank takes an equal slice of every step's prompts")
    check_out(run, kind="distill", overwrite=overwrite, resume=resume)
    changed = resume and check_resume_config(cfg, run, force_config)
    inp = check_inputs(cfg)
    dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    lock = prepare_out(run, kind="distill", overwrite=overwrite, resume=resume) \
        if dist.main else None
    try:
        dist.barrier()
        return _distill(cfg, run, inp, dist, resume=resume, progress=progress,
                        write_config=not resume or changed)
    finally:
        if lock is not None:
            lock.release()


def _distill(cfg: DistillConfig, run: Path, inp: Inputs, dist: Dist, *, resume: bool,
             progress: bool, write_config: bool) -> dict[str, Any]:
    device = dist.device
    source, budget, tok, t_tok, vocab = inp.source, inp.budget, inp.tok, inp.t_tok, inp.vocab
    remote, separate_teacher_prompt = inp.remote, inp.separate_teacher_prompt
    eval_examples = source.eval_set(cfg.eval_n, seed=cfg.seed, part=cfg.eval_split)
    teacher_system = cfg.teacher_system_prompt or cfg.system_prompt
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
    if state is not None and budget_spent(state["step"], {**state["totals"]}, cfg):
        return finish_done_run(cfg, run, ckpt, state, inp, dist)
    s_path, trust = inp.s_path, cfg.trust_remote_code
    if cfg.lora.rank:  # checkpoints hold the adapter only; the base comes from `student`
        student = attach_lora(load_model(str(s_path), device, cfg.dtype, trust), cfg.lora.rank,
                              cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                              adapter=ckpt)
    else:
        student = load_model(str(ckpt or s_path), device, cfg.dtype, trust)
    teacher: Teacher
    if remote is not None:
        teacher = remote
    else:
        model = load_model(str(inp.t_path), cfg.teacher_device or device,
                           cfg.teacher_dtype or cfg.dtype, trust).eval()
        teacher = LocalTeacher(model.requires_grad_(False), vocab)
    teacher_model = teacher.model  # the probe and the SFT baseline need the model itself
    student.train()
    learner = dist.wrap(student)  # DDP wrapper or FSDP-sharded student: forward/backward
    trainable = [p for p in student.parameters() if p.requires_grad]  # sharded under FSDP
    opt = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.optim.weight_decay)
    start, totals = 0, {"train_time_s": 0.0, "sampled_tokens": 0, "skipped_steps": 0,
                        "prompts": 0}
    adaptive = AdaptiveState(initial_horizon(cfg.horizon, budget))
    rule = AdaptiveRule(budget, cfg.horizon.adaptive_window, cfg.horizon.adaptive_growth,
                        cfg.horizon.adaptive_factor, cfg.horizon.adaptive_ratio,
                        cfg.horizon.adaptive_threshold, cfg.horizon.adaptive_plateau,
                        cfg.horizon.adaptive_patience, cfg.horizon.adaptive_drift,
                        cfg.horizon.adaptive_z)
    acc = float("nan")
    if ckpt is not None and state is not None:
        dist.load_optimizer_state(student, opt, state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, totals = state["step"], {**totals, **state["totals"]}
        acc = _nan_if_none(state.get("eval_accuracy"))
        if "adaptive" in state:
            adaptive = AdaptiveState.from_dict(json.loads(state["adaptive"]))
        if dist.main:
            truncate_metrics(run / "metrics.jsonl", start)
            print(f"distill: resuming from {ckpt.name} (step {start})", flush=True)
    elif resume and (run / "metrics.jsonl").exists() and dist.main:
        truncate_metrics(run / "metrics.jsonl", -1)  # no checkpoint yet: start over
    if dist.main and write_config:
        (run / "config.yaml").write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
    dist.barrier()

    eos, pad = tok.eos_token_id, tok.pad_token_id
    diag_examples = eval_examples[: cfg.diag_n]
    diag_prompts = encode_prompts(tok, [e.prompt for e in diag_examples], cfg.system_prompt)
    diag_teacher = (encode_prompts(t_tok, [e.prompt for e in diag_examples], teacher_system)
                    if separate_teacher_prompt else None)
    need = "sampled" if cfg.loss.kind == "sampled_rkl" else ("topk" if cfg.loss.top_k else "full")
    if dist.main and cfg.probe_every and teacher_model is None:
        print("distill: probe_every is set, but the teacher-recovery probe needs the teacher "
              "model in this process and the teacher is a server: the probe is skipped",
              file=sys.stderr, flush=True)
    if dist.main:
        print(describe(cfg.max_steps, budget, cfg.horizon), flush=True)
        print(f"distill: student {cfg.student} -> teacher {cfg.teacher or cfg.teacher_url}, loss "
              f"{cfg.loss.kind}, {cfg.max_steps} steps x {cfg.batch_size} prompts"
              + (f" over {dist.world} processes ({dist.parallel.upper()})"
                 if dist.world > 1 else "")
              + f", run folder {run}", flush=True)

    log = MetricsLog(run / "metrics.jsonl", Trackers(cfg.log_to, run, C.to_dict(cfg), run.name)
                     if cfg.log_to else None) if dist.main else None

    def write(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(record)

    def evaluated(examples: list[Any]) -> dict[str, Any] | None:
        """Rank 0 evaluates `examples` at the full budget (None on the others, which wait)."""
        ev = None
        with dist.full_weights(student):
            if dist.main:
                ev = evaluate(student, tok, examples, source.is_correct, budget,
                              seed=cfg.seed, system_prompt=cfg.system_prompt)
            dist.barrier()
        return ev

    def run_eval(step: int) -> float:
        ev = evaluated(eval_examples)
        if ev is None:
            return float("nan")
        write({"step": step, "eval_accuracy": ev["accuracy"],
               "eval_mean_response_tokens": ev["mean_response_tokens"],
               "eval_truncated_fraction": ev["truncated_fraction"],
               "eval_time_s": ev["eval_time_s"], **totals})
        return ev["accuracy"]

    def run_val(step: int) -> float:
        """The `val` half (disjoint from the test half), to choose settings on."""
        val = source.eval_set(cfg.val_n, seed=cfg.seed, part="val")
        ev = evaluated(val)
        if ev is None:
            return float("nan")
        write({"step": step, "val_accuracy": ev["accuracy"], "val_n": len(val)})
        return ev["accuracy"]

    def save(step: int) -> None:
        opt_state = dist.optimizer_state(student, opt)  # FSDP: gathered by all ranks
        weights = dist.model_state(student)
        if dist.main:
            save_checkpoint(run, step, student, tok, opt_state,
                            {"totals": totals, "adaptive": json.dumps(adaptive.to_dict()),
                             "parallel": dist.parallel, "eval_accuracy": acc},
                            cfg.keep_last, weights)

    def checkpoint_note() -> str:
        last = latest_checkpoint(run)
        return (f"the last good checkpoint is {last}" if last is not None else
                "no checkpoint was saved (save_every=0 saves only at the end)")

    if start == 0:
        if progress and dist.main:
            print(f"distill: evaluating the student on {len(eval_examples)} held-out prompts "
                  f"at L={budget} before training...", file=sys.stderr, flush=True)
        acc = run_eval(0)
        if cfg.horizon.kind == "adaptive":  # the reading that sets H0: its regions' baseline
            with dist.full_weights(student):
                if dist.main:
                    reading = position_diagnostics(student, teacher, diag_prompts, cfg, budget,
                                                   vocab, eos, pad, 0, diag_teacher)["_reading"]
                    adaptive = adaptive_update(adaptive, rule, 0, reading)
    bar = Bar(cfg.max_steps, f"distill[{cfg.horizon.kind}]", enabled=progress and dist.main)
    bar.update(start)
    bad_in_row, stopped_by, step = 0, 0, start
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
            try:
                rollout, scores, stats = opd_step(student, teacher, opt, prompts, H, cfg, vocab,
                                                  eos, pad, None, t_prompts, need, seeds, dist,
                                                  learner, teacher_model, budget)
            except TeacherUnavailable as e:  # nothing was updated: this step's state is sound
                bar.close()
                with flag.saving():
                    save(step)
                if log is not None:
                    log.close()
                raise TrainingStopped(
                    f"the teacher failed at step {step + 1} ({e}); the run state is saved in "
                    f"{latest_checkpoint(run)}: resume with --resume once the teacher answers"
                ) from None
            finite = stats["finite"]
            gnorm = stats["grad_norm"]
            if finite:
                bad_in_row = 0
            else:
                bad_in_row += 1
                totals["skipped_steps"] += 1
            if finite and not weights_finite(student):
                bar.close()
                if log is not None:
                    log.close()
                raise TrainingStopped(
                    f"the student's weights became non-finite at step {step + 1} (the update "
                    f"was too large: optim.lr={cfg.optim.lr}); nothing was saved from this step "
                    f"and {checkpoint_note()}. Lower optim.lr")
            t_end = time.perf_counter()
            t_sampled = t_step + stats["sample_time_s"]
            t_scored = t_sampled + stats["teacher_time_s"]

            # 4. log
            mask = rollout.response_mask_B_R.float()
            n_tok, n_cut, rkl_sum = dist.sum([
                float(rollout.num_tokens), float(rollout.cut_B.sum()),
                float(((rollout.sampler_logp_B_R - scores.logp_B_R) * mask).sum())])
            n_tok = int(n_tok)
            # every rank counts the slowest rank's time: a time budget, the schedules it drives
            # and the last step are then the same on all ranks (their own clocks differ)
            totals["train_time_s"] += dist.max([t_end - t_step])[0]
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
                and teacher_model is not None
            with dist.full_weights(student) if diag_now or probe_now else nullcontext():
                if diag_now and dist.main:
                    t0 = time.perf_counter()
                    rec.update(position_diagnostics(student, teacher, diag_prompts, cfg, budget,
                                                    vocab, eos, pad, step, diag_teacher))
                    reading = rec.pop("_reading")
                    rec["diag_time_s"] = time.perf_counter() - t0
                if probe_now and dist.main:
                    t0 = time.perf_counter()
                    probe = [e.prompt for e in eval_examples[: cfg.probe_n]]
                    rec["probe_teacher_acc_by_cut"] = recovery_probe(
                        student, teacher_model, tok,
                        encode_prompts(tok, probe, cfg.system_prompt),
                        [e.answer for e in eval_examples[: cfg.probe_n]], source.is_correct,
                        budget, teacher_prompts=encode_prompts(t_tok, probe, teacher_system)
                        if separate_teacher_prompt else None)
                    rec["probe_time_s"] = time.perf_counter() - t0
            if cfg.horizon.kind == "adaptive" and diag_now:
                if dist.main:
                    n_moves = len(adaptive.moves)
                    adaptive = adaptive_update(adaptive, rule, step + 1, reading)
                    if len(adaptive.moves) > n_moves:
                        rec["horizon_move"] = adaptive.moves[-1]
                adaptive.horizon = int(dist.max([float(adaptive.horizon)])[0])
            write(rec)
            # one snapshot of the stop flag, agreed by all ranks; a later signal waits a step
            stop_now = dist.max([float(flag.signum)])[0]
            last = budget_spent(step + 1, totals, cfg)
            # a signal: save at once, no evaluation (a scheduler's grace period is short)
            if not stop_now and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                acc = run_eval(step + 1)
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last or stop_now:
                with flag.saving():
                    save(step + 1)
            dist.barrier()
            bar.update(1, H=H, loss=rec["loss"], rkl=rkl, acc=acc)
            if bad_in_row >= cfg.max_bad_steps:
                bar.close()
                if log is not None:
                    log.close()
                raise TrainingStopped(
                    f"{bad_in_row} steps in a row had a non-finite loss or gradient (last at step "
                    f"{step + 1}); stopping: {checkpoint_note()}. Lower optim.lr or check the "
                    "models' dtype")
            step += 1
            if stop_now:
                stopped_by = int(stop_now)
                break
    bar.close()
    result = {"final_eval_accuracy": acc, "steps": step, "stopped_by_signal": bool(stopped_by),
              "signal": stopped_by, **totals}
    if cfg.val_n and not stopped_by:  # the held-out half that settings are chosen on
        result["final_val_accuracy"] = run_val(step)
    if log is not None:
        log.close(result)
    if not stopped_by:
        weights = dist.model_state(student)  # FSDP: gathered by all ranks
        if dist.main:
            to_save = student.merge_and_unload() if cfg.lora.rank and cfg.lora.merge \
                else student
            save_final_model(run, to_save, tok, weights)
    if not dist.main:
        return result
    write_json(run / "result.json", result)
    print(f"distill: {'stopped by a signal' if stopped_by else 'done'} at step {step}, "
          f"full-budget accuracy {acc:.3f}, {totals['train_time_s']:.0f}s training, "
          f"{totals['sampled_tokens']} sampled tokens", flush=True)
    return result


def weights_finite(model: torch.nn.Module) -> bool:
    """One reduction over every weight: False once an update has put a NaN or inf anywhere."""
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    if not params:
        return True
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP shards
    return bool(torch.stack([torch.isfinite(t).all() for t in local]).all())  # one sync


def save_final_model(run: Path, model: PreTrainedModel, tok: Any,
                     weights: dict[str, Any] | None = None) -> None:
    """RUN/model, written beside the old one and swapped in: a failed write loses nothing."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=weights)
        tok.save_pretrained(tmp)

    write_folder(run / "model", run / ".tmp_model", write, lambda: (
        f"no space left on the disk of {run} while writing the final model; the last "
        "checkpoint is intact: free space, then run again with --resume to write it"))


def finish_done_run(cfg: DistillConfig, run: Path, ckpt: Path, state: dict[str, Any],
                    inp: Inputs, dist: Dist) -> dict[str, Any]:
    """--resume of a run whose budget is spent: report it, or finish a final save a kill cut."""
    result_path, s_path, tok = run / "result.json", inp.s_path, inp.tok
    if result_path.exists():
        try:
            result = json.loads(result_path.read_text())
        except ValueError:
            result = None
        if isinstance(result, dict) and not result.get("stopped_by_signal") and \
                (run / "model" / "config.json").exists():
            if dist.main:
                print(f"distill: {run} is finished (step {result.get('steps')}, full-budget "
                      f"accuracy {result.get('final_eval_accuracy')}); nothing to do. Raise "
                      "max_steps to train further.", flush=True)
            return result
    # killed during the final save: the last checkpoint is the final state
    if cfg.lora.rank:
        student = attach_lora(load_model(str(s_path), "cpu", cfg.dtype, cfg.trust_remote_code),
                              cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                              cfg.lora.target_modules, adapter=ckpt)
        student = student.merge_and_unload() if cfg.lora.merge else student
    else:
        student = load_model(str(ckpt), "cpu", cfg.dtype, cfg.trust_remote_code)
    result = {"final_eval_accuracy": _nan_if_none(state.get("eval_accuracy")),
              "steps": state["step"], "stopped_by_signal": False, "signal": 0,
              **state["totals"]}
    if dist.main:
        save_final_model(run, student, tok)
        write_json(result_path, result)
        print(f"distill: {run} had finished training; wrote its final model and result from "
              f"{ckpt.name}", flush=True)
    return result


def _nan_if_none(x: Any) -> float:
    return float("nan") if x is None else float(x)
