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
    runs, signum = compare(CONFIGS / "opd.yaml", out, strategies, [0], settings, [],
                           progress=progress, resume=resume, overwrite=overwrite)
    if signum:
        return {}, signum
    return write_report(runs, out), 0  # DIR/report.md and its PNGs, beside the run folders
