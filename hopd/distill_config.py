"""What a distillation run is: typed, documented, validated settings (`hopd distill` configs).

Every field has a default and a one-line comment; `validate()` checks types, ranges and
consistency once, up front, with a message that names the field, the value and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hopd import config as C
from hopd.schedules import HorizonConfig

LOSSES = ("sampled_rkl", "rkl", "fkl", "jsd", "sft")
NORMALIZERS = {
    "token_mean": "sum over tokens / tokens in the step (every token counts the same)",
    "seq_mean": "mean over each sequence's tokens, then over sequences (short answers weigh more)",
    "constant": "sum over tokens / (sequences x L), fixed for the run whatever H is",
    "sum": "plain sum over tokens (the tinker recipe; scale grows with batch and H)",
}
DTYPES = ("float32", "bfloat16", "float16")  # names; hopd.models maps them to torch dtypes
SAMPLER_DTYPES = ("", *DTYPES)  # sampling.dtype: "" samples with the student itself
# what an evaluation's headline number is; accuracy is higher-is-better, the others lower
EVAL_METRICS = ("accuracy", "rkl", "teacher_nll")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); the message says why."""


@dataclass
class LossConfig:
    kind: str = "sampled_rkl"  # sampled_rkl | rkl | fkl | jsd | sft (CE on the teacher's answers)
    normalizer: str = "token_mean"  # token_mean | seq_mean | constant | sum (see NORMALIZERS)
    sft_greedy: bool = False  # teacher's answers (sft, kd) greedy (false: sampling.temperature)
    beta: float = 0.5  # jsd weight: 0 = forward KL, 1 = reverse KL
    top_k: int = 0  # full-vocabulary losses on the teacher's top-k + tail (0: all tokens)
    gamma: float = 0.0  # sampled_rkl discount over future tokens (0: per-token advantage)
    clip_eps: float = 0.0  # sampled_rkl PPO-style ratio clipping (0: off)
    rollouts: str = "student"  # whose answers: student (OPD) | teacher (supervised KD; sft's)
    # sequence-level unlikelihood (Welleck et al., 2020): each step the student also answers
    # the step's prompts greedily, and -log(1 - s(y)) on the tokens of every n-gram repeated
    # within an answer is added with this weight (0: off), to unlearn the loops greedy decoding
    # falls into, which a per-token teacher signal can reward (the teacher endorses a loop once
    # it has started)
    unlikelihood: float = 0.0  # weight of -log(1 - s(y)) on greedy answers' repeats (0: off)
    unlikelihood_n: int = 4  # n of the repeated n-grams it penalises
    # the greedy answers' length: at H they hold few of the loops that a full-budget answer
    # falls into (on the real pair 12% of the repeated 4-grams' tokens lay in the first 32 of
    # 128); longer answers cost a decode and a pass as long, which `_every` spreads out
    unlikelihood_horizon: int = 0  # greedy answers' tokens for the term (0: the step's H)
    unlikelihood_every: int = 1  # add the term every N steps (its greedy answers only then)

    @property
    def teacher_rollouts(self) -> bool:
        """Whether the teacher, not the student, writes the step's answers."""
        return self.kind == "sft" or self.rollouts == "teacher"

    def validate(self) -> None:
        C.check(self.kind in LOSSES,
                f"loss.kind={self.kind!r}: choose one of {', '.join(LOSSES)}")
        C.check(self.rollouts in ("student", "teacher"),
                f"loss.rollouts={self.rollouts!r}: choose student (on-policy) or teacher")
        C.check(not (self.kind == "sampled_rkl" and self.rollouts == "teacher"),
                "loss.kind=sampled_rkl estimates the reverse KL from the student's own samples "
                "and cannot use the teacher's: with loss.rollouts=teacher choose rkl, fkl or jsd")
        C.check(self.normalizer in NORMALIZERS,
                f"loss.normalizer={self.normalizer!r}: choose one of "
                f"{', '.join(NORMALIZERS)}")
        C.check(0 <= self.beta <= 1, f"loss.beta={self.beta}: must be in [0, 1]")
        C.check(self.top_k >= 0, f"loss.top_k={self.top_k}: must be >= 0")
        C.check(0 <= self.gamma <= 1, f"loss.gamma={self.gamma}: must be in [0, 1]")
        C.check(self.clip_eps >= 0, f"loss.clip_eps={self.clip_eps}: must be >= 0")
        C.check(math.isfinite(self.unlikelihood) and self.unlikelihood >= 0,
                f"loss.unlikelihood={self.unlikelihood}: must be >= 0 (0: off; e.g. 1.0)")
        C.check(self.unlikelihood_n >= 1,
                f"loss.unlikelihood_n={self.unlikelihood_n}: must be >= 1 (e.g. 4)")
        C.check(self.unlikelihood_horizon >= 0,
                f"loss.unlikelihood_horizon={self.unlikelihood_horizon}: must be >= 0 (0: the "
                "step's H; e.g. the budget)")
        C.check(self.unlikelihood_every >= 1,
                f"loss.unlikelihood_every={self.unlikelihood_every}: must be >= 1 (1: every step)")


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # student sampling temperature for rollouts
    top_p: float = 1.0  # nucleus sampling (1: off)
    top_k: int = 0  # top-k sampling (0: off)
    cuda_graph: bool = True  # on a GPU, replay the decode step as a CUDA graph (fast path)
    engine: str = "hf"  # hf (hopd's own decoder) | vllm (an in-process vLLM engine)
    vllm_gpu_memory: float = 0.3  # vllm on a GPU: fraction of its memory for weights + KV cache
    vllm_cpu_kv_gib: float = 1.0  # vllm on a CPU: GiB of KV cache
    # bfloat16 decodes about 2x faster on a CPU with AVX512-BF16 or AMX; the loss still uses
    # the learner's own forward, and the logged rho_max says how far the copy's rounding is
    dtype: str = ""  # hf engine: sample with a copy of the student in this dtype ('': itself)
    # the teacher's rollouts (loss.kind=sft, loss.rollouts=teacher) do not depend on the step:
    # decode the next N steps' rows as one batch (SmolLM2-135M on a 2-core CPU: 3x at N = 8)
    ahead: int = 1  # steps whose teacher rollouts are sampled together (1: each step its own)

    def validate(self) -> None:
        C.check(self.temperature > 0,
                f"sampling.temperature={self.temperature}: must be > 0")
        C.check(0 < self.top_p <= 1,
                f"sampling.top_p={self.top_p}: must be in (0, 1]")
        C.check(math.isfinite(self.temperature),
                f"sampling.temperature={self.temperature}: must be finite (e.g. 1.0)")
        C.check(self.top_k >= 0,
                f"sampling.top_k={self.top_k}: must be >= 0 (0: off)")
        C.check(self.engine in ("hf", "vllm"),
                f"sampling.engine={self.engine!r}: choose hf or vllm")
        C.check(0 < self.vllm_gpu_memory <= 1 and self.vllm_cpu_kv_gib > 0,
                "sampling.vllm_gpu_memory must be in (0, 1] and sampling.vllm_cpu_kv_gib > 0")
        C.check(self.dtype in SAMPLER_DTYPES,
                f"sampling.dtype={self.dtype!r}: choose one of "
                f"{', '.join(repr(d) for d in SAMPLER_DTYPES)} ('': the student's own)")
        C.check(not (self.dtype and self.engine != "hf"),
                f"sampling.dtype={self.dtype!r} is for engine=hf; vLLM samples in the run's dtype")
        C.check(self.ahead >= 1, f"sampling.ahead={self.ahead}: must be >= 1 (1: off)")


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate (AdamW)
    warmup_steps: int = 5  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm

    def validate(self, prefix: str = "optim.") -> None:
        """Also `hopd sft`'s check of the same settings (prefix ""): one validator for both."""
        C.check(math.isfinite(self.lr) and self.lr > 0,
                f"{prefix}lr={self.lr}: must be a finite number > 0 (e.g. 1e-3)")
        C.check(self.lr <= 100, f"{prefix}lr={self.lr} is far too large: an AdamW "
                "step moves each weight by about lr; use e.g. 1e-3")
        C.check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"{prefix}weight_decay={self.weight_decay}: must be >= 0")
        C.check(self.warmup_steps >= 0,
                f"{prefix}warmup_steps={self.warmup_steps}: must be >= 0")
        C.check(math.isfinite(self.grad_clip) and self.grad_clip > 0,
                f"{prefix}grad_clip={self.grad_clip}: must be a finite number > 0")
        C.check(0 <= self.min_lr_ratio <= 1,
                f"{prefix}min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")


@dataclass
class LoraSection:
    rank: int = 0  # LoRA rank (0: train every weight of the student)
    alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / rank)
    dropout: float = 0.0  # dropout on the LoRA input
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # module names
    merge: bool = True  # RUN/model holds the merged model (false: the adapter only)


@dataclass
class DistillConfig:
    student: str = "testbed:student"  # student checkpoint: path or testbed:student
    teacher: str = "testbed:teacher"  # teacher checkpoint: path or testbed:teacher
    data: str = "chain:default"  # prompts: chain:PRESET, a JSONL file or a saved dataset
    eval_data: str = ""  # held-out prompts ("": a hash-based 10% of `data`)
    data_prompt_field: str = ""  # JSONL prompt field ("": prompt, question, messages, problem)
    data_answer_field: str = ""  # JSONL answer field ("": answer, solution, target)
    system_prompt: str = ""  # system turn added to the student's prompts ("": none)
    teacher_system_prompt: str = ""  # the teacher's own system turn ("": same as the student's)
    budget: int = 0  # full response budget L in tokens (0: the task's default)
    max_steps: int = 60  # optimizer steps (with a time or token budget: the schedules' length)
    max_time_s: float = 0.0  # stop after this much training time (0: no limit)
    max_tokens: int = 0  # stop after this many sampled tokens (0: no limit)
    batch_size: int = 32  # prompts (rollouts) per optimizer step
    # several micro-batches hold rows of like length, each run to its own longest response
    grad_accum: int = 1  # micro-batches per optimizer step (same gradient; less memory, padding)
    horizon: HorizonConfig = field(default_factory=HorizonConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    eval_every: int = 10  # full-budget greedy evaluation every N steps (0: start and end only)
    eval_n: int = 200  # held-out prompts per evaluation
    eval_split: str = "test"  # held-out half evaluated during the run: test | val | eval (both)
    val_n: int = 0  # at the end, also evaluate this many `val` prompts (to choose settings on)
    eval_metric: str = ""  # what target/best/verdicts use: accuracy | rkl | teacher_nll ("":
    # accuracy when the data has reference answers, else rkl)
    eval_kl_n: int = 64  # held-out prompts per evaluation scored by the teacher (rkl, NLL; 0 off)
    collapse_stop: bool = False  # stop (state saved) when the collapse guard fires
    eval_cache: bool = True  # read back an evaluation of the same weights and settings
    # (hopd.evalcache: the warm start's last evaluation, the teacher's answers for the guard)
    diag_every: int = 10  # per-position diagnostics every N steps (0: off)
    diag_n: int = 16  # prompts sampled at the full budget for diagnostics
    diag_buckets: int = 16  # position buckets over [0, L)
    token_budget: bool = False  # scale prompts per step with L / H (same tokens every step)
    max_batch: int = 256  # token_budget: at most this many prompts per step
    probe_every: int = 0  # teacher-recovery probe every N steps (0: off)
    probe_n: int = 16  # held-out prompts per probe
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    seed: int = 0  # data order, sampling and evaluation seed
    device: str = "auto"  # student device: auto (a GPU when there is one), cpu, cuda, cuda:N
    teacher_device: str = ""  # teacher device ("": same as the student)
    dtype: str = "float32"  # student weights dtype
    teacher_dtype: str = ""  # teacher weights dtype ("": same as the student)
    teacher_url: str = ""  # a teacher server (hopd serve-teacher, vLLM) instead of `teacher`
    teacher_tokenizer: str = ""  # with teacher_url: a local folder with the teacher's tokenizer
    # and chat template, so the server sees its own prompt format ("": the student's)
    teacher_timeout_s: float = 60.0  # per request to the teacher server
    teacher_retries: int = 3  # retries of a failed request (connection errors, timeouts)
    threads: int = 0  # torch CPU threads (0: torch's default)
    trust_remote_code: bool = False  # run Python code shipped in a model folder (auto_map)
    log_to: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb (jsonl always)
    drop_long_prompts: bool = False  # skip prompts that do not fit the context with L (counted)
    parallel: str = "ddp"  # several processes: ddp (a copy per rank) or fsdp (sharded student)

    def validate(self) -> None:
        C.check(self.max_steps >= 1, f"max_steps={self.max_steps}: must be >= 1")
        C.check(self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        C.check(self.grad_accum >= 1, f"grad_accum={self.grad_accum}: must be >= 1")
        C.check(self.grad_accum <= self.batch_size, f"grad_accum={self.grad_accum} exceeds "
                f"batch_size={self.batch_size}: each micro-batch needs at least one prompt")
        C.check(self.max_time_s >= 0 and self.max_tokens >= 0,
                "max_time_s and max_tokens must be >= 0 (0: no limit)")
        C.check(self.budget >= 0, f"budget={self.budget}: must be >= 0 (0: task default)")
        C.check(self.parallel in ("ddp", "fsdp"),
                f"parallel={self.parallel!r}: expected 'ddp' or 'fsdp'")
        C.check(not (self.parallel == "fsdp" and self.lora.rank),
                "parallel=fsdp with a LoRA student is not supported: LoRA trains few weights, "
                "use parallel=ddp (the default)")
        C.check(not (self.parallel == "fsdp" and self.sampling.engine == "vllm"),
                "sampling.engine=vllm with parallel=fsdp is not supported (the engine needs the "
                "whole student on each rank): use parallel=ddp or sampling.engine=hf")
        C.check(not (self.parallel == "fsdp" and self.sampling.dtype),
                "sampling.dtype with parallel=fsdp is not supported (the sampler's copy needs the "
                "whole student on each rank): use parallel=ddp or leave sampling.dtype unset")
        C.check(self.sampling.ahead <= 1 or self.loss.teacher_rollouts,
                f"sampling.ahead={self.sampling.ahead} samples the coming steps' rollouts "
                "together, which only the teacher's allow (loss.kind=sft or "
                "loss.rollouts=teacher): the student's change with every step. Set "
                "sampling.ahead=1")
        C.check(self.sampling.ahead <= 1 or not (self.max_time_s or self.max_tokens
                                                 or self.horizon.kind == "adaptive"),
                f"sampling.ahead={self.sampling.ahead} needs the coming steps' horizons known "
                "in advance: not with max_time_s, max_tokens or horizon.kind=adaptive. Set "
                "sampling.ahead=1")
        how = "loss.kind=sft" if self.loss.kind == "sft" else "loss.rollouts=teacher"
        C.check(not (self.loss.teacher_rollouts and self.teacher_url),
                f"{how} samples answers from the teacher model itself: give teacher=PATH, "
                "not teacher_url")
        C.check(not (self.loss.teacher_rollouts and self.teacher_system_prompt),
                f"{how} trains the student on the teacher's answers to the student's own "
                "prompts: leave teacher_system_prompt empty")
        C.check(self.threads >= 0, f"threads={self.threads}: must be >= 0 (0: torch's default)")
        C.check(self.teacher_retries >= 0,
                f"teacher_retries={self.teacher_retries}: must be >= 0 (0: no retry)")
        C.check(math.isfinite(self.teacher_timeout_s) and self.teacher_timeout_s > 0,
                f"teacher_timeout_s={self.teacher_timeout_s}: must be a number of seconds > 0")
        for name in ("eval_every", "diag_every", "save_every"):
            C.check(getattr(self, name) >= 0, f"{name}={getattr(self, name)}: must be >= 0")
        C.check(self.eval_n >= 1, f"eval_n={self.eval_n}: must be >= 1")
        C.check(self.eval_split in ("test", "val", "eval"),
                f"eval_split={self.eval_split!r}: choose test, val or eval (both halves)")
        C.check(self.val_n >= 0, f"val_n={self.val_n}: must be >= 0 (0: no validation eval)")
        C.check(self.eval_metric in ("",) + EVAL_METRICS,
                f"eval_metric={self.eval_metric!r}: choose one of {', '.join(EVAL_METRICS)}")
        C.check(self.eval_kl_n >= 0, f"eval_kl_n={self.eval_kl_n}: must be >= 0 (0: off)")
        C.check(self.eval_metric in ("", "accuracy") or self.eval_kl_n > 0,
                f"eval_metric={self.eval_metric} is measured on eval_kl_n prompts: set "
                "eval_kl_n > 0 (e.g. 64)")
        C.check(self.diag_n >= 1 and self.diag_buckets >= 1, "diag_n and diag_buckets must be >= 1")
        C.check(self.lora.rank >= 0, f"lora.rank={self.lora.rank}: must be >= 0 (0: off)")
        C.check(self.lora.alpha > 0, f"lora.alpha={self.lora.alpha}: must be > 0")
        C.check(0 <= self.lora.dropout < 1,
                f"lora.dropout={self.lora.dropout}: must be in [0, 1) (e.g. 0.05)")
        C.check(self.max_batch >= self.batch_size,
                f"max_batch={self.max_batch} is below batch_size={self.batch_size}")
        C.check(self.probe_every >= 0 and self.probe_n >= 1,
                "probe_every must be >= 0 and probe_n >= 1")
        C.check(self.horizon.kind != "adaptive" or self.diag_every > 0,
                "horizon.kind=adaptive decides from the per-position diagnostics: set "
                "diag_every > 0 (e.g. 5)")
        C.check(self.keep_last >= 1, f"keep_last={self.keep_last}: must be >= 1")
        C.check(self.max_bad_steps >= 1, f"max_bad_steps={self.max_bad_steps}: must be >= 1")
        for name in ("dtype", "teacher_dtype"):
            v = getattr(self, name)
            C.check(v in DTYPES or (name == "teacher_dtype" and v == ""),
                    f"{name}={v!r}: choose one of {', '.join(sorted(DTYPES))}")
        for name in ("device", "teacher_device"):
            v = getattr(self, name)
            if v.startswith("cuda"):
                import torch  # only here: a config is checked before torch is imported

                C.check(torch.cuda.is_available(), f"{name}={v!r}: CUDA is not available here; "
                        "use device=cpu")
            else:
                C.check(v in ("cpu", "mps", "auto") or (name == "teacher_device" and v == ""),
                        f"{name}={v!r}: use auto, cpu, cuda or cuda:N")
        for section in (self.loss, self.sampling, self.optim):
            section.validate()
        C.check(not self.budget or self.loss.unlikelihood_horizon <= self.budget,
                f"loss.unlikelihood_horizon={self.loss.unlikelihood_horizon}: above budget="
                f"{self.budget}; at most the budget (0: the step's H)")
        self.horizon.validate(self.budget or None)


def resolve_device(device: str) -> str:
    """`auto`: the GPU when there is one, else the CPU (the rule of every hopd command)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_paths(cfg: DistillConfig) -> None:
    """The named files and folders exist: checked before torch or transformers is imported, so
    a typo in a path is reported at once (everything else about them is checked later)."""
    from hopd.tasks import chat_prompts, is_chain

    for key in ("data", "eval_data"):
        value = getattr(cfg, key)
        if value and not is_chain(value) and value != chat_prompts.NAME and \
                not Path(value).exists():
            raise C.ConfigError(f"{key}={value!r}: no such file; give chain:default|hard|tiny, "
                                f"{chat_prompts.NAME}, a JSONL file or a saved dataset folder")
    for key in ("student", "teacher", "teacher_tokenizer"):
        value = getattr(cfg, key)
        if value and not (key == "teacher" and cfg.teacher_url):
            check_model_name(value, key)


# the teacher, and one warm student per regime of the testbed: `student` makes errors spread along
# its worked solutions; `student-fork` solves with the worked style or guesses with a shortcut,
# choosing at its first response token (success decided early); their folders in hopd/checkpoints
BUNDLED = {"testbed:teacher": "teacher", "testbed:student": "student",
           "testbed:student-fork": "student-fork"}


def check_model_name(name: str, key: str = "model") -> None:
    """`name` is a bundled name, an installed packaged GGUF name, a .gguf file or a folder:
    checked before torch or transformers is imported (what the folder holds is checked when it
    loads)."""
    from hopd.gguf_models import PACKAGED, is_gguf, packaged_file

    if name in PACKAGED:
        packaged_file(name)
    elif is_gguf(name):
        if not Path(name).is_file():
            raise C.ConfigError(f"{key}={name!r}: no such .gguf file")
    elif name.startswith("testbed:"):
        if name not in BUNDLED:
            raise C.ConfigError(f"unknown bundled model {name!r}: choose one of {sorted(BUNDLED)}")
    elif not Path(name).is_dir():
        raise missing_model(name, key)


def missing_model(name: str, key: str = "model") -> C.ConfigError:
    """The error for a model name that is no folder here: a Hub id gets the way to get it."""
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and \
            not Path(parts[0]).exists():
        return C.ConfigError(
            f"{key}={name!r} looks like a Hugging Face Hub id, and hopd never downloads: "
            f"download it where you have access (huggingface-cli download {name} --local-dir "
            "DIR) and pass the folder DIR, or pass a .gguf file")
    return C.ConfigError(
        f"{key}={name!r} is none of a bundled name (testbed:teacher|student|student-fork), a "
        "packaged GGUF name (smollm2:135m-instruct), a .gguf file or a folder with a Hugging "
        "Face checkpoint")


ALIASES = {"steps": "max_steps", "lr": "optim.lr", "H": "horizon.tokens",
           "teacher.url": "teacher_url", "teacher.path": "teacher", "student.path": "student"}


def load_config(path: str | Path | None, overrides: list[str]) -> DistillConfig:
    """YAML + overrides -> validated config. `H=N` means a truncated horizon of N tokens: it sets
    horizon.kind=truncated too, unless the overrides name another kind."""
    if any(o.split("=", 1)[0].strip() == "H" for o in overrides) and not any(
            o.split("=", 1)[0].strip() == "horizon.kind" for o in overrides):
        overrides = [*overrides, "horizon.kind=truncated"]
    return C.load(DistillConfig, path, overrides, aliases=ALIASES)
