"""The run folder's durable state: ownership, lock, atomic checkpoints, resume, clean stops.

A folder hopd creates holds a marker file (`.hopd-run`, JSON: what made it and when). hopd
deletes (`--overwrite`) or continues (`--resume`) only such a folder, never the working directory
or one of its parents, and only after every input has been validated. A run holds an exclusive
lock on its folder (`.hopd-lock`, with the holder's process id) for its whole life.

A checkpoint is RUN/checkpoints/step_N: the student in HF format (safetensors), its tokenizer,
and trainer_state.pt (optimizer, step, RNG, running totals) loaded with weights_only=True. It is
written to a temporary folder and renamed, so a kill never leaves a half-written step_N, and the
previous checkpoint is removed only once the new one is complete. A full disk gives one clear
line and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hopd.config import ConfigError, DiskFull, is_disk_full  # noqa: F401
from hopd.progress import clean_json, read_metrics

MARKER = ".hopd-run"
LOCK = ".hopd-lock"
# layouts written by hopd before the marker existed: still ours to resume or replace
_LEGACY = {"distill": [("config.yaml", "metrics.jsonl")], "sft": [("sft_config.json",)],
           "compare": [("summary.json",), ("report.md",)]}


def write_json(path: Path, obj: Any) -> None:
    """Standard JSON (non-finite numbers become null), written to a temporary file and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(clean_json(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def make_readable(folder: Path) -> None:
    """Gives the files a save wrote the usual mode (0644 under umask 022): safetensors writes
    model.safetensors as 0600 through a temporary file, which surprises whoever shares the run."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


def folder_kind(out: Path) -> str | None:
    """What hopd command made `out` ("distill", "sft", "compare"), or None if not hopd."""
    marker = out / MARKER
    if _regular(marker):
        try:
            return str(json.loads(marker.read_text())["kind"])
        except (ValueError, KeyError, TypeError):
            return None
    for kind, layouts in _LEGACY.items():
        if any(all((out / name).exists() for name in names) for names in layouts):
            return kind
    if any(out.glob("*/seed*/strategy.json")):
        return "compare"
    return None


def check_out(out: Path, *, kind: str, overwrite: bool = False, resume: bool = False) -> None:
    """Refuses an --out that hopd must not write into. Reads only: nothing is created or deleted.

    Allowed: a new or empty folder; a folder made by hopd with --overwrite (replaced) or with
    --resume (continued, same kind of run). Refused: a file, someone else's folder, and with
    --overwrite the working directory or a parent of it.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: give the path of a folder "
                          "(it is created if missing)")
    if not out.exists() or not any(p.name != LOCK or not _regular(p) for p in out.iterdir()):
        return  # new or empty (an ordinary lock file left by a killed run counts as empty)
    if not (overwrite or resume):
        raise ConfigError(f"output folder {out} exists and is not empty: pass --overwrite to "
                          "replace it, --resume to continue it, or choose another --out")
    made = folder_kind(out)
    if made is None:
        raise ConfigError(
            f"output folder {out} was not made by hopd (no {MARKER} marker and not a hopd "
            f"layout): hopd will not {'continue' if resume else 'replace'} it; choose another "
            "--out")
    if resume and made != kind:
        raise ConfigError(f"--resume: {out} holds a hopd {made} folder, not a {kind} run; "
                          "resume it with the command that made it, or choose another --out")
    if overwrite and not resume:
        here, target = Path.cwd().resolve(), out.resolve()
        if target == here or target in here.parents:
            raise ConfigError(f"--overwrite would delete {out}, which is the working directory "
                              "or a folder above it; choose a subfolder for --out")


def check_new_folder(out: Path, flag: str) -> None:
    """A folder a command is about to create must not exist yet (or be empty): hopd never writes
    a model into a folder that holds anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{flag} {out} already exists and is not an empty folder: give a new "
                          "folder")


def prepare_out(out: Path, *, kind: str, overwrite: bool = False, resume: bool = False
                ) -> RunLock:
    """Checks `out` again, locks it, empties it if --overwrite, and marks it as hopd's.

    Call after every input has been validated: this is the first write. Returns the held lock
    (release it when the run ends)."""
    check_out(out, kind=kind, overwrite=overwrite, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    if overwrite and not resume:
        for p in out.iterdir():
            if p.name == LOCK:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if not (out / MARKER).exists():
        write_json(out / MARKER, {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "pid": os.getpid()})
    return lock


def _regular(path: Path) -> bool:
    """A regular file itself, not a link to one (lstat)."""
    import stat

    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


class RunLock:
    """An exclusive lock on a run folder for the life of a run (fcntl.flock on `.hopd-lock`).

    A second run on the same folder fails at once, naming the holder's process id. The lock goes
    with the process, so a killed run never leaves a stale lock behind."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        # never through a symlink (a link planted as the lock would have hopd write its pid into
        # whatever file it points to), and only into a regular file
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise ConfigError(f"run folder {out}: its lock {self.path} is not a regular file "
                              f"({e.strerror}); hopd does not write through links: remove it or "
                              "choose another --out") from None
        if not _regular(self.path):
            os.close(fd)
            raise ConfigError(f"run folder {out}: its lock {self.path} is not a regular file; "
                              "remove it or choose another --out")
        self.f = os.fdopen(fd, "r+")  # held open for the run's life
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.seek(0)
            holder = self.f.read().strip() or "unknown"
            self.f.close()
            raise ConfigError(f"run folder {out} is in use by another hopd process (pid "
                              f"{holder}); wait for it to finish or choose another --out") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(str(os.getpid()))
        self.f.flush()

    def release(self) -> None:
        if not self.f.closed:
            self.f.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def save_checkpoint(run: Path, step: int, student: PreTrainedModel, tokenizer: Any,
                    opt_state: dict[str, Any], extra: dict[str, Any],
                    keep_last: int, state_dict: dict[str, Any] | None = None) -> Path:
    """Writes RUN/checkpoints/step_N atomically (a temporary folder, then a rename).

    `opt_state`: the optimizer's state dict; `state_dict`: the student's weights when not its own
    (`Dist.optimizer_state` and `Dist.model_state`: gathered in full under FSDP)."""
    ckpts = run / "checkpoints"
    ckpts.mkdir(exist_ok=True)

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": opt_state, "step": step,
                    "torch_rng": torch.get_rng_state(), **extra}, tmp / "trainer_state.pt")

    def when_full() -> str:
        previous = latest_checkpoint(run)
        return (f"no space left on the disk of {run} while writing the checkpoint of step {step} "
                f"({free_mb(run):.0f} MB free); "
                + (f"the previous checkpoint {previous.name} is intact: free space, then resume "
                   "with --resume" if previous is not None else "no checkpoint was written yet"))

    final = ckpts / f"step_{step:07d}"
    write_folder(final, ckpts / f".tmp_step_{step:07d}", write, when_full)
    for old in sorted(ckpts.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_folder(final: Path, tmp: Path, write: Callable[[Path], None],
                 when_full: Callable[[], str]) -> None:
    """Fills `tmp` with `write(tmp)`, then swaps it in for `final`: a failed or killed write
    never touches `final`. A full disk removes `tmp` and raises `DiskFull(when_full())`."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except Exception as e:  # OSError, torch's RuntimeError, safetensors' own error
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_disk_full(e):
            raise
        raise DiskFull(when_full()) from None
    make_readable(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def free_mb(path: Path) -> float:
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return math.nan


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted((run / "checkpoints").glob("step_*"))
    return found[-1] if found else None


class StopFlag:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, saves (no evaluation), and exits.

    A second signal gives up at once (KeyboardInterrupt), except inside `saving()`, where it is
    noted and the save completes first: a checkpoint is never cut in half by a signal."""

    def __init__(self) -> None:
        self.stop = False
        self.signum = 0
        self.in_save = False
        self.old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop and not self.in_save:  # a second signal: give up at once
            raise KeyboardInterrupt
        if self.stop:
            print("\nhopd: still saving; exiting as soon as the checkpoint is complete",
                  file=sys.stderr)
            return
        self.stop, self.signum = True, signum
        print(f"\nhopd: got signal {signum}; finishing this step, then saving (no evaluation)",
              file=sys.stderr)

    def saving(self) -> _Saving:
        return _Saving(self)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


class _Saving:
    def __init__(self, flag: StopFlag):
        self.flag = flag

    def __enter__(self) -> None:
        self.flag.in_save = True

    def __exit__(self, *exc: Any) -> None:
        self.flag.in_save = False


def read_result(run: Path) -> dict[str, Any] | None:
    """The run's result.json, or None where it is missing or unreadable."""
    try:
        result = json.loads((run / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def run_finished(run: Path) -> bool:
    """A run is finished only when its budget was spent: result.json says it ended without a
    signal, and its final model is there (a stopped run writes result.json too)."""
    result = read_result(run)
    return result is not None and not result.get("stopped_by_signal") and \
        (run / "model" / "config.json").is_file()


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer, step and RNG state, loaded with weights_only=True (no code runs)."""
    try:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        for key in ("optimizer", "step", "torch_rng", "totals"):
            state[key]
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ConfigError(f"checkpoint {ckpt} is corrupt or incomplete ({type(e).__name__}); "
                         f"delete that folder to resume from an earlier checkpoint, or start "
                         f"again with --overwrite") from None
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Drops metrics lines past `step` (written after the checkpoint we resume from)."""
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(clean_json(r), allow_nan=False) + "\n" for r in keep))
    os.replace(tmp, path)


def save_final_model(run: Path, model: PreTrainedModel, tok: Any,
                     weights: dict[str, Any] | None = None) -> None:
    """RUN/model, written beside the old one and swapped in: a failed write loses nothing."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=weights)
        tok.save_pretrained(tmp)

    write_folder(run / "model", run / ".tmp_model", write, lambda: (
        f"no space left on the disk of {run} while writing the final model; the last "
        "checkpoint is intact: free space, then run again with --resume to write it"))
