"""Progress display and the run folder's metrics log.

On a terminal: a rich progress bar with rate and ETA, and live fields (loss, H, accuracy). Off a
terminal (CI, a log file): one plain line every few seconds, so background logs stay readable.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from hopd.config import ConfigError


class Bar:
    """A progress bar over `total` steps; `update(n, **fields)` shows fields beside it."""

    def __init__(self, total: int, desc: str, every_s: float = 10.0, enabled: bool = True):
        self.total, self.desc, self.every_s, self.enabled = total, desc, every_s, enabled
        self.t0 = time.perf_counter()
        self.last_print = 0.0
        self.done = 0
        self.tty = sys.stderr.isatty() and not os.environ.get("CI")
        self.progress: Progress | None = None
        if enabled and self.tty:
            # time first and the live fields last (cut at the edge): at 80 columns the elapsed
            # time and the ETA stay visible; a long rate window keeps the ETA steady across the
            # pauses of an evaluation
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=12),
                MofNCompleteColumn(), TimeElapsedColumn(table_column=Column(min_width=7)),
                TextColumn("ETA"), TimeRemainingColumn(table_column=Column(min_width=7)),
                TextColumn("{task.fields[info]}",
                           table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                console=Console(stderr=True), transient=False, speed_estimate_period=3600,
                expand=True)
            self.task = self.progress.add_task(escape(desc), total=total, info="")
            self.progress.start()

    def update(self, advance: int = 1, **fields: Any) -> None:
        self.done += advance
        info = "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        if self.progress is not None:
            self.progress.update(self.task, advance=advance, info=escape(info))
            return
        now = time.perf_counter() - self.t0
        if self.enabled and (now - self.last_print >= self.every_s or self.done >= self.total):
            self.last_print = now
            rate = self.done / now if now > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            print(f"{self.desc} {self.done}/{self.total} [{now:.0f}s, {rate:.2f} it/s, "
                  f"ETA {eta:.0f}s] {info}", file=sys.stderr, flush=True)

    def set_total(self, total: int) -> None:
        """A new estimate of the steps in all (a token or time budget: known only as it goes)."""
        self.total = max(total, self.done)
        if self.progress is not None:
            self.progress.update(self.task, total=self.total)

    def note(self, label: str) -> None:
        """What is running between two updates (an evaluation, a save), shown on the bar (or
        printed once without a terminal), so a long pause never looks like a hang."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, info=escape(label + "..."))
        else:
            print(f"{self.desc} {self.done}/{self.total}: {label}...", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def clean_json(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None, so it dumps as standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def _nan_for_null(obj: Any) -> Any:
    """The inverse of `clean_json` for metrics: a null number reads back as NaN."""
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: _nan_for_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_for_null(v) for v in obj]
    return obj


class MetricsLog:
    """Appends one JSON object per line to `path`, flushed and fsynced after each write.

    Lines are standard JSON: a NaN or infinite value (an accuracy not measured yet, an empty
    position bucket) is written as null and `read_metrics` reads it back as NaN. `trackers`
    (hopd.trackers.Trackers) get every record too, after it is safely on disk."""

    def __init__(self, path: Path, trackers: Any = None):
        self.path = path
        self.trackers = trackers
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(clean_json(record), allow_nan=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self, final: dict[str, Any] | None = None) -> None:
        """`final`: the run's result, which trackers keep as its summary."""
        self.f.close()
        if self.trackers is not None:
            self.trackers.close(final)
            self.trackers = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Reads metrics.jsonl, skipping a partial last line left by a hard kill."""
    records = []
    if not path.exists():
        return records
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(_nan_for_null(json.loads(line)))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn final line from a kill: ignore it
                break
            raise ConfigError(f"{path}:{i + 1}: not valid JSON; the metrics file is "
                             "corrupt") from None
    return records
