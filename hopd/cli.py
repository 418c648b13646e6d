"""The `hopd` command.

    hopd sft [CONFIG] --out DIR [key=value ...]     supervised training (teacher, warm student)
    hopd eval --model MODEL [--n N] [--out FILE]    full-budget evaluation
    hopd distill CONFIG --out DIR [key=value ...]   on-policy distillation with a horizon schedule
    hopd compare [CONFIG] --out DIR                 OPD vs POPD vs TOPD from the same student
    hopd report DIR...                              plots and report.md from run folders
    hopd demo [--quick] [--out DIR]                 the built-in comparison on the testbed

Bad input exits with code 2 and one line that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hopd.config import ConfigError


def _cmd_sft(args: argparse.Namespace) -> int:
    from hopd import config as C
    from hopd.sft import SFTConfig, train_sft

    _split_config(args)
    cfg = C.load(SFTConfig, args.config, args.overrides)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    train_sft(cfg, out, progress=not args.quiet)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from hopd.evaluate import evaluate
    from hopd.models import load_model, load_tokenizer
    from hopd.tasks import default_budget, load_examples

    if args.n < 1:
        raise ConfigError(f"--n {args.n}: must be >= 1")
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: must be >= 1")
    budget = args.budget or default_budget(args.task)
    examples = load_examples(args.task, args.n, "eval", seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    tok = load_tokenizer(args.model)
    res = evaluate(model, tok, examples, args.task, budget, batch_size=args.batch_size,
                   samples=args.samples, temperature=args.temperature, seed=args.seed,
                   keep_responses=args.show)
    res.update({"model": args.model, "task": args.task})
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from hopd.distill import distill, load_config

    _split_config(args)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    _check_out(out, args.overwrite, args.resume)
    distill(cfg, out, resume=args.resume, progress=not args.quiet)
    return 0


def _split_config(args: argparse.Namespace) -> None:
    """`hopd sft key=value` has no config file: the first positional is an override."""
    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None


def _check_out(out: Path, overwrite: bool, resume: bool = False) -> None:
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise ConfigError(f"output folder {out} exists and is not empty: pass --overwrite to "
                          "replace it, --resume to continue it, or choose another --out")
    if out.exists() and overwrite and not resume:
        import shutil

        shutil.rmtree(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hopd", description="On-policy distillation with rollout-"
                                "horizon control (full OPD, progressive POPD, truncated TOPD).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sft", help="supervised training on worked solutions")
    s.add_argument("config", nargs="?", help="YAML config (optional)")
    s.add_argument("--out", required=True, help="output checkpoint folder")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    s.set_defaults(func=_cmd_sft)

    d = sub.add_parser("distill", help="on-policy distillation with a horizon schedule")
    d.add_argument("config", nargs="?", help="YAML config, e.g. configs/popd.yaml")
    d.add_argument("--out", required=True, help="run folder")
    d.add_argument("--resume", action="store_true", help="continue the run in --out")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.add_argument("overrides", nargs="*",
                   help="key=value overrides by dotted path (horizon.kind=truncated, optim.lr=1e-4;"
                   " aliases: steps=max_steps, lr=optim.lr, H=horizon.tokens)")
    d.set_defaults(func=_cmd_distill)

    e = sub.add_parser("eval", help="evaluate a model at the full response budget")
    e.add_argument("--model", required=True, help="checkpoint path or testbed:teacher|student")
    e.add_argument("--task", default="chain:default", help="prompt source (default chain:default)")
    e.add_argument("--n", type=int, default=500, help="held-out problems (default 500)")
    e.add_argument("--samples", type=int, default=1, help="1: greedy; k > 1: k samples each")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    e.add_argument("--budget", type=int, default=0, help="response budget L (0: task default)")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    e.add_argument("--show", type=int, default=0, help="keep N example responses in the output")
    e.add_argument("--out", help="write the JSON result here")
    e.set_defaults(func=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # hopd shows its own progress
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"hopd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hopd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
