"""Evaluations kept by what they depend on, so that the same weights are not evaluated twice.

A recipe evaluates the warm start's final weights at the end of one run and again at step 0 of
the next, and every run with a local teacher decodes the teacher's own answers to the same
prompts for the collapse guard: minutes each on a CPU, for numbers that are already known. An
evaluation's result is stored under a key made of everything it depends on (a digest of each
model's weights and config, the encoded prompts and answers, every setting, the versions of
torch and transformers, and a digest of the source of the code that evaluates), the way a
`datasets` fingerprint names a transform's result. A changed weight, setting or line of code
gives a new key; nothing is ever looked up by name or path.

The cache lives beside the converted GGUF models, in $HOPD_CACHE_DIR (default ~/.cache/hopd),
under evals/; HOPD_EVAL_CACHE=off, the distill setting eval_cache=false or `hopd eval
--no-cache` turn it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import transformers

from hopd import gguf_models

# the modules whose code decides an evaluation's numbers (tasks/: the answer checkers)
_SOURCES = ("evaluate.py", "quality.py", "rollout.py", "fastgen.py", "teacher.py", "models.py",
            "losses.py", "tasks/*.py")


def cache_dir() -> Path | None:
    """Where evaluations are kept; None when HOPD_EVAL_CACHE is off (or 0, false, no)."""
    if os.environ.get("HOPD_EVAL_CACHE", "").strip().lower() in ("0", "off", "false", "no"):
        return None
    return gguf_models.cache_dir() / "evals"


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of the evaluating code's source and the libraries' versions."""
    h = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    here = Path(__file__).parent
    for pattern in _SOURCES:
        for path in sorted(here.glob(pattern)):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of a model's class, config and every weight and buffer (names, dtypes, shapes,
    bytes). A frozen model's (the teacher's) is kept on it until a tensor is replaced or
    written in place (torch counts a tensor's in-place writes in its version; fused optimizer
    kernels do not, so a model that trains is digested afresh every time)."""
    state = model.state_dict(keep_vars=True)
    stamp = None
    if not any(p.requires_grad for p in model.parameters()):
        try:
            stamp = tuple((t.data_ptr(), t._version) for t in state.values())
        except RuntimeError:  # inference-mode tensors keep no version
            pass
    kept = getattr(model, "_hopd_digest", None)
    if kept is not None and stamp is not None and kept[0] == stamp:
        return kept[1]
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        c = config.to_dict()
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype",
                  "architectures"):
            c.pop(k, None)
        h.update(json.dumps(c, sort_keys=True, default=str).encode())
    for name, t in state.items():
        t = t.detach()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().data)
    digest = h.hexdigest()
    if stamp is not None:
        model._hopd_digest = (stamp, digest)
    return digest


def key(parts: dict[str, Any]) -> str:
    """The cache key of an evaluation described by `parts` (JSON-serialisable)."""
    blob = json.dumps({"code": code_digest(), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def lookup(k: str) -> dict[str, Any] | None:
    """The stored result of key `k`, or None (absent, unreadable, or the cache is off)."""
    where = cache_dir()
    if where is None:
        return None
    try:
        return json.loads((where / f"{k}.json").read_text())
    except (OSError, ValueError):
        return None


def store(k: str, result: dict[str, Any]) -> None:
    """Keeps `result` under key `k` (atomically; a cache that cannot be written is skipped)."""
    where = cache_dir()
    if where is None:
        return
    tmp = None
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=where, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            json.dump(result, f)
        os.replace(tmp, where / f"{k}.json")
    except (OSError, TypeError, ValueError):  # (a result JSON cannot hold is not kept)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
