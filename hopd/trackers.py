"""Experiment trackers: the records of metrics.jsonl, also sent to TensorBoard or W&B.

metrics.jsonl is always written and stays the source of truth; a tracker is a second reader of
the same records (`log_to: [tensorboard, wandb]` in a distill or SFT config). Names follow
TRL's where a metric has a TRL counterpart (`train/loss`, `train/learning_rate`,
`train/grad_norm`, `eval/accuracy`), on the optimizer-step axis; hopd's own metrics keep their
names under `train/` (horizon, time split, sampled tokens), `diag/` (the per-position reverse KL,
as a histogram over positions) and `probe/` (the teacher-recovery probe, one scalar per cut).
The run's resolved config is the run's config (W&B) or its hyperparameters (TensorBoard).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from hopd.config import ConfigError

# package to import, and the line that installs it
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"),
            "wandb": ("wandb", "pip install wandb")}

# hopd record key -> TRL's name for the same quantity
RENAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
           "eval_accuracy": "eval/accuracy", "val_accuracy": "eval/val_accuracy"}
SKIP = {"step", "prompts"}


def check_trackers(names: list[str]) -> None:
    """A clear error, before any expensive work, for an unknown or uninstalled tracker."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"log_to: unknown tracker {name!r}; choose from "
                              f"{', '.join(TRACKERS)} (metrics.jsonl is always written)")
        module, install = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"log_to={name} needs the {module} package, which is not "
                              f"installed: {install}")
        if name == "wandb" and not _wandb_can_log():
            raise ConfigError("log_to=wandb needs a W&B account on this machine: run `wandb "
                              "login`, set WANDB_API_KEY, or log offline with WANDB_MODE=offline "
                              "(then `wandb sync` the run later)")


def _wandb_can_log() -> bool:
    """An API key (environment or ~/.netrc), or a mode that needs none; read without importing
    wandb, so the check is instant and comes before any model loads."""
    import netrc
    import os

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or \
            os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        return netrc.netrc().authenticators(host.split("/")[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def scalars(record: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(scalars, histograms) of one metrics record, under the trackers' names."""
    out: dict[str, float] = {}
    hists: dict[str, list[float]] = {}
    for key, value in record.items():
        if key in SKIP:
            continue
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                prefix = "eval/" if key.startswith("eval_") else \
                    "diag/" if key.startswith("diag_") else "train/"
                name = RENAMES.get(key) or prefix + key.removeprefix("eval_").removeprefix(
                    "diag_")
                out[name] = float(value)
        elif key == "diag_rkl_by_pos":  # an empty bucket (null) keeps its place, at weight 0
            hists["diag/rkl_by_position"] = [v if v == v else 0.0 for v in value]
        elif key == "probe_teacher_acc_by_cut" and isinstance(value, dict):
            for cut, acc in value.items():
                out[f"probe/teacher_acc_from_{cut}"] = float(acc)
    return out, hists


class Trackers:
    """The trackers of one run; `log` takes the records metrics.jsonl gets."""

    def __init__(self, names: list[str], run: Path, config: dict[str, Any], name: str):
        check_trackers(names)
        self.tb = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            flat = _flatten(config)
            self.tb = SummaryWriter(log_dir=str(run / "tensorboard"))
            self.tb.add_text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in flat.items())
                             + "\n```", 0)
            self._hparams = {k: v for k, v in flat.items()
                             if isinstance(v, (int, float, str, bool))}
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(project="hopd", name=name, dir=str(run), config=config,
                                    reinit="create_new")

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        values, hists = scalars(record)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            for k, v in hists.items():
                if any(x > 0 for x in v):
                    self.tb.add_histogram(k, _positions(v), step, bins=len(v))
        if self.wandb is not None:
            import wandb

            payload: dict[str, Any] = dict(values)
            for k, v in hists.items():
                if any(x > 0 for x in v):
                    payload[k] = wandb.Histogram(np_histogram=_np_hist(v))
            self.wandb.log(payload, step=step)

    def close(self, final: dict[str, Any] | None = None) -> None:
        if self.tb is not None:
            if final is not None:  # the hyperparameters beside the run's final numbers
                metrics = {f"hparam/{k}": float(v) for k, v in final.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v)}
                self.tb.add_hparams(self._hparams, metrics, run_name=".")
            self.tb.close()
        if self.wandb is not None:
            if final is not None:
                self.wandb.summary.update({k: v for k, v in final.items()
                                           if isinstance(v, (int, float, str))})
            self.wandb.finish()


def _positions(values: list[float]) -> Any:
    """Position indices weighted by their KL, so the histogram's shape is the KL along the
    response (TensorBoard histograms take samples, not bar heights)."""
    import torch

    weights = torch.tensor(values, dtype=torch.float64).clamp(min=0)
    counts = (weights / weights.sum().clamp(min=1e-12) * 1000).round().long()
    return torch.repeat_interleave(torch.arange(len(values), dtype=torch.float64), counts)


def _np_hist(values: list[float]) -> tuple[list[float], list[float]]:
    return list(values), [float(i) for i in range(len(values) + 1)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out

