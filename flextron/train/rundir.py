"""A training run directory: one writer at a time, and no run replaced by surprise.

`run_lock(out)` holds an exclusive `fcntl.flock` on OUT/.lock for the whole run; the file
names the holder's PID, so a second trainer on the same directory stops with a one-line
error naming it.  The lock goes with the process (the kernel drops it when the process
dies, however it dies), so a killed run never leaves the directory locked.  Re-entrant
within one process: the command line takes it before training, and `train` takes it too.

`check_run_dir` refuses a directory that already holds a run unless the run is resumed or
explicitly overwritten (`clear_run` then removes the old run's files, and only those).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from flextron.io.outputs import check_output_dir

LOCK_FILE = ".lock"
RUN_FILES = ("metrics.jsonl", "metrics.png")
CHECKPOINTS = "checkpoints"

_held: dict[Path, list] = {}  # resolved directory -> [fd, depth]: this process's locks


class RunLockedError(ValueError):
    """Another process holds the run directory's lock."""


def _locked(directory: Path) -> RunLockedError:
    try:
        pid = (Path(directory) / LOCK_FILE).read_text().strip()
    except OSError:
        pid = ""
    holder = f"PID {pid}" if pid.isdigit() else "an unknown process"
    return RunLockedError(
        f"{directory} is in use by another training run ({holder}): wait for it to finish, "
        "or choose another --out"
    )


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of run directory `directory` (created if needed) for the body."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    if key in _held:
        _held[key][1] += 1
    else:
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked(directory) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = [fd, 1]
    try:
        yield directory
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            os.close(_held.pop(key)[0])  # closing the file releases the lock


def check_unlocked(directory: str | os.PathLike) -> None:
    """RunLockedError when another process holds `directory`'s lock (creates nothing): lets a
    command stop at once, before loading anything; the run itself then takes the lock."""
    path = Path(directory) / LOCK_FILE
    if Path(directory).resolve() in _held or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked(directory) from None
    finally:
        os.close(fd)


def holds_run(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds (part of) a training run: metrics or checkpoints."""
    directory = Path(directory)
    checkpoints = directory / CHECKPOINTS
    return any((directory / name).exists() for name in RUN_FILES) or (
        checkpoints.is_dir() and any(checkpoints.iterdir())
    )


def check_run_dir(directory: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """ValueError unless a run may be written to `directory` (see the module docstring)."""
    check_output_dir(directory, "--out", overwrite=True)  # a directory, writable (its other files stay)
    directory = Path(directory)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: choose one")
    if not resume and not overwrite and holds_run(directory):
        raise ValueError(
            f"--out {directory} already holds a training run: pass --resume to continue it "
            "or --overwrite to replace it"
        )


def clear_run(directory: str | os.PathLike) -> None:
    """Remove a previous run's metrics and checkpoints from `directory` (other files stay)."""
    directory = Path(directory)
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)
    shutil.rmtree(directory / CHECKPOINTS, ignore_errors=True)
