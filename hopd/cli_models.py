"""`hopd convert` and `hopd prune`: a GGUF file as a Hugging Face folder, and a student made
from a model by keeping some of its layers (the first half of prune-then-distill)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hopd.config import ConfigError


def quiet_hf() -> None:
    """hopd shows its own progress: no transformers download/loading bars (imported only by
    the commands that load models, after their quick checks)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cmd_convert(args: argparse.Namespace) -> int:
    quiet_hf()
    from hopd.gguf_models import PACKAGED, convert_gguf, packaged_file

    path = packaged_file(args.file) if args.file in PACKAGED else Path(args.file)
    if path.suffix.lower() != ".gguf":
        raise ConfigError(f"{args.file}: expected a .gguf file (or one of {', '.join(PACKAGED)})")
    out = convert_gguf(path, Path(args.out))
    print(f"hopd convert: wrote {out} (safetensors, tokenizer, chat template)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    quiet_hf()
    import torch

    from hopd.models import load_model, load_tokenizer, resolve_model_path
    from hopd.prune import check_count, check_keep, parse_keep, print_scores, prune, save_pruned
    from hopd.runstate import check_new_folder
    from hopd.tasks import PromptSource, encode_prompts

    keep = parse_keep(args.keep) if args.keep else None
    if not keep and args.layers is None:
        raise ConfigError("give --layers K (keep K layers chosen by --score) or --keep LIST")
    if keep and args.layers is not None and args.layers != len(keep):
        raise ConfigError(f"--layers {args.layers} and --keep with {len(keep)} layers disagree: "
                          "give one of them")
    out = Path(args.out)
    check_new_folder(out, "--out")
    n_layers = layer_count(args.model)  # checked before a GGUF file is converted
    if keep:
        check_keep(keep, n_layers)
    else:
        check_count(args.layers, n_layers)
        if args.n < 1:
            raise ConfigError(f"--n {args.n}: the score needs at least one prompt")
        if args.tokens < 1:
            raise ConfigError(f"--tokens {args.tokens}: sample at least one answer token per "
                              "prompt")
    path = resolve_model_path(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(str(path), trust_remote_code=args.trust_remote_code).eval()
    tok = load_tokenizer(str(path), trust_remote_code=args.trust_remote_code)
    prompts = None
    if not keep:
        source = PromptSource(args.data)
        rows = source.train_batch(0, args.n, seed=0)
        prompts = encode_prompts(tok, [e.prompt for e in rows])
    pruned, kept, scores = prune(model, tok, layers=args.layers, keep=keep, prompts=prompts,
                                 score=args.score, tokens=args.tokens)
    print_scores(scores, kept)
    chosen = bool(scores)
    save_pruned(pruned, tok, out, {"source": args.model, "kept_layers": kept,
                                   "source_layers": n_layers,
                                   "score": args.score if chosen else "keep",
                                   **scores,
                                   "score_prompts": args.n if chosen else 0,
                                   "score_data": args.data if chosen else ""})
    params = sum(p.numel() for p in pruned.parameters())
    print(f"hopd prune: kept layers {kept} of {n_layers}; {params / 1e6:.1f}M parameters; "
          f"wrote {out}")
    return 0


def layer_count(model: str) -> int:
    """A model's decoder layers, from a GGUF header or a folder's config.json."""
    from hopd.gguf_models import PACKAGED, gguf_info, is_gguf, packaged_file
    from hopd.models import resolve_model_path

    if is_gguf(model):
        info = gguf_info(packaged_file(model) if model in PACKAGED else Path(model))
        if info["layers"]:
            return int(info["layers"])  # type: ignore[call-overload]
    conf = json.loads((resolve_model_path(model) / "config.json").read_text())
    if not conf.get("num_hidden_layers"):
        raise ConfigError(f"{model}: its config names no num_hidden_layers; hopd prune handles "
                          "decoder-only models laid out as Llama, Qwen2 or Mistral")
    return int(conf["num_hidden_layers"])


def add_model_tools(sub: argparse._SubParsersAction) -> None:
    """hopd convert (GGUF -> Hugging Face folder) and hopd prune (a student from the teacher)."""
    c = sub.add_parser("convert", help="write a .gguf file as a Hugging Face folder")
    c.add_argument("file", help="a .gguf file, or a packaged name such as smollm2:135m-instruct")
    c.add_argument("--out", required=True, help="new folder for the converted model")
    c.set_defaults(func=cmd_convert)
    p = sub.add_parser("prune", help="a student from a model by keeping some of its layers")
    p.add_argument("model", help="a folder, a .gguf file or a packaged name")
    p.add_argument("--layers", type=int, default=None,
                   help="keep this many layers, chosen by --score")
    p.add_argument("--keep", default="", help="explicit layers to keep, e.g. 0,6,12,18,24,29")
    p.add_argument("--out", required=True, help="new folder for the pruned student")
    p.add_argument("--data", default="chat:prompts",
                   help="the prompt set the score is measured on (default chat:prompts)")
    p.add_argument("--n", type=int, default=16,
                   help="prompts the score is measured on (default 16)")
    p.add_argument("--score", choices=["bi", "kl"], default="bi",
                   help="bi: largest block influence (ShortGPT, one pass); kl: remove one layer "
                        "at a time, the one that raises the model's KL on its own answers least "
                        "(SLEB-style; a forward pass per candidate)")
    p.add_argument("--tokens", type=int, default=64,
                   help="--score kl: answer tokens sampled per prompt (default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped in the model folder")
    p.set_defaults(func=cmd_prune)
