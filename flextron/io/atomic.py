"""Atomic file writes: a file appears under its final name complete, or not at all.

Each writer writes to a temporary sibling (`.NAME.PID-XXXX.tmp`: `temp_prefix` + the
writer's PID), flushes it to disk (fsync), moves it into place with os.replace and flushes
the directory, so neither a crash nor a power loss leaves a half-written file under the
final name.  The PID lets `flextron.io.outputs.remove_stale` tell a dead writer's leftovers
from a live one's.

A module of its own rather than part of flextron.io.outputs: outputs decides where a command
may write and stages whole output directories; this module writes single files in place,
for every layer that saves something (checkpoints, exports, metrics, plots).  Both share
outputs' fsync primitives.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flextron.io.outputs import fsync_dir, fsync_file


def temp_prefix(final: Path) -> str:
    """The start of `final`'s temporary names (followed by the writer's PID)."""
    return f".{final.name}."


def _atomic_path(final: Path) -> Path:
    handle, name = tempfile.mkstemp(
        dir=final.parent, prefix=f"{temp_prefix(final)}{os.getpid()}-", suffix=".tmp"
    )
    os.close(handle)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def _publish_file(temp: Path, path: Path) -> None:
    # Data on disk before the name: a power loss cannot leave `path` renamed but empty.
    fsync_file(temp)
    os.replace(temp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    temp = _atomic_path(path)
    try:
        temp.write_text(text)
        _publish_file(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as indented JSON (plus a final newline) to `path` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_figure_atomic(figure: Any, path: str | os.PathLike, dpi: int) -> None:
    """Save a matplotlib figure as PNG at `path` atomically, then close it."""
    import matplotlib.pyplot as plt  # only plotting callers pay for matplotlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _atomic_path(path)
    try:
        figure.savefig(temp, dpi=dpi, format="png")
        _publish_file(temp, path)
    finally:
        plt.close(figure)
        temp.unlink(missing_ok=True)


def save_safetensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Write `tensors` (any shapes and devices; stored contiguous, on the CPU) as a safetensors
    file at `path` atomically."""
    temp = _atomic_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temp), metadata)
        _publish_file(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def save_tokenizer_atomic(tokenizer: Any, path: Path) -> None:
    """Write a Hugging Face tokenizer's files into directory `path`, each one atomically."""
    # The tokenizer writes several files: save to a scratch directory, then move each.
    with tempfile.TemporaryDirectory(dir=path) as scratch:
        tokenizer.save_pretrained(scratch)
        for item in Path(scratch).iterdir():
            fsync_file(item)
            os.replace(item, path / item.name)
    fsync_dir(path)
