"""`hopd compare`: several horizon strategies from the same student, seeds and budget.

Each strategy is the base distill config plus a few overrides; every (strategy, seed) pair gets its
own run folder `OUT/<strategy>/seed<k>`, and `hopd report` turns them into plots and report.md.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from hopd import config as C
from hopd.distill import TrainingStopped, check_inputs, distill, load_config
from hopd.runstate import (
    StopFlag,
    check_out,
    latest_checkpoint,
    prepare_out,
    read_result,
    run_finished,
    write_json,
)

# name -> overrides on the base config: the paper's three strategies plus TOPD at 25%, then the
# adaptive horizon and TOPD with token-budget batching (hopd.adaptive)
STRATEGIES: dict[str, list[str]] = {
    "opd": ["horizon.kind=full"],
    "popd": ["horizon.kind=progressive", "horizon.shape=step", "horizon.start=0.1",
             "horizon.reach_at=0.5", "horizon.increments=4"],
    "topd10": ["horizon.kind=truncated", "horizon.fraction=0.1"],
    "topd25": ["horizon.kind=truncated", "horizon.fraction=0.25"],
    # beyond the paper
    # adaptive: 64 diagnostic rollouts per reading (not 16), or the covered region's fall is
    # within noise (measured: 0.36 +- 0.17 nats at step 0 on the spread student with 16)
    "adaptive": ["horizon.kind=adaptive", "horizon.start=0.1", "diag_n=64"],
    "topd10_tb": ["horizon.kind=truncated", "horizon.fraction=0.1", "token_budget=true"],
    # the baseline every OPD paper beats: cross-entropy on the teacher's own answers
    "sft": ["horizon.kind=full", "loss.kind=sft"],
    # and its word-level form: the teacher's whole distribution at each of its own tokens
    "kd": ["horizon.kind=full", "loss.kind=fkl", "loss.rollouts=teacher"],
}
DEFAULT = ["opd", "popd", "topd10", "topd25"]


def parse_strategies(names: str, extra: dict[str, list[str]] | None = None) -> list[str]:
    """Comma list of strategy names, each optionally pinned to a learning rate: `opd@1e-3`."""
    known = {**STRATEGIES, **(extra or {})}
    out = [n.strip() for n in names.split(",") if n.strip()]
    for n in out:
        name, _, lr = n.partition("@")
        if name not in known:
            raise C.ConfigError(f"unknown strategy {name!r}: choose from {', '.join(known)}")
        if lr:
            _parse_lr(lr, f"--strategies {n}")
    if not out:
        raise C.ConfigError("--strategies is empty: name at least one, e.g. opd,popd,topd10")
    return out


def parse_lrs(text: str) -> list[float]:
    """`--lrs 3e-4,1e-3,3e-3`: the learning-rate grid every strategy runs at."""
    lrs = [_parse_lr(x.strip(), "--lrs") for x in text.split(",") if x.strip()]
    if len(set(lrs)) != len(lrs):
        raise C.ConfigError(f"--lrs {text}: a rate is given twice")
    return lrs


def _parse_lr(text: str, where: str) -> float:
    try:
        lr = float(text)
    except ValueError:
        raise C.ConfigError(f"{where}: {text!r} is not a number (e.g. 1e-3)") from None
    if not 0 < lr <= 100:
        raise C.ConfigError(f"{where}: learning rate {text} must be in (0, 100]")
    return lr


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def budget_overrides(steps: int, seconds: float, tokens: int) -> list[str]:
    """Budget as optimizer steps, training seconds or sampled tokens (one of them)."""
    given = [x for x in (steps, seconds, tokens) if x]
    if len(given) > 1:
        raise C.ConfigError("give one budget: --steps, --seconds or --tokens")
    if seconds:
        return [f"max_time_s={seconds}", "max_steps=100000"]
    if tokens:
        return [f"max_tokens={tokens}", "max_steps=100000"]
    return [f"max_steps={steps}"] if steps else []


def compare(config: str | Path | None, out: Path, strategies: list[str], seeds: list[int],
            overrides: list[str], budget: list[str], progress: bool = True,
            extra_strategies: dict[str, list[str]] | None = None, resume: bool = False,
            overwrite: bool = False, lrs: list[float] | None = None, jobs: int = 1
            ) -> tuple[list[Path], int]:
    """Runs every strategy for every seed; returns the run folders and the number of the signal
    that stopped it (0: every run finished).

    All configs are built and validated, and the first run's inputs (data, models) checked,
    before the folder is touched, so a typo fails at once and --overwrite deletes nothing then.
    With `lrs`, every strategy runs at every rate (OUT/<strategy>/lr<x>/seed<k>) and also
    evaluates the `val` half at the end, which the report uses to pick each strategy's rate.
    `jobs` > 1 runs that many at a time, each in its own process.
    """
    if jobs < 1:
        raise C.ConfigError(f"--jobs {jobs}: must be >= 1 (runs at a time)")
    known = {**STRATEGIES, **(extra_strategies or {})}
    plan: list[tuple[str, int, float | None, Any]] = []
    if lrs and not any(o.startswith("val_n=") for o in overrides):
        overrides = [*overrides, "val_n=200"]  # a grid is chosen on the val half, never on test
    for entry in strategies:
        name, _, pinned = entry.partition("@")
        for lr in ([float(pinned)] if pinned else lrs or [None]):
            lr_over = [f"optim.lr={lr}"] if lr is not None else []
            for seed in seeds:
                cfg = load_config(config, [*overrides, *budget, *known[name], *lr_over,
                                           f"seed={seed}"])
                plan.append((name, seed, lr, cfg))
    runs = [out / name / (lr_tag(lr) if lr is not None else "") / f"seed{seed}"
            for name, seed, lr, _ in plan]
    if len(set(runs)) < len(runs):  # e.g. --lrs 1e-4,1.00e-4: one folder for two runs
        twice = sorted({str(r) for r in runs if runs.count(r) > 1})
        raise C.ConfigError(f"two runs of the plan would share the folder {twice[0]}: give each "
                            "strategy, rate and seed once (--lrs rates that differ as numbers)")
    check_out(out, kind="compare", overwrite=overwrite, resume=resume)
    check_inputs(plan[0][3])  # data, models, context: shared by every run
    todo = []  # (index, name, seed, lr, cfg, run folder) still to run
    for i, ((name, seed, lr, cfg), run) in enumerate(zip(plan, runs)):
        if not (resume and run_finished(run)):  # a run stopped early is resumed, not skipped
            todo.append((i, name, seed, lr, cfg, run))
    t0 = time.perf_counter()
    with prepare_out(out, kind="compare", overwrite=overwrite, resume=resume):
        if jobs > 1:
            signum = _run_parallel(todo, out, len(plan), known, jobs, resume)
        else:
            signum = _run_serial(todo, len(plan), known, resume, progress)
        if signum:
            return runs, signum
    print(f"compare: {len(plan)} runs in {time.perf_counter() - t0:.0f}s", flush=True)
    return runs, 0


def _run_one(name: str, seed: int, lr: float | None, cfg: Any, run: Path, overrides: list[str],
             resume: bool, progress: bool, log: Path | None = None) -> dict:
    """One run of the plan; with `log`, its output goes to that file (a parallel worker)."""
    with contextlib.ExitStack() as stack:
        if log is not None:
            f = stack.enter_context(open(log, "a", buffering=1))
            stack.enter_context(contextlib.redirect_stdout(f))
            stack.enter_context(contextlib.redirect_stderr(f))
        result = distill(cfg, run, resume=resume, progress=progress)
    write_json(run / "strategy.json", {"strategy": name, "seed": seed, "lr": lr,
                                       "overrides": overrides})
    return result


def _worker_init() -> None:
    """A worker's own process group (the terminal's Ctrl-C reaches only the parent, which
    forwards it once); an idle worker ignores signals, a running one's distill handles them.
    On Linux the worker is killed when its parent dies (even by kill -9), so no run goes on
    training for a compare that is gone."""
    os.setpgrp()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL), where the C library has it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call: do not outlive it
        os._exit(1)


def _dead_worker(broken: list[tuple], n_plan: int, logs: Path) -> str:
    """What a worker that died abruptly (kill -9, the OOM killer) left: Python's pool stops the
    other workers too, so every run that was running is named, with what its folder holds (a
    stopped run saved itself; the killed one keeps only its earlier checkpoints)."""
    parts = []
    for i, name, seed, lr, run in sorted(broken):
        result = read_result(run)
        if result is not None and result.get("stopped_by_signal"):
            state = f"stopped and saved at step {result.get('steps')}"
        else:
            last = latest_checkpoint(run)
            state = "killed; " + (f"its last checkpoint {last.name} is intact" if last else
                                  "no checkpoint was written yet")
        parts.append(f"run {i + 1}/{n_plan} ({_label(name, seed, lr)}): {state}")
    return ("a worker process died (killed by a signal, or out of memory?), and the pool "
            "stopped the other runs: " + "; ".join(parts) + f". No report is written; logs "
            f"are in {logs}. Continue with --resume")


def _label(name: str, seed: int, lr: float | None) -> str:
    return f"{name}" + (f", lr {lr:g}" if lr is not None else "") + f", seed {seed}"


def _run_serial(todo: list, n_plan: int, known: dict, resume: bool, progress: bool) -> int:
    t0 = time.perf_counter()
    for done, (i, name, seed, lr, cfg, run) in enumerate(todo):
        spent = time.perf_counter() - t0
        eta = f", about {spent / done * (len(todo) - done) / 60:.0f} min left" if done else ""
        print(f"\n== compare: run {i + 1}/{n_plan}: {_label(name, seed, lr)} "
              f"({spent / 60:.0f} min so far{eta}) ==", flush=True)
        result = _run_one(name, seed, lr, cfg, run, known[name], resume, progress)
        if result.get("signal"):  # the user asked to stop: start no further run
            return int(result["signal"])
    return 0


def _run_parallel(todo: list, out: Path, n_plan: int, known: dict, jobs: int,
                  resume: bool) -> int:
    """Runs the plan `jobs` at a time in fresh processes (one device shared by several small
    runs: a GPU is mostly idle under one tiny model). Each run's output goes to
    OUT/logs/<strategy>[_lr<x>]_seed<k>.log; a line here says when each one ends.

    A run is handed to a worker only when one is free, so a signal or a failed run starts
    nothing more. The workers sit in their own process group: a signal (Ctrl-C, or a kill of
    this process) reaches them once, forwarded from here, and each running one saves and stops
    as a single run does."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    pending, running, finished = list(todo), {}, 0
    stopped: list[tuple[str, int]] = []  # runs that a signal stopped early
    broken: list[tuple] = []  # runs lost to a worker that died
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    print(f"compare: {len(todo)} runs, {jobs} at a time; logs in {logs}", flush=True)
    with StopFlag() as flag, ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                                 initializer=_worker_init) as pool:
        forwarded, failure = False, None
        while pending or running:
            while pending and len(running) < jobs and not flag.stop and failure is None \
                    and not stopped and not broken:
                i, name, seed, lr, cfg, run = pending.pop(0)
                tag = f"{name}_{lr_tag(lr)}" if lr is not None else name
                log = logs / f"{tag}_seed{seed}.log"
                fut = pool.submit(_run_one, name, seed, lr, cfg, run, known[name], resume,
                                  False, log)
                running[fut] = (i, name, seed, lr, run, log)
            if not running:
                break
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            if flag.stop and not forwarded:
                forwarded = True
                for proc in list(getattr(pool, "_processes", {}).values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, flag.signum)
            for fut in done:
                i, name, seed, lr, run, log = running.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:  # a worker died (kill -9, out of memory): Python
                    # stops every worker (SIGTERM: a running run saves and stops)
                    broken.append((i, name, seed, lr, run))
                    continue
                except Exception as e:  # start no further run; the running ones finish
                    first = str(e).strip().splitlines()[0] if str(e).strip() else \
                        type(e).__name__
                    failure = failure or TrainingStopped(
                        f"run {i + 1}/{n_plan} ({_label(name, seed, lr)}) failed: {first}; its "
                        f"output is in {log}")
                    continue
                if result.get("signal"):  # this worker alone was stopped: not a finished run
                    stopped.append((_label(name, seed, lr), int(result["signal"])))
                    continue
                finished += 1
                metric = result.get("eval_metric") or "accuracy"
                value = result.get(f"final_eval_{metric}")
                shown = f"{value:.4g}" if isinstance(value, float) else value
                print(f"compare: {finished}/{len(todo)} done after "
                      f"{time.perf_counter() - t0:.0f}s: {_label(name, seed, lr)}, final "
                      f"{metric} {shown}", flush=True)
    if broken:
        raise TrainingStopped(_dead_worker(broken, n_plan, logs))
    if failure is not None:
        raise failure
    if stopped and not flag.stop:
        print("compare: stopped early by a signal: " + "; ".join(n for n, _ in stopped)
              + "; no report is written. Continue with --resume", file=sys.stderr, flush=True)
    return flag.signum if flag.stop else (stopped[0][1] if stopped else 0)
