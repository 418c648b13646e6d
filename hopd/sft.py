"""Supervised training on worked solutions: trains the testbed teacher, warm-starts the student.

The loss is next-token cross-entropy on response tokens only (EOS included), averaged over them;
the prompt is context, never a target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hopd import config as C
from hopd.distill_config import OptimConfig
from hopd.evaluate import evaluate
from hopd.models import (
    DTYPES,
    TINY_SIZES,
    build_testbed_tokenizer,
    load_model,
    load_tokenizer,
    save_checkpoint,
    tiny_llama,
)
from hopd.progress import Bar, MetricsLog
from hopd.runstate import check_out, prepare_out, write_json
from hopd.schedules import warmup_cosine
from hopd.tasks import Example, PromptSource, chain, encode_prompts, is_chain
from hopd.trackers import Trackers, check_trackers


@dataclass
class SFTConfig:
    model: str = "size:teacher"  # "size:NAME" (fresh tiny Llama), testbed:* or a checkpoint path
    task: str = "chain:default"  # prompt source with reference solutions
    steps: int = 2400  # optimizer steps
    batch_size: int = 32  # sequences per step
    lr: float = 2e-3  # peak learning rate (AdamW)
    warmup_steps: int = 100  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    eval_every: int = 300  # evaluate every N steps (0: only at the end)
    eval_n: int = 100  # held-out problems per periodic evaluation
    save_every: int = 0  # also save OUT/step_N every N steps (0: only the final checkpoint)
    seed: int = 0  # model init, data order and evaluation seed
    save_dtype: str = "float32"  # dtype of the saved weights (bfloat16 halves the file)
    threads: int = 0  # torch CPU threads (0: torch's default)
    trust_remote_code: bool = False  # run Python code shipped in a model folder (auto_map)
    shortcut_fraction: float = 0.0  # prompts answered in the shortcut style ("Answer: N" at once)
    misconception: str = ""  # "*:+": every `*` line computed as `+` (a consistently wrong rule)
    misconception_fraction: float = 1.0  # share of examples (by prompt hash) that get it
    log_to: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb (jsonl always)

    def validate(self) -> None:
        C.check(self.steps >= 1, f"steps={self.steps}: must be >= 1")
        C.check(self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                    weight_decay=self.weight_decay, grad_clip=self.grad_clip).validate(prefix="")
        C.check(self.threads >= 0, f"threads={self.threads}: must be >= 0 (0: torch's default)")
        check_trackers(self.log_to)
        C.check(self.eval_every >= 0, f"eval_every={self.eval_every}: must be >= 0")
        C.check(self.eval_n >= 1, f"eval_n={self.eval_n}: must be >= 1")
        C.check(self.save_every >= 0, f"save_every={self.save_every}: must be >= 0")
        C.check(0 <= self.shortcut_fraction <= 1,
                f"shortcut_fraction={self.shortcut_fraction}: must be in [0, 1]")
        C.check(self.misconception == "" or (
            len(self.misconception) == 3 and self.misconception[1] == ":"
            and self.misconception[0] in chain.OPS and self.misconception[2] in chain.OPS),
            f"misconception={self.misconception!r}: write OP:AS, e.g. '*:+' (OP, AS in +-*)")
        C.check(0 <= self.misconception_fraction <= 1,
                f"misconception_fraction={self.misconception_fraction}: must be in [0, 1]")
        C.check(self.save_dtype in DTYPES,
                f"save_dtype={self.save_dtype!r}: choose one of {sorted(DTYPES)}")
        C.check(is_chain(self.task),
                f"task={self.task!r}: SFT needs reference solutions; use chain:default|hard|tiny")
        if self.model.startswith("size:"):
            size = self.model[5:]
            C.check(size in TINY_SIZES, f"model={self.model!r}: unknown size; choose one of "
                    f"{', '.join('size:' + s for s in TINY_SIZES)}")


def with_shortcuts(examples: list[Example], fraction: float) -> list[Example]:
    """Gives the prompts whose first digit is below 10 x `fraction` the shortcut style: the final
    answer at once ("Answer: N"), with no steps; the others keep their worked solution.

    A student trained on such a mix chooses its style with its first response token, from a
    feature it can see (the first digit of the program): the worked style is reliable, the
    shortcut is a guess for a model too small to compute a chain in one step. This makes the
    `fork` regime of the testbed, where success is decided by the first tokens. (A style drawn at
    random per example would not do: the student would learn a 50/50 first token, and greedy
    decoding would then pick one style for nearly every prompt.)"""
    if fraction <= 0:
        return examples
    cut = 10 * fraction
    return [replace(e, response=chain.ANSWER_PREFIX + e.answer) if _first_digit(e) < cut else e
            for e in examples]


def with_misconception(examples: list[Example], rule: str, fraction: float = 1.0
                       ) -> list[Example]:
    """Every line with operation OP computed as AS (`rule` "OP:AS", e.g. "*:+": `b=a*2=8*2=0`),
    and the later lines and the answer consistent with those wrong values, in a `fraction` of
    the examples (chosen by a hash of the prompt, a feature the student cannot see).

    A student trained on this holds a wrong rule that it applies on every line with OP, all along
    the solution: the `spread` regime of the testbed. Its prefixes stay in the teacher's format,
    so the teacher's next-token feedback on them is meaningful (a style the teacher never wrote,
    such as skipping a line's substitution, would leave the teacher to score text it never saw).
    With `fraction` < 1 the student holds both rules and prefers the wrong one by that share:
    a student certain of a wrong token gets almost no gradient from the reverse KL (its
    gradient on a token scales with the student's own probability of it)."""
    if not rule:
        return examples
    ops = {**chain.OPS, rule[0]: chain.OPS[rule[2]]}
    return [replace(e, response=chain.worked_solution(e.prompt, ops))
            if chain.hash_fraction(e.prompt) < fraction else e for e in examples]


def _first_digit(e: Example) -> int:
    text = e.prompt if isinstance(e.prompt, str) else e.prompt[-1]["content"]
    return next((int(c) for c in text if c.isdigit()), 9)


def sft_batch(tokenizer: PreTrainedTokenizerBase, examples: list[Example]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids, attention mask and loss mask (1 on response tokens incl. EOS).

    The loss mask marks *target* positions: loss_mask[b, t] = 1 when ids[b, t] is a response token,
    predicted from position t - 1.
    """
    prompts = encode_prompts(tokenizer, [e.prompt for e in examples])
    seqs, masks = [], []
    for p, e in zip(prompts, examples):
        resp = tokenizer(e.response, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id]
        seqs.append(p + resp)
        masks.append([0] * len(p) + [1] * len(resp))
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m)
    return ids, attn, loss_mask


def sft_loss(model: PreTrainedModel, ids_B_T: torch.Tensor, attn_B_T: torch.Tensor,
             loss_mask_B_T: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over response target tokens."""
    logits = model(input_ids=ids_B_T, attention_mask=attn_B_T).logits[:, :-1].float()
    targets, mask = ids_B_T[:, 1:], loss_mask_B_T[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def init_model(name: str, trust_remote_code: bool = False
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name.startswith("size:"):
        tok = build_testbed_tokenizer()
        return tiny_llama(name[5:], tok), tok
    return load_model(name, trust_remote_code=trust_remote_code), \
        load_tokenizer(name, trust_remote_code=trust_remote_code)


def train_sft(cfg: SFTConfig, out: Path, progress: bool = True, overwrite: bool = False
              ) -> dict:
    """Runs SFT and saves an HF checkpoint with its tokenizer in `out`; returns the final eval.

    `out` is checked first and replaced (`overwrite`) only once the model has loaded."""
    check_out(out, kind="sft", overwrite=overwrite)
    check_trackers(cfg.log_to)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tok = init_model(cfg.model, cfg.trust_remote_code)
    with prepare_out(out, kind="sft", overwrite=overwrite):
        return _train(cfg, out, model, tok, progress)


def _train(cfg: SFTConfig, out: Path, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
           progress: bool) -> dict:
    model.train()
    write_json(out / "sft_config.json", C.to_dict(cfg))
    source = PromptSource(cfg.task)
    budget = source.default_budget()
    eval_examples = source.eval_set(cfg.eval_n, seed=cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
    log = MetricsLog(out / "metrics.jsonl", Trackers(cfg.log_to, out, C.to_dict(cfg), out.name)
                     if cfg.log_to else None)
    bar = Bar(cfg.steps, "sft", enabled=progress)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"sft: {n_params / 1e6:.2f}M parameters, task {cfg.task}, {cfg.steps} steps x "
          f"{cfg.batch_size}", flush=True)
    acc = float("nan")
    t_start = time.perf_counter()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        batch = with_shortcuts(source.train_batch(step, cfg.batch_size, cfg.seed),
                               cfg.shortcut_fraction)
        batch = with_misconception(batch, cfg.misconception, cfg.misconception_fraction)
        ids, attn, loss_mask = sft_batch(tok, batch)
        loss = sft_loss(model, ids, attn, loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        dt = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": loss.item(), "grad_norm": gnorm.item(),
               "lr": sched.get_last_lr()[0], "step_time_s": dt,
               "tokens_per_s": int(attn.sum()) / dt}
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
            ev = evaluate(model, tok, eval_examples, source.is_correct, budget)
            acc = rec["eval_accuracy"] = ev["accuracy"]
        log.write(rec)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(model, tok, out / f"step_{step + 1}", dtype=DTYPES[cfg.save_dtype])
        bar.update(1, loss=rec["loss"], tok_s=int(rec["tokens_per_s"]), acc=acc)
    bar.close()
    save_checkpoint(model, tok, out, dtype=DTYPES[cfg.save_dtype])
    result = {"final_eval_accuracy": acc, "steps": cfg.steps,
              "train_time_s": time.perf_counter() - t_start}
    log.close(result)
    write_json(out / "sft_result.json", result)
    print(f"sft: done, eval accuracy {acc:.3f} on {cfg.eval_n} held-out problems; saved to {out}",
          flush=True)
    return result
