"""The run folder's durable state: atomic checkpoints, resume, metrics repair, clean stops.

A checkpoint is RUN/checkpoints/step_N: the student in HF format (safetensors), its tokenizer,
and trainer_state.pt (optimizer, step, RNG, running totals) loaded with weights_only=True. It is
written to a temporary folder and renamed, so a kill never leaves a half-written step_N.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hopd.progress import read_metrics


def save_checkpoint(run: Path, step: int, student: PreTrainedModel, tokenizer: Any,
                    opt_state: dict[str, Any], extra: dict[str, Any],
                    keep_last: int, state_dict: dict[str, Any] | None = None) -> Path:
    """Writes RUN/checkpoints/step_N atomically (a temporary folder, then a rename).

    `opt_state`: the optimizer's state dict; `state_dict`: the student's weights when not its own
    (`Dist.optimizer_state` and `Dist.model_state`: gathered in full under FSDP)."""
    ckpts = run / "checkpoints"
    ckpts.mkdir(exist_ok=True)
    final = ckpts / f"step_{step:07d}"
    tmp = ckpts / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": opt_state, "step": step,
                "torch_rng": torch.get_rng_state(), **extra}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpts.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted((run / "checkpoints").glob("step_*"))
    return found[-1] if found else None


class StopFlag:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, saves, and exits cleanly."""

    def __init__(self) -> None:
        self.stop = False
        self.old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.stop = True
        print(f"\nhopd: got signal {signum}; finishing this step, then saving", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer, step and RNG state, loaded with weights_only=True (no code runs)."""
    try:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        for key in ("optimizer", "step", "torch_rng", "totals"):
            state[key]
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"checkpoint {ckpt} is corrupt or incomplete ({type(e).__name__}); "
                         f"delete that folder to resume from an earlier checkpoint, or start "
                         f"again with --overwrite") from None
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Drops metrics lines past `step` (written after the checkpoint we resume from)."""
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)
