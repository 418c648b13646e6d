"""A student from the teacher by depth pruning: keep K of its decoder layers, drop the rest.

This is the first half of prune-then-distill (Minitron): the pruned copy keeps the teacher's
embeddings, head, tokenizer and chat template, so the pair shares a vocabulary by construction,
and distillation then teaches the remaining layers to do the work of the dropped ones.

Which layers to keep, by default: those with the largest block influence (ShortGPT, Men et al.
2024), BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}), where x_i is the hidden state entering
layer i and x_{i+1} the one leaving it, measured on a few prompts. A layer that barely turns the
residual stream (BI near 0) is the cheapest to lose.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from hopd.config import ConfigError


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (`model.model.layers` in Llama, Qwen2, Mistral...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no model.layers stack: hopd prune handles "
                          "decoder-only models laid out as Llama, Qwen2 or Mistral")
    return layers


def check_keep(keep: list[int], n_layers: int) -> list[int]:
    """A valid, sorted list of layer indices to keep, or one clear error."""
    if not keep:
        raise ConfigError("--keep is empty: give layer indices, e.g. --keep 0,6,12,18,24,29")
    if len(set(keep)) != len(keep):
        dup = sorted({i for i in keep if keep.count(i) > 1})
        raise ConfigError(f"--keep lists layer(s) {dup} more than once: give each layer once")
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"--keep: layer(s) {bad} out of range; the model has {n_layers} layers "
                          f"(0 to {n_layers - 1})")
    return sorted(keep)


def check_count(k: int, n_layers: int) -> int:
    if not 1 <= k <= n_layers:
        raise ConfigError(f"--layers {k}: must be between 1 and the model's {n_layers} layers")
    return k


@torch.no_grad()
def block_influence(model: PreTrainedModel, prompts: list[list[int]]) -> list[float]:
    """BI_i = 1 - mean cos(x_in, x_out) of each decoder layer over the prompts' tokens (each
    prompt run alone, so no padding enters the mean)."""
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = 0
    cos = [torch.zeros(0)] * len(layers)

    def hook(i: int):
        def fn(module: torch.nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos[i] = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for ids in prompts:
            model(input_ids=torch.tensor([ids], device=device))
            for i in range(len(layers)):
                sums[i] += float(cos[i].sum())
            count += len(ids)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [1.0 - s / count for s in sums]


def choose_layers(influence: list[float], k: int) -> list[int]:
    """The k layers with the largest block influence, in their original order."""
    order = sorted(range(len(influence)), key=lambda i: -influence[i])
    return sorted(order[:k])


def prune_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A new model with only the decoder layers `keep` (sorted), their weights copied bit for
    bit; embeddings, final norm and head are the original's."""
    n = len(decoder_layers(model))
    keep = check_keep(keep, n)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    for key in ("layer_types", "sliding_window_pattern_list"):  # per-layer lists follow the cut
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == n:
            setattr(config, key, [value[i] for i in keep])
    dtype = next(model.parameters()).dtype
    pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    prefix = "model.layers."
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            idx, rest = name[len(prefix):].split(".", 1)
            if int(idx) not in keep:
                continue
            name = f"{prefix}{keep.index(int(idx))}.{rest}"
        state[name] = tensor
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned


def prune(model: PreTrainedModel, tok: PreTrainedTokenizerBase, *, layers: int = 0,
          keep: list[int] | None = None, prompts: list[list[int]] | None = None
          ) -> tuple[PreTrainedModel, list[int], list[float] | None]:
    """Keeps `keep`, or the `layers` layers of largest block influence on `prompts`; returns the
    pruned model, the layers kept and the influence scores (None for an explicit list)."""
    n = len(decoder_layers(model))
    if keep:
        return prune_layers(model, check_keep(keep, n)), sorted(keep), None
    check_count(layers, n)
    if not prompts:
        raise ValueError("block influence needs prompts")
    influence = block_influence(model, prompts)
    chosen = choose_layers(influence, layers)
    return prune_layers(model, chosen), chosen, influence


def print_influence(influence: list[float], kept: list[int]) -> None:
    print("layer  block influence  kept", file=sys.stderr)
    for i, bi in enumerate(influence):
        print(f"{i:5d}  {bi:15.4f}  {'yes' if i in kept else ''}", file=sys.stderr)


def parse_keep(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--keep {text!r}: give layer indices separated by commas, "
                          "e.g. 0,6,12,18,24,29") from None


def save_pruned(model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: Path,
                note: dict[str, object]) -> None:
    """The pruned student as a Hugging Face folder with the teacher's tokenizer and template."""
    import json

    from hopd.models import save_checkpoint

    save_checkpoint(model, tok, out)
    (out / "hopd_prune.json").write_text(json.dumps(note, indent=2) + "\n")
