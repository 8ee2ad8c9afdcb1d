"""Safe outputs: checks before any work, durable writes, and staged directories.

Every command that writes checks its output paths first (`check_output_dir`,
`check_new_output_file`, `check_output_file`): an existing non-empty directory (or an
existing file, for a command's main output file) is refused unless overwriting is asked for,
an output equal to, inside, or holding the source model is always refused, and the place
must be writable.  A directory output is then built in a temporary sibling and
renamed into place (`staged_output`), so a failed or killed command leaves either the old
directory or the complete new one, never a half-written one.

Durability: `fsync_file` / `fsync_dir` flush a file's data and a directory's entries, so
a rename that publishes a file survives a power loss together with the file's contents.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

STAGE_TAG = ".tmp-"  # staged outputs are hidden siblings: .NAME.tmp-PID-XXXX


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's contents to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (created, renamed, removed names) to disk."""
    handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and directory under `path` (itself included), deepest first."""
    for directory, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(Path(directory) / name)
        fsync_dir(directory)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def temp_owner(name: str, prefix: str) -> int | None:
    """The PID in a temporary name `PREFIX{pid}-...` (None: not such a name)."""
    if not name.startswith(prefix):
        return None
    pid = name[len(prefix) :].split("-", 1)[0].split(".", 1)[0]
    return int(pid) if pid.isdigit() else None


def remove_stale(directory: str | os.PathLike, prefix: str) -> None:
    """Remove the temporary files and directories `PREFIX{pid}-...` in `directory` that this
    process left, or whose process is gone (killed mid-write); others' are left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for item in directory.iterdir():
        owner = temp_owner(item.name, prefix)
        if owner is not None and (owner == os.getpid() or not pid_alive(owner)):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


def _nearest_existing(path: Path, flag: str) -> Path:
    """The deepest existing ancestor of `path`; ValueError when it is not a directory."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
            return parent
    return Path(path.anchor or ".")


def _check_writable(directory: Path, path: Path, flag: str) -> None:
    # A trial file, not os.access: access() says yes to root on a read-only bind or /proc.
    try:
        handle, name = tempfile.mkstemp(dir=directory, prefix=".flextron-write-test-")
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write in {directory} ({error.strerror})") from error
    os.close(handle)
    os.unlink(name)


def _overlap(path: Path, sources: Sequence[str | os.PathLike], flag: str) -> None:
    resolved = path.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents:
            raise ValueError(
                f"{flag} {path} is the source model {source} or inside it: choose another "
                "directory (the source would be overwritten)"
            )
        if resolved in source.parents:
            raise ValueError(f"{flag} {path} holds the source model {source}: choose another directory")


def check_output_dir(
    path: str | os.PathLike,
    flag: str = "--out",
    overwrite: bool = False,
    sources: Sequence[str | os.PathLike] = (),
) -> Path:
    """ValueError unless `path` can become a new output directory.

    Refused: a file; a path below a file; a non-empty directory (unless `overwrite`); the
    source model's path, a path inside it, or one that holds it (`sources`, always); an
    unwritable place.
    """
    if not str(path):
        raise ValueError(f"{flag} must not be empty")
    path = Path(path)
    _overlap(path, sources, flag)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory")
    if path.is_dir():
        if not overwrite and any(path.iterdir()):
            raise ValueError(
                f"{flag} {path} is not empty: choose a new directory or pass --overwrite to replace it"
            )
        _check_writable(path, path, flag)
    parent = _nearest_existing(path.absolute(), flag)
    _check_writable(parent, path, flag)
    return path


def check_new_output_file(
    path: str | os.PathLike,
    flag: str = "--out",
    overwrite: bool = False,
    sources: Sequence[str | os.PathLike] = (),
) -> Path:
    """ValueError unless `path` can become a new output file (a command's main product).

    Refused: a directory; a path below a file; an existing file (unless `overwrite`); the
    source model's path or one inside or holding it (`sources`, always); an unwritable place.
    """
    if not str(path):
        raise ValueError(f"{flag} must not be empty")
    path = Path(path)
    _overlap(path, sources, flag)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory, not a file")
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} exists: choose a new name or pass --overwrite to replace it")
    parent = _nearest_existing(path.absolute(), flag)
    _check_writable(parent, path, flag)
    return path


def check_output_file(path: str | os.PathLike | None, flag: str) -> Path | None:
    """ValueError unless a file can be written at `path` (None: no output asked for)."""
    if path is None:
        return None
    if not str(path) or Path(path).is_dir():
        raise ValueError(f"{flag} {path!r}: expected a file name, got a directory")
    path = Path(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: the file is not writable")
    parent = _nearest_existing(path.absolute(), flag)
    _check_writable(parent, path, flag)
    return path


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path for the caller to create (a directory or a file); on
    success it is flushed and renamed to `path` (an existing `path` is replaced only when
    `overwrite`); on failure it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}{STAGE_TAG}")
    stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{STAGE_TAG}{os.getpid()}-"))
    temp = stage / path.name  # created by the caller; the staging directory keeps its name unique
    try:
        yield temp
        if not temp.exists():
            raise RuntimeError(f"nothing was written for {path}")
        if temp.is_dir():
            fsync_tree(temp)
        else:
            fsync_file(temp)
        old = None
        if path.exists() and (path.is_file() or any(path.iterdir())):
            if not overwrite:
                raise ValueError(f"{path} appeared while writing: left unchanged")
            old = stage / f"{path.name}.old"
            os.replace(path, old)  # kept in the stage until the new one is in place
        elif path.is_dir():
            path.rmdir()  # an empty directory: rename() onto it is fine, but not onto a file
        os.replace(temp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
