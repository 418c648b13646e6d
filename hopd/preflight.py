"""Everything checked before a run touches its folder or loads a model: the data and every
prompt's length against the context, the horizon against the budget, the tokenizer pair, model
folders' code, the teacher server, and a resumed run's config against the one it was started
with.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hopd import config as C
from hopd.distill_config import DistillConfig
from hopd.models import check_compatible, load_tokenizer, matched_teacher, resolve_model_path
from hopd.tasks import PromptSource, encode_prompts
from hopd.teacher import RemoteTeacher
from hopd.trackers import check_trackers


@dataclass
class Inputs:
    """What the checks before a run establish: data, budget, tokenizers, vocabulary, teacher."""

    source: PromptSource
    budget: int  # the full response budget L
    s_path: Path
    tok: Any  # the student's tokenizer
    t_tok: Any  # the teacher's (the student's own with a remote teacher)
    t_path: Path | None  # None: a remote teacher
    vocab: int  # logits the losses compare: min(V_student, V_teacher)
    remote: RemoteTeacher | None
    separate_teacher_prompt: bool  # the teacher has its own system prompt or chat template


def check_inputs(cfg: DistillConfig) -> Inputs:
    """Everything that can be wrong, checked before any model is loaded or file written: the data,
    the horizon against the budget, the tokenizer pair, model code, the context length."""
    check_trackers(cfg.log_to)
    source = PromptSource(cfg.data, cfg.eval_data, cfg.data_prompt_field, cfg.data_answer_field)
    budget = cfg.budget or source.default_budget()
    cfg.horizon.validate(budget)
    s_path = resolve_model_path(cfg.student)
    tok = load_tokenizer(str(s_path), cfg.trust_remote_code)
    s_conf = json.loads((s_path / "config.json").read_text())
    s_vocab = s_conf.get("vocab_size", len(tok))
    remote, t_path, t_conf = None, None, {}
    if cfg.teacher_url:  # the teacher runs elsewhere: check it answers and shares the tokenizer
        remote = RemoteTeacher(cfg.teacher_url, cfg.teacher_timeout_s, cfg.teacher_retries)
        remote.check_tokenizer(tok)
        t_tok, vocab = tok, s_vocab
        if cfg.teacher_tokenizer:  # the server's own chat template, from a local copy
            t_tok = load_tokenizer(cfg.teacher_tokenizer, cfg.trust_remote_code)
            check_compatible(t_tok, tok, s_vocab, s_vocab)
    else:
        t_path, t_tok, t_conf, vocab = matched_teacher(cfg.teacher, tok, s_vocab,
                                                       cfg.trust_remote_code)
    C.check(cfg.loss.top_k <= vocab, f"loss.top_k={cfg.loss.top_k} exceeds the vocabulary "
            f"({vocab} tokens): use a smaller k, or 0 for the full vocabulary")
    separate = bool(cfg.teacher_system_prompt) or t_tok.chat_template != tok.chat_template
    inputs = Inputs(source, budget, s_path, tok, t_tok, t_path, vocab, remote, separate)
    check_context(cfg, inputs, [("student", s_conf), ("teacher", t_conf)])
    if cfg.sampling.engine == "vllm":  # vLLM installed, and able to run the sampling model
        from transformers import AutoConfig

        from hopd.vllm_sampler import check_model

        path = t_path if cfg.loss.teacher_rollouts else s_path
        check_model(AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code),
                    cfg.device.split(":")[0], budget)
    return inputs


def check_context(cfg: DistillConfig, inp: Inputs, confs: list[tuple[str, dict[str, Any]]]
                  ) -> None:
    """Every prompt plus the budget L must fit each model's context.

    A file source is checked row by row (token counts cached per file); the generated testbed by
    its evaluation set and first batch (all its prompts have the same shape). Rows that do not fit
    are named, or dropped with a count when `drop_long_prompts` is set."""
    limits = [(c["max_position_embeddings"], name) for name, c in confs
              if c.get("max_position_embeddings")]
    if not limits:
        return
    ctx, who = min(limits)
    rows = inp.source.all_rows() or (
        inp.source.eval_set(cfg.eval_n, seed=cfg.seed)
        + inp.source.train_batch(0, cfg.batch_size, cfg.seed))
    teacher_system = cfg.teacher_system_prompt or cfg.system_prompt
    lengths = prompt_lengths(inp.tok, rows, cfg.system_prompt)
    if inp.separate_teacher_prompt:
        lengths = [max(a, b) for a, b in
                   zip(lengths, prompt_lengths(inp.t_tok, rows, teacher_system))]
    too_long = {id(e) for e, n in zip(rows, lengths) if n + inp.budget > ctx}
    if not too_long:
        return
    if cfg.drop_long_prompts and inp.source.all_rows():
        dropped = inp.source.drop_rows(lambda e: id(e) not in too_long)
        print(f"distill: dropped {dropped} prompts longer than {ctx - inp.budget} tokens "
              f"(the {who}'s context {ctx} - budget L={inp.budget})", file=sys.stderr, flush=True)
        return
    bad = [(e.where, n) for e, n in zip(rows, lengths) if id(e) in too_long]
    named = (": " + ", ".join(f"{w} ({n} tokens)" for w, n in bad[:5])
             + (", ..." if len(bad) > 5 else "")) if bad[0][0] else ""
    raise C.ConfigError(
        f"{len(bad)} prompt(s) of up to {max(n for _, n in bad)} tokens plus the budget "
        f"L={inp.budget} exceed the {who}'s context of {ctx} tokens{named}; lower budget, "
        "shorten those prompts, or set drop_long_prompts=true to skip them")


_LENGTHS: dict[tuple[Any, ...], list[int]] = {}


def prompt_lengths(tok: Any, rows: list[Any], system_prompt: str) -> list[int]:
    """Token counts of the encoded prompts, cached per (tokenizer, rows, system prompt)."""
    key = (getattr(tok, "name_or_path", ""), len(tok), tok.chat_template, system_prompt,
           tuple(id(e) for e in rows[:1]), len(rows), rows[0].where if rows else "")
    if key not in _LENGTHS:
        _LENGTHS.clear()
        _LENGTHS[key] = [len(p) for p in encode_prompts(tok, [e.prompt for e in rows],
                                                         system_prompt)]
    return _LENGTHS[key]


# settings a resumed run may change: they decide how long it runs and what it logs, not what it is
RESUMABLE_CHANGES = {
    "max_steps", "max_time_s", "max_tokens", "eval_every", "diag_every", "diag_n", "diag_buckets",
    "probe_every", "probe_n", "save_every", "keep_last", "max_bad_steps", "threads", "device",
    "teacher_device", "teacher_url", "teacher_timeout_s", "teacher_retries",
    "grad_accum",  # the same gradient in more or fewer micro-batches
    "parallel",  # checked against the checkpoint itself (the optimizer formats differ)
    # what is measured, not what is trained
    "eval_n", "eval_split", "val_n", "eval_kl_n", "eval_metric", "collapse_stop",
}


def config_changes(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (`saved` -> `new`)."""
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def check_resume_config(cfg: DistillConfig, run: Path, force: bool) -> bool:
    """Refuses a resume whose config makes it a different experiment; True if it changed."""
    path = run / "config.yaml"
    if not path.exists():
        return True
    # a setting added to hopd since the run was written counts at its default
    saved = _with_defaults(yaml.safe_load(path.read_text()) or {},
                           C.to_dict(DistillConfig()))
    changes = config_changes(saved, C.to_dict(cfg))
    blocking = [c for c in changes if c.split(":")[0] not in RESUMABLE_CHANGES]
    never = [c for c in changes if c.split(":")[0] in ("lora.rank", "lora.target_modules")]
    if never:  # the checkpoint holds full weights or an adapter of this shape: no forcing
        raise C.ConfigError(
            f"--resume: {'; '.join(never)}: the checkpoints in {run} hold "
            + ("full weights" if not (saved.get("lora") or {}).get("rank") else "LoRA adapters "
               "of the run's shape") + ", which cannot be continued with another LoRA setup, "
            "even with --force-config; start a new run with another --out")
    if blocking and not force:
        raise C.ConfigError(
            f"--resume: this config differs from the run's own ({path}): {'; '.join(blocking)}. "
            "That makes it a different experiment: give those settings as the run had them (or "
            "resume with --resume RUN alone, which uses its config.yaml), start a new run with "
            "another --out, or pass --force-config to continue anyway")
    return bool(changes)
