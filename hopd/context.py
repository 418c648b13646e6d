"""Setup of a distillation run: everything the loop reads, built once (`setup`), and the
actions the loop takes on it (evaluate, diagnose, save).

`setup` loads the student (or its LoRA adapter) and the teacher, builds the learner (DDP / FSDP),
the optimizer and the sampler, restores a checkpoint on --resume, and opens metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel

from hopd import config as C
from hopd.adaptive import AdaptiveRule, AdaptiveState, PositionReading
from hopd.compute import forward_flops_per_token
from hopd.diagnostics import position_diagnostics, recovery_probe
from hopd.dist import Dist
from hopd.distill_config import DistillConfig, OptimConfig
from hopd.evaluate import evaluate
from hopd.models import DTYPES, attach_lora, load_model
from hopd.preflight import Inputs
from hopd.progress import MetricsLog, clean_json
from hopd.quality import GuardReading, collapse_check
from hopd.rollout import HFSampler, SampleAhead, Sampler
from hopd.runstate import (
    latest_checkpoint,
    save_checkpoint,
    save_final_model,
    truncate_metrics,
    write_json,
)
from hopd.schedules import describe, initial_horizon
from hopd.tasks import Example, PromptSource, encode_prompts
from hopd.teacher import LocalTeacher, Teacher, TeacherUnavailable
from hopd.trackers import Trackers

# what each evaluation record carries beside the accuracy, as eval_<key>
QUALITY_KEYS = ("rkl", "rkl_se", "rkl_exact", "teacher_nll", "teacher_nll_se", "distinct_2",
                "distinct_2_se", "distinct_2_within", "distinct_2_across", "looping",
                "max_run_share", "max_run_share_max", "mostly_one_token", "eos_rate",
                "mean_length", "student_entropy")
GUARD_STEPS = 2  # the guard compares the mean loss of the first and of the latest 2 steps


@dataclass
class RunContext:
    """What the loop reads and updates: settings, data, models, optimizer, run state."""

    cfg: DistillConfig
    run: Path
    dist: Dist
    inp: Inputs  # data source, budget L, tokenizers, vocabulary
    student: PreTrainedModel
    learner: torch.nn.Module  # the student as it runs forward/backward (DDP / FSDP wrapped)
    opt: torch.optim.Optimizer
    teacher: Teacher
    sampler: Sampler
    greedy: HFSampler | None  # the student's greedy answers (loss.unlikelihood), else None
    rule: AdaptiveRule
    adaptive: AdaptiveState
    eval_examples: list[Example]
    log: MetricsLog | None  # rank 0 only
    start: int = 0  # the step this process starts at (resume)
    totals: dict[str, float] = field(default_factory=lambda: {
        "train_time_s": 0.0, "sampled_tokens": 0, "skipped_steps": 0, "prompts": 0,
        "train_flops": 0.0, "train_cpu_s": 0.0, "control_time_s": 0.0})
    # control_time_s: the full-budget readings the adaptive horizon decides on (its cost beside
    # train_time_s, which counts the steps alone; the report adds the two)
    # forward FLOPs per token of the student and of the teacher (0: behind a server); the
    # load-independent cost the report's verdicts use (hopd.compute)
    flops_per_token: tuple[float, float] = (0.0, 0.0)
    acc: float = math.nan  # the last full-budget evaluation's accuracy
    last_eval: dict[str, Any] = field(default_factory=dict)  # its record (quality metrics too)
    guard: dict[str, Any] = field(default_factory=dict)  # the collapse guard's baseline: the
    # first evaluation's degeneration (`base`) and the first steps' losses (`losses`)
    collapse: str | None = None  # the guard's warning, once it fired

    @property
    def source(self) -> PromptSource:
        return self.inp.source

    @property
    def budget(self) -> int:
        return self.inp.budget

    @property
    def metric(self) -> str:
        """The evaluation's headline number (eval_metric; "" picks by the data)."""
        return self.cfg.eval_metric or ("accuracy" if self.source.has_answers else "rkl")

    @property
    def teacher_system(self) -> str:
        return self.cfg.teacher_system_prompt or self.cfg.system_prompt

    def encode(self, prompts: list[str]) -> tuple[list[list[int]], list[list[int]] | None]:
        """Prompts in the student's format, and in the teacher's when that differs."""
        ids = encode_prompts(self.inp.tok, prompts, self.cfg.system_prompt)
        if not self.inp.separate_teacher_prompt:
            return ids, None
        return ids, encode_prompts(self.inp.t_tok, prompts, self.teacher_system)

    def write(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(record)

    def evaluated(self, examples: list[Example]) -> dict[str, Any] | None:
        """Rank 0 evaluates `examples` at the full budget (None on the others, which wait)."""
        ev = None
        with self.dist.full_weights(self.student):
            if self.dist.main:
                n_kl = min(self.cfg.eval_kl_n, len(examples))
                _, t_prompts = self.encode([e.prompt for e in examples[:n_kl]])
                check = self.source.is_correct if self.source.has_answers else None
                args = (self.student, self.inp.tok, examples, check, self.budget)
                kw = {"seed": self.cfg.seed, "system_prompt": self.cfg.system_prompt,
                      "vocab": self.inp.vocab, "cache": self.cfg.eval_cache}
                try:
                    ev = evaluate(*args, teacher=self.teacher, teacher_prompts=t_prompts,
                                  kl_n=n_kl, **kw)
                except TeacherUnavailable as e:  # the step after will stop, with state saved
                    print(f"distill: the teacher failed during evaluation ({e}); evaluating "
                          "without the teacher's metrics", file=sys.stderr, flush=True)
                    ev = evaluate(*args, kl_n=0, **kw)
            self.dist.barrier()
        return ev

    def run_eval(self, step: int) -> float:
        """The full-budget accuracy on the evaluation set, logged; NaN on ranks other than 0."""
        ev = self.evaluated(self.eval_examples)
        if ev is None:
            return math.nan
        rec = {"step": step, "eval_accuracy": ev["accuracy"],
               "eval_mean_response_tokens": ev["mean_response_tokens"],
               "eval_truncated_fraction": ev["truncated_fraction"],
               "eval_time_s": ev["eval_time_s"], "eval_metric": self.metric,
               **{f"eval_{k}": ev[k] for k in QUALITY_KEYS if k in ev}, **self.totals,
               **({"eval_cached": True} if ev.get("cached") else {})}
        first = "base" not in self.guard
        warning = self.check_collapse(step, ev)
        if warning:
            rec["collapse"] = warning
        if first:  # what the guard will hold later answers against
            rec["guard_reference"] = self.guard["base"]
        self.last_eval = rec
        self.write(rec)
        return ev["accuracy"]

    def note_loss(self, loss: float) -> None:
        """The guard's loss baseline: the first GUARD_STEPS steps' losses."""
        losses = self.guard.setdefault("losses", [])
        if len(losses) < GUARD_STEPS:
            losses.append(loss)
        recent = self.guard.setdefault("recent", [])
        recent.append(loss)
        del recent[:-GUARD_STEPS]

    def reference(self, first: dict[str, Any]) -> dict[str, Any]:
        """What the guard holds answers against: the teacher's own greedy answers to the
        evaluation prompts (a model here), else the student's first evaluation."""
        if self.teacher.model is None:
            return {"of": "student", **{k: first[k] for k in ("distinct_2", "mostly_one_token")}}
        ev = evaluate(self.teacher.model, self.inp.t_tok, self.eval_examples, None, self.budget,
                      seed=self.cfg.seed, system_prompt=self.teacher_system, kl_n=0,
                      cache=self.cfg.eval_cache)
        return {"of": "teacher", **{k: ev[k] for k in ("distinct_2", "distinct_2_se", "looping",
                                                       "mostly_one_token", "eos_rate",
                                                       "mean_length")}}

    def check_collapse(self, step: int, ev: dict[str, Any]) -> str | None:
        """The collapse guard at an evaluation (mode-seeking losses on the student's own answers
        only: sft and fkl cover the teacher's answers, and on the teacher's answers no loss can
        win by collapsing); prints its warning once."""
        if "base" not in self.guard:
            self.guard["base"] = self.reference(ev)
            return None
        if self.cfg.loss.kind == "fkl" or self.cfg.loss.teacher_rollouts or \
                not self.guard.get("recent"):
            return None
        first, recent = self.guard["losses"], self.guard["recent"]
        warning = collapse_check(GuardReading(sum(first) / len(first),
                                              sum(recent) / len(recent), self.guard["base"], ev))
        if warning and self.collapse is None:
            print(f"distill: step {step}: {warning}", file=sys.stderr, flush=True)
        self.collapse = warning or self.collapse
        return warning

    def run_val(self, step: int) -> float:
        """The `val` half (disjoint from the test half), to choose settings on."""
        val = self.source.eval_set(self.cfg.val_n, seed=self.cfg.seed, part="val")
        ev = self.evaluated(val)
        if ev is None:
            return math.nan
        self.write({"step": step, "val_accuracy": ev["accuracy"], "val_n": len(val),
                    **{f"val_{k}": ev[k] for k in QUALITY_KEYS if k in ev}})
        return ev["accuracy"]

    def save(self, step: int) -> None:
        """A checkpoint: weights (or adapter), optimizer, RNG, totals, adaptive state."""
        opt_state = self.dist.optimizer_state(self.student, self.opt)  # FSDP: all ranks gather
        weights = self.dist.model_state(self.student)
        if self.dist.main:
            save_checkpoint(self.run, step, self.student, self.inp.tok, opt_state,
                            {"totals": self.totals, "adaptive": json.dumps(self.adaptive.to_dict()),
                             "parallel": self.dist.parallel, "eval_accuracy": self.acc,
                             "guard": json.dumps(clean_json(self.guard)),
                             "last_eval": json.dumps(clean_json(self.last_eval))},
                            self.cfg.keep_last, weights)

    def save_final(self) -> None:
        """RUN/model: the student (LoRA merged when lora.merge)."""
        weights = self.dist.model_state(self.student)  # FSDP: gathered by all ranks
        if self.dist.main:
            model = self.student.merge_and_unload() if self.cfg.lora.rank and \
                self.cfg.lora.merge else self.student
            save_final_model(self.run, model, self.inp.tok, weights)

    def checkpoint_note(self) -> str:
        last = latest_checkpoint(self.run)
        return (f"the last good checkpoint is {last}" if last is not None else
                "no checkpoint was saved (save_every=0 saves only at the end)")

    def diagnose(self, step: int) -> tuple[dict[str, Any], PositionReading]:
        """Per-position KL and teacher entropy at the full budget (rank 0, full weights)."""
        t0 = time.perf_counter()
        examples = self.eval_examples[: self.cfg.diag_n]
        prompts, teacher_prompts = self.encode([e.prompt for e in examples])
        rec, reading = position_diagnostics(
            self.student, self.teacher, prompts, sampling=self.cfg.sampling, budget=self.budget,
            vocab=self.inp.vocab, eos=self.inp.tok.eos_token_id, pad=self.inp.tok.pad_token_id,
            seed=self.cfg.seed, step=step, buckets=self.cfg.diag_buckets,
            teacher_prompts=teacher_prompts)
        return {**rec, "diag_time_s": time.perf_counter() - t0}, reading

    def probe(self) -> dict[str, Any]:
        """The teacher-recovery probe (rank 0, full weights; needs the teacher model here)."""
        t0 = time.perf_counter()
        examples = self.eval_examples[: self.cfg.probe_n]
        prompts, teacher_prompts = self.encode([e.prompt for e in examples])
        acc = recovery_probe(self.student, self.teacher.model, self.inp.tok, prompts,
                             [e.answer for e in examples], self.source.is_correct, self.budget,
                             teacher_prompts=teacher_prompts)
        return {"probe_teacher_acc_by_cut": acc, "probe_time_s": time.perf_counter() - t0}


def load_student(cfg: DistillConfig, inp: Inputs, ckpt: Path | None, device: str
                 ) -> PreTrainedModel:
    """The student, from the checkpoint `ckpt` when there is one; under LoRA the checkpoint
    holds the adapter and the base comes from `student`."""
    trust = cfg.trust_remote_code
    if cfg.lora.rank:
        return attach_lora(load_model(str(inp.s_path), device, cfg.dtype, trust), cfg.lora.rank,
                           cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                           adapter=ckpt)
    return load_model(str(ckpt or inp.s_path), device, cfg.dtype, trust)


def last_accuracy(state: dict[str, Any]) -> float:
    """The checkpoint's last full-budget accuracy (NaN before the first evaluation)."""
    acc = state.get("eval_accuracy")
    return math.nan if acc is None else float(acc)


def load_models(cfg: DistillConfig, inp: Inputs, ckpt: Path | None, device: str
                ) -> tuple[PreTrainedModel, Teacher]:
    """The student (`load_student`) and the teacher (a model here, or the server)."""
    student = load_student(cfg, inp, ckpt, device)
    if inp.remote is not None:
        return student, inp.remote
    model = load_model(str(inp.t_path), cfg.teacher_device or device,
                       cfg.teacher_dtype or cfg.dtype, cfg.trust_remote_code).eval()
    return student, LocalTeacher(model.requires_grad_(False), inp.vocab)


def make_sampler(cfg: DistillConfig, inp: Inputs, student: PreTrainedModel,
                 teacher: Teacher) -> Sampler:
    """The run's rollout engine (sampling.engine): the student's, or the teacher's for the SFT
    baseline and supervised KD (loss.rollouts=teacher), which sampling.ahead > 1 draws several
    steps at a time (`SampleAhead`: `batches` plans them)."""
    by_teacher, s = cfg.loss.teacher_rollouts, cfg.sampling
    model = teacher.model if by_teacher else student
    greedy = by_teacher and cfg.loss.sft_greedy
    eos, pad = inp.tok.eos_token_id, inp.tok.pad_token_id
    if s.engine == "vllm":
        from hopd.vllm_sampler import VLLMSampler

        sampler: Sampler = VLLMSampler(
            model, str(inp.t_path if by_teacher else inp.s_path), eos_id=eos, pad_id=pad,
            max_len=model.config.max_position_embeddings, dtype=cfg.dtype, seed=cfg.seed,
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, greedy=greedy,
            gpu_memory_utilization=s.vllm_gpu_memory, kv_cache_gib=s.vllm_cpu_kv_gib)
    else:
        sampler = HFSampler(model, eos, pad, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, greedy=greedy, cuda_graph=s.cuda_graph,
                            dtype=DTYPES[s.dtype] if s.dtype else None)
    return SampleAhead(sampler) if s.ahead > 1 else sampler


def make_greedy(cfg: DistillConfig, inp: Inputs, student: PreTrainedModel, sampler: Sampler
                ) -> HFSampler | None:
    """The student's greedy sampler for loss.unlikelihood (None when it is off): the run's own
    sampler's greedy twin when that is the student's HFSampler, else a new one (with its own
    sampling.dtype copy, which the loop syncs too)."""
    if not cfg.loss.unlikelihood:
        return None
    if isinstance(sampler, HFSampler) and sampler.model is student:
        return sampler.greedy_twin()
    dtype = DTYPES[cfg.sampling.dtype] if cfg.sampling.dtype else None
    return HFSampler(student, inp.tok.eos_token_id, inp.tok.pad_token_id, greedy=True,
                     cuda_graph=cfg.sampling.cuda_graph, dtype=dtype)


def make_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig
                   ) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel over all weights where torch has one for them (CPU and CUDA
    floating-point tensors; not FSDP's sharded DTensors). On the CPU the fused step is 5-6x
    faster than the default loop (Qwen2-0.5B's layout: 2.4 s a step, TRL's fused 0.6 s)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                and not hasattr(p, "to_local") for p in params)
    return torch.optim.AdamW(params, lr=optim.lr, betas=(0.9, 0.95),
                             weight_decay=optim.weight_decay, fused=fused)


def setup(cfg: DistillConfig, run: Path, inp: Inputs, dist: Dist, *, ckpt: Path | None,
          state: dict[str, Any] | None, resume: bool, write_config: bool) -> RunContext:
    """Builds the run: models, learner, optimizer, sampler, adaptive rule, metrics log; restores
    the checkpoint `ckpt` (trainer `state`) on resume."""
    student, teacher = load_models(cfg, inp, ckpt, dist.device)
    student.train()
    learner = dist.wrap(student)  # DDP wrapper or FSDP-sharded student: forward/backward
    trainable = [p for p in student.parameters() if p.requires_grad]  # sharded under FSDP
    opt = make_optimizer(trainable, cfg.optim)
    h = cfg.horizon
    rule = AdaptiveRule(inp.budget, h.adaptive_window, h.adaptive_growth, h.adaptive_factor,
                        h.adaptive_ratio, h.adaptive_threshold, h.adaptive_plateau,
                        h.adaptive_patience, h.adaptive_drift, h.adaptive_z)
    sampler = make_sampler(cfg, inp, student, teacher)
    ctx = RunContext(
        cfg=cfg, run=run, dist=dist, inp=inp, student=student, learner=learner, opt=opt,
        teacher=teacher, sampler=sampler, greedy=make_greedy(cfg, inp, student, sampler),
        rule=rule,
        adaptive=AdaptiveState(initial_horizon(h, inp.budget)),
        eval_examples=inp.source.eval_set(cfg.eval_n, seed=cfg.seed, part=cfg.eval_split),
        log=None, flops_per_token=(forward_flops_per_token(student),
                                   forward_flops_per_token(teacher.model)))
    if ckpt is not None and state is not None:
        restore(ctx, ckpt, state)
    elif resume and (run / "metrics.jsonl").exists() and dist.main:
        truncate_metrics(run / "metrics.jsonl", -1)  # no checkpoint yet: start over
    if dist.main and write_config:
        (run / "config.yaml").write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
    dist.barrier()
    announce(ctx)
    if dist.main:  # opened after a resume has cut the log back to its checkpoint
        trackers = Trackers(cfg.log_to, run, C.to_dict(cfg), run.name) if cfg.log_to else None
        ctx.log = MetricsLog(run / "metrics.jsonl", trackers)
    return ctx


def restore(ctx: RunContext, ckpt: Path, state: dict[str, Any]) -> None:
    """Continues from a checkpoint: optimizer, RNG, totals, accuracy, adaptive state; the
    metrics log is cut back to the checkpoint's step."""
    ctx.dist.load_optimizer_state(ctx.student, ctx.opt, state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    ctx.start, ctx.totals = state["step"], {**ctx.totals, **state["totals"]}
    ctx.acc = last_accuracy(state)
    if "adaptive" in state:
        ctx.adaptive = AdaptiveState.from_dict(json.loads(state["adaptive"]))
    ctx.guard = json.loads(state.get("guard", "{}"))
    ctx.last_eval = json.loads(state.get("last_eval", "{}"))
    if ctx.dist.main:
        truncate_metrics(ctx.run / "metrics.jsonl", ctx.start)
        print(f"distill: resuming from {ckpt.name} (step {ctx.start})", flush=True)


def announce(ctx: RunContext) -> None:
    """Rank 0 says what will run: the schedule, the pair, the loss, the batch, the folder."""
    cfg, dist = ctx.cfg, ctx.dist
    if not dist.main:
        return
    if cfg.probe_every and ctx.teacher.model is None:
        print("distill: probe_every is set, but the teacher-recovery probe needs the teacher "
              "model in this process and the teacher is a server: the probe is skipped",
              file=sys.stderr, flush=True)
    print(describe(cfg.max_steps, ctx.budget, cfg.horizon), flush=True)
    print(f"distill: student {cfg.student} -> teacher {cfg.teacher or cfg.teacher_url}, loss "
          f"{cfg.loss.kind}, {cfg.max_steps} steps x {cfg.batch_size} prompts"
          + (f" over {dist.world} processes ({dist.parallel.upper()})" if dist.world > 1 else "")
          + f", run folder {ctx.run}", flush=True)


def finish_done_run(cfg: DistillConfig, run: Path, ckpt: Path, state: dict[str, Any],
                    inp: Inputs, dist: Dist) -> dict[str, Any]:
    """--resume of a run whose budget is spent: report it, or finish a final save a kill cut."""
    result_path, tok = run / "result.json", inp.tok
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
    student = load_student(cfg, inp, ckpt, "cpu")
    if cfg.lora.rank and cfg.lora.merge:
        student = student.merge_and_unload()
    result = {"final_eval_accuracy": last_accuracy(state),
              "steps": state["step"], "stopped_by_signal": False, "signal": 0,
              **state["totals"]}
    if dist.main:
        save_final_model(run, student, tok)
        write_json(result_path, result)
        print(f"distill: {run} had finished training; wrote its final model and result from "
              f"{ckpt.name}", flush=True)
    return result
