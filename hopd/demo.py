"""`hopd demo`: OPD vs POPD vs TOPD on the built-in testbed, then the report.

Uses the bundled teacher and one of the two bundled students (`--regime spread`, the default:
mistakes spread along the solution; `--regime fork`: success decided by the first token), so
nothing needs training first. The full demo fits in about 10 minutes on 2 CPU cores; `--quick` in
about 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hopd.compare import compare
from hopd.config import ConfigError
from hopd.report import write_report

CONFIGS = Path(__file__).parent / "configs"

# Settings on top of configs/opd.yaml (the strategies then set the horizon).
DEMO = ["max_steps=60", "batch_size=32", "eval_every=10", "eval_n=200", "diag_every=10",
        "probe_every=20", "probe_n=16"]
QUICK = ["max_steps=16", "batch_size=16", "eval_every=8", "eval_n=100", "diag_every=8",
         "diag_n=8"]


# the testbed's two regimes (README, "The testbed"): where the student's mistakes are decided
REGIMES = {"spread": "testbed:student", "fork": "testbed:student-fork"}

# Each strategy at its own learning rate, the one docs/horizon_study.md chose on the val half for
# that regime (a short horizon needs a smaller rate than OPD's; at OPD's rate it breaks the
# student). The study also has the SFT baseline; the demo leaves it out to fit in 10 minutes.
RATES = {
    "spread": {"opd": 1e-4, "popd": 1e-4, "topd10": 3e-4, "topd25": 3e-4},
    "fork": {"opd": 1e-4, "popd": 1e-4, "topd10": 1e-4, "topd25": 1e-4},
}


def run_demo(out: Path, quick: bool = False, progress: bool = True, resume: bool = False,
             device: str = "cpu", overwrite: bool = False, regime: str = "spread"
             ) -> tuple[dict[str, Any], int]:
    """Runs the comparison on one regime's student and writes its report; returns the summary
    and the number of the signal that stopped it (0: finished)."""
    if regime not in REGIMES:
        raise ConfigError(f"--regime {regime}: choose {' or '.join(REGIMES)}")
    settings = (QUICK if quick else DEMO) + [f"device={device}", f"student={REGIMES[regime]}"]
    strategies = [f"{name}@{lr:g}" for name, lr in RATES[regime].items()]
    if progress and not (resume and out.exists()):
        announce(settings, quick, regime)
    runs, signum = compare(CONFIGS / "opd.yaml", out, strategies, [0], settings, [],
                           progress=progress, resume=resume, overwrite=overwrite)
    if signum:
        return {}, signum
    return write_report(runs, out), 0  # DIR/report.md and its PNGs, beside the run folders


# the share of a full-horizon step's cost each strategy pays on average over the demo's steps
# (POPD: H grows to L by half-way; a step has a fixed part that the horizon does not shrink)
HORIZON_SHARE = {"opd": 1.0, "popd": 0.6, "topd10": 0.1, "topd25": 0.25}
FIXED_SHARE = 0.2  # measured on the bundled pair: a TOPD-10% step costs ~25-30% of an OPD step


def calibrate(settings: list[str]) -> tuple[float, float]:
    """Seconds per full-horizon training step and per evaluation on this machine, from a
    two-step run of the demo's own settings in a temporary folder."""
    import json
    import tempfile

    from hopd.distill import distill, load_config

    with tempfile.TemporaryDirectory(prefix="hopd-demo-calibration-") as tmp:
        cfg = load_config(CONFIGS / "opd.yaml", [*settings, "max_steps=2", "eval_every=0",
                                                 "diag_every=0", "probe_every=0"])
        distill(cfg, Path(tmp) / "run", progress=False)
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").open()]
    steps = [x["step_time_s"] for x in lines if "loss" in x]
    evals = [x["eval_time_s"] for x in lines if "eval_time_s" in x]
    return min(steps), min(evals)


def estimate_s(settings: list[str], step_s: float, eval_s: float) -> float:
    """The demo's time: each strategy's steps at its horizon share, and its evaluations."""
    kv = dict(x.split("=", 1) for x in settings)
    steps, every = int(kv["max_steps"]), int(kv["eval_every"])
    evals = steps // every + 1
    train = sum(steps * step_s * (FIXED_SHARE + (1 - FIXED_SHARE) * share)
                for share in HORIZON_SHARE.values())
    return train + len(HORIZON_SHARE) * evals * eval_s * 1.3  # + diagnostics and probes


def announce(settings: list[str], quick: bool, regime: str) -> None:
    """Says what the demo will do and about how long it will take here, before it starts."""
    import contextlib
    import io
    import sys

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        step_s, eval_s = calibrate(settings)
    total = estimate_s(settings, step_s, eval_s)
    kv = dict(x.split("=", 1) for x in settings)
    print(f"hopd demo: OPD, POPD, TOPD-10% and TOPD-25% on the {regime} regime, "
          f"{kv['max_steps']} steps of {kv['batch_size']} prompts each, evaluated on "
          f"{kv['eval_n']} held-out prompts; about {total / 60:.0f} min on this machine (measured "
          f"here: {step_s:.2f} s per full-horizon step, {eval_s:.1f} s per evaluation)",
          flush=True)
    if not quick and total > 15 * 60:
        quick_total = estimate_s(QUICK, step_s * 0.5, eval_s * 0.5)
        print(f"hopd demo: that is long: `hopd demo --quick` takes about "
              f"{max(1, round(quick_total / 60))} min here", file=sys.stderr, flush=True)
