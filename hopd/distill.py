"""On-policy distillation with a rollout-horizon schedule: the loop, top to bottom.

Each optimizer step:  H and LR from the schedules -> a batch of prompts -> the sampler draws <= H
tokens per prompt -> the teacher scores them in one forward pass -> per-token loss, backward over
micro-batches -> clip, AdamW -> one flushed line in metrics.jsonl. Every few steps: per-position
diagnostics (and the adaptive horizon's move), a full-budget greedy evaluation, a checkpoint.
Setup lives in `hopd.context`, the step in `hopd.step`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hopd import config as C
from hopd.adaptive import PositionReading, adaptive_update, token_budget_batch
from hopd.compute import step_flops
from hopd.context import RunContext, finish_done_run, setup
from hopd.diagnostics import peak_memory_mb
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
from hopd.preflight import Inputs, check_inputs, check_resume_config
from hopd.progress import Bar
from hopd.rollout import SampleAhead, row_seeds
from hopd.runstate import (
    StopFlag,
    check_out,
    latest_checkpoint,
    load_trainer_state,
    prepare_out,
    write_json,
)
from hopd.schedules import horizon_at, warmup_cosine
from hopd.step import StepStats, opd_step
from hopd.teacher import TeacherUnavailable


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
    ckpt = latest_checkpoint(run) if resume else None
    state = load_trainer_state(ckpt) if ckpt is not None else None
    # FSDP saves the optimizer state keyed by parameter name, DDP by position: not interchangeable
    written = state.get("parallel", "ddp") if state is not None else dist.parallel
    if written != dist.parallel:
        raise C.ConfigError(
            f"{ckpt} was written with parallel={written} and this run is "
            f"parallel={dist.parallel} (one process counts as ddp): resume it the way it was "
            "run, or start again with --overwrite")
    if state is not None and budget_spent(state["step"], {**state["totals"]}, cfg):
        return finish_done_run(cfg, run, ckpt, state, inp, dist)
    ctx = setup(cfg, run, inp, dist, ckpt=ckpt, state=state, resume=resume,
                write_config=write_config)
    if ctx.start == 0:
        before_training(ctx, progress)
    bar = Bar(cfg.max_steps, f"distill[{cfg.horizon.kind}]", enabled=progress and dist.main)
    try:
        step, stopped_by = train(ctx, bar)
    except BaseException:
        bar.close()
        if ctx.log is not None:
            ctx.log.close()
        raise
    bar.close()
    return finish(ctx, step, stopped_by)


@dataclass
class Batch:
    """One step's prompts, as this process sees them."""

    step: int  # optimizer steps done before this one
    cpu0: float  # the process's CPU time when the step began
    t0: float  # when the step began (its time counts from here)
    H: int
    lr: float
    n_prompts: int  # over every process
    prompts: list[list[int]]  # this rank's rows, in the student's format
    teacher_prompts: list[list[int]] | None  # the same rows in the teacher's, when it differs
    row_seeds: list[int]


def batches(ctx: RunContext) -> Iterator[Batch]:
    """One batch per step until the budget is spent. Each is drawn when the loop asks for it,
    so the schedules (H, LR) and the budget see every step before it. A sampler that draws
    several steps at once (sampling.ahead) is told the coming steps' rows first."""
    cfg, step = ctx.cfg, ctx.start
    while not budget_spent(step, ctx.totals, cfg):
        t0, c0 = time.perf_counter(), time.process_time()
        if ctx.dist.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(ctx.dist.device)
        batch = draw(ctx, step, ctx.totals["prompts"], t0, c0)
        this = (batch.prompts, batch.H, batch.row_seeds)
        if isinstance(ctx.sampler, SampleAhead) and not ctx.sampler.expects(*this):
            plan, used = [this], ctx.totals["prompts"] + batch.n_prompts
            for later in range(step + 1, min(step + cfg.sampling.ahead, cfg.max_steps)):
                b = draw(ctx, later, used, t0, c0)  # known in advance: no time/token budget
                plan.append((b.prompts, b.H, b.row_seeds))
                used += b.n_prompts
            ctx.sampler.plan(plan)
        yield batch
        step += 1


def draw(ctx: RunContext, step: int, used: int, t0: float, c0: float) -> Batch:
    """Step `step`'s batch, after `used` prompts were drawn: its H and LR from the schedules,
    its prompts (this rank's rows) and their row seeds."""
    cfg, dist = ctx.cfg, ctx.dist
    k = schedule_step(step, ctx.totals, cfg)
    H = ctx.adaptive.horizon if cfg.horizon.kind == "adaptive" else \
        horizon_at(k, cfg.max_steps, ctx.budget, cfg.horizon)
    lr = cfg.optim.lr * warmup_cosine(k, cfg.max_steps, cfg.optim.warmup_steps,
                                      cfg.optim.min_lr_ratio)
    n_prompts = cfg.batch_size
    if cfg.token_budget:  # spend a short horizon's savings on more prompts
        n_prompts = token_budget_batch(cfg.batch_size, H, ctx.budget, cfg.max_batch)
        n_prompts -= n_prompts % dist.world
    examples = ctx.source.train_batch(step, n_prompts, cfg.seed, start=int(used))
    per_rank = n_prompts // dist.world
    rows = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)  # this rank's slice
    prompts, teacher_prompts = ctx.encode([examples[i].prompt for i in rows])
    return Batch(step, c0, t0, H, lr, n_prompts, prompts, teacher_prompts,
                 row_seeds(cfg.seed, step, rows))


def train(ctx: RunContext, bar: Bar) -> tuple[int, int]:
    """The loop; returns the steps done and the signal that stopped it (0: none)."""
    cfg, dist = ctx.cfg, ctx.dist
    bar.update(ctx.start)
    bad_in_row, stopped_by, step = 0, 0, ctx.start
    with StopFlag() as flag:
        for batch in batches(ctx):
            step = batch.step + 1
            for group in ctx.opt.param_groups:
                group["lr"] = batch.lr
            # one OPD step; a teacher that fails leaves the state sound: save it and stop
            try:
                _, _, st = opd_step(ctx.student, ctx.teacher, ctx.opt, batch.prompts, batch.H,
                                    cfg, sampler=ctx.sampler, vocab=ctx.inp.vocab,
                                    teacher_prompts=batch.teacher_prompts,
                                    row_seeds=batch.row_seeds, dist=dist, learner=ctx.learner,
                                    budget=ctx.budget, greedy=ctx.greedy,
                                    unlearn=batch.step % cfg.loss.unlikelihood_every == 0)
            except TeacherUnavailable as e:
                with flag.saving():
                    ctx.save(batch.step)
                raise TrainingStopped(
                    f"the teacher failed at step {step} ({e}); the run state is saved in "
                    f"{latest_checkpoint(ctx.run)}: resume with --resume once the teacher "
                    "answers") from None
            if st.finite:
                ctx.note_loss(st.loss)
            bad_in_row = 0 if st.finite else bad_in_row + 1
            ctx.totals["skipped_steps"] += 0 if st.finite else 1
            if st.finite and not weights_finite(ctx.student):
                raise TrainingStopped(
                    f"the student's weights became non-finite at step {step} (the update was "
                    f"too large: optim.lr={cfg.optim.lr}); nothing was saved from this step and "
                    f"{ctx.checkpoint_note()}. Lower optim.lr")
            ctx.sampler.sync()
            if ctx.greedy is not None and ctx.greedy.copy is not getattr(ctx.sampler, "copy", None):
                ctx.greedy.sync()  # its own copy (a twin shares the sampler's, synced above)
            # one record; diagnostics and the adaptive horizon's move every diag_every steps
            rec = record(ctx, batch, st, time.perf_counter() - batch.t0)
            if due(cfg.diag_every, step) or due(cfg.probe_every, step):
                bar.note(f"step {step}: per-position diagnostics at L={ctx.budget}")
            rec.update(diagnose_and_adapt(ctx, step))
            ctx.write(rec)
            # evaluate and save (a signal: save at once, no evaluation; grace periods are short)
            stop_now = int(dist.max([float(flag.signum)])[0])  # one snapshot, agreed by all
            last = budget_spent(step, ctx.totals, cfg)
            collapsed = False
            if not stop_now and (due(cfg.eval_every, step) or last):
                bar.note(f"step {step}: evaluating {len(ctx.eval_examples)} prompts at "
                         f"L={ctx.budget}")
                ctx.acc = ctx.run_eval(step)
                collapsed = cfg.collapse_stop and "collapse" in ctx.last_eval
            if due(cfg.save_every, step) or last or stop_now or collapsed:
                bar.note(f"step {step}: saving a checkpoint")
                with flag.saving():
                    ctx.save(step)
            if collapsed:
                raise TrainingStopped(
                    f"collapse_stop: {ctx.collapse}; the run state is saved in "
                    f"{latest_checkpoint(ctx.run)}")
            dist.barrier()
            bar.set_total(estimated_steps(step - ctx.start, step, ctx.totals, cfg))
            bar.update(1, H=batch.H, loss=st.loss, rkl=st.sampled_rkl, acc=ctx.acc)
            if bad_in_row >= cfg.max_bad_steps:
                raise TrainingStopped(
                    f"{bad_in_row} steps in a row had a non-finite loss or gradient (last at step "
                    f"{step}); stopping: {ctx.checkpoint_note()}. Lower optim.lr or check the "
                    "models' dtype")
            if stop_now:
                stopped_by = stop_now
                break
    return step, stopped_by


def estimated_steps(done_here: int, step: int, totals: dict[str, float],
                    cfg: DistillConfig) -> int:
    """The steps the run will take in all: max_steps, or sooner where a token or time budget
    runs out first, estimated from what this process's steps spent so far."""
    est = cfg.max_steps
    if done_here > 0:
        for spent, budget in ((totals["sampled_tokens"], cfg.max_tokens),
                              (totals["train_time_s"], cfg.max_time_s)):
            if budget > 0 and spent > 0:
                est = min(est, step + math.ceil(max(budget - spent, 0) * step / spent))
    return est


def due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def record(ctx: RunContext, batch: Batch, st: StepStats, step_time: float) -> dict[str, Any]:
    """The step's metrics line; adds the step to the run's totals."""
    # every rank counts the slowest rank's time: a time budget, the schedules it drives and the
    # last step are then the same on all ranks (their own clocks differ)
    ctx.totals["train_time_s"] += ctx.dist.max([step_time])[0]
    ctx.totals["sampled_tokens"] += st.sampled_tokens
    ctx.totals["prompts"] += batch.n_prompts
    cpu = ctx.dist.sum([time.process_time() - batch.cpu0])[0]  # every process's CPU time
    flops = step_flops(*ctx.flops_per_token, st.prompt_tokens, st.sampled_tokens,
                       teacher_samples=ctx.cfg.loss.teacher_rollouts,
                       scored=ctx.cfg.loss.kind != "sft")
    # loss.unlikelihood: the greedy answers' decoding, and forward + backward on the repeaters
    flops += ctx.flops_per_token[0] * (st.greedy_tokens + 3.0 * st.ul_tokens)
    ctx.totals["train_cpu_s"] += cpu
    ctx.totals["train_flops"] += flops
    n, cut = batch.n_prompts, st.cut_rows
    return {
        "step": batch.step + 1, "horizon": batch.H, "loss": st.loss,
        "step_time_s": step_time, "cpu_time_s": cpu, "est_flops": flops,
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "sample_time_s": st.sample_time_s,
        "teacher_time_s": st.teacher_time_s,
        "learn_time_s": step_time - st.sample_time_s - st.teacher_time_s,
        "sampled_tokens": st.sampled_tokens, "cut_fraction": cut / n,
        "eos_fraction": 1.0 - cut / n, "batch_prompts": n,
        "mean_response_tokens": st.sampled_tokens / n, "sampled_rkl": st.sampled_rkl,
        "tokens_per_s": st.sampled_tokens / max(st.sample_time_s, 1e-9),
        "lr": batch.lr, "grad_norm": st.grad_norm, "skipped": not st.finite,
        "rho_mean": st.rho_mean, "rho_max": st.rho_max, "act_mem_mb": st.act_mem_mb,
        **({"ul_loss": st.ul_loss, "greedy_repeats": st.greedy_repeats}
           if st.greedy_tokens else {}),  # the steps that ran loss.unlikelihood
        "peak_mem_mb": peak_memory_mb(ctx.dist.device), **ctx.totals,
    }


def diagnose_and_adapt(ctx: RunContext, step: int) -> dict[str, Any]:
    """Every diag_every steps: the per-position diagnostics, and the adaptive horizon's move
    (decided on rank 0, agreed by all); every probe_every steps: the recovery probe."""
    cfg, dist, out = ctx.cfg, ctx.dist, {}
    diag_now = due(cfg.diag_every, step)
    probe_now = due(cfg.probe_every, step) and ctx.teacher.model is not None
    with dist.full_weights(ctx.student) if diag_now or probe_now else nullcontext():
        if diag_now and dist.main:
            out, reading = ctx.diagnose(step)
            if cfg.horizon.kind == "adaptive":
                out.update(adapt(ctx, step, out, reading))
        if probe_now and dist.main:
            out.update(ctx.probe())
    if diag_now and cfg.horizon.kind == "adaptive":
        ctx.adaptive.horizon = int(dist.max([float(ctx.adaptive.horizon)])[0])
    return out


def before_training(ctx: RunContext, progress: bool) -> None:
    """Step 0: the untrained student's accuracy; for the adaptive horizon, the reading that
    sets its regions' baseline."""
    if progress and ctx.dist.main:
        print(f"distill: evaluating the student on {len(ctx.eval_examples)} held-out prompts "
              f"at L={ctx.budget} before training...", file=sys.stderr, flush=True)
    ctx.acc = ctx.run_eval(0)
    if ctx.cfg.horizon.kind == "adaptive":
        with ctx.dist.full_weights(ctx.student):
            if ctx.dist.main:
                adapt(ctx, 0, *ctx.diagnose(0))


def adapt(ctx: RunContext, step: int, rec: dict[str, Any], reading: PositionReading
          ) -> dict[str, Any]:
    """The adaptive horizon's move on a reading, whose time counts as its training cost;
    returns what the step's metrics line adds (control_time_s, and horizon_move if it moved)."""
    ctx.totals["control_time_s"] += rec["diag_time_s"]
    out: dict[str, Any] = {"control_time_s": ctx.totals["control_time_s"]}
    n_moves = len(ctx.adaptive.moves)
    ctx.adaptive = adaptive_update(ctx.adaptive, ctx.rule, step, reading)
    if len(ctx.adaptive.moves) > n_moves:
        out["horizon_move"] = ctx.adaptive.moves[-1]
    return out


def finish(ctx: RunContext, step: int, stopped_by: int) -> dict[str, Any]:
    """The result: the last accuracy, the val accuracy, the final model, result.json."""
    result = {"final_eval_accuracy": ctx.acc, "steps": step,
              "stopped_by_signal": bool(stopped_by), "signal": stopped_by, **ctx.totals,
              "eval_metric": ctx.metric, "collapse": ctx.collapse,
              **{f"final_{k}": v for k, v in ctx.last_eval.items()
                 if k.startswith("eval_") and k not in ("eval_accuracy", "eval_metric")}}
    if ctx.cfg.val_n and not stopped_by:  # the held-out half that settings are chosen on
        result["final_val_accuracy"] = ctx.run_val(step)
    if ctx.log is not None:
        ctx.log.close(result)
    if not stopped_by:
        ctx.save_final()
    if not ctx.dist.main:
        return result
    write_json(ctx.run / "result.json", result)
    t = ctx.totals
    quality = "".join(f", held-out {k} {ctx.last_eval[f'eval_{k}']:.3f}"
                      for k in ("rkl", "teacher_nll", "distinct_2")
                      if isinstance(ctx.last_eval.get(f"eval_{k}"), float))
    readings = (f" (+{t['control_time_s']:.0f}s of the adaptive horizon's readings)"
                if t.get("control_time_s") else "")
    print(f"distill: {'stopped by a signal' if stopped_by else 'done'} at step {step}, "
          f"full-budget accuracy {ctx.acc:.3f}{quality}, {t['train_time_s']:.0f}s training"
          f"{readings}, {t['sampled_tokens']} sampled tokens", flush=True)
    return result


def weights_finite(model: torch.nn.Module) -> bool:
    """One reduction over every weight: False once an update has put a NaN or inf anywhere."""
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    if not params:
        return True
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP shards
    return bool(torch.stack([torch.isfinite(t).all() for t in local]).all())  # one sync
