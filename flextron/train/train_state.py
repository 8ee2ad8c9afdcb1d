"""Training-state checkpoints: atomic, resumable, and free of pickle.

Layout under the run directory:

    checkpoints/step-000100/    a complete Flextron model directory (config.json,
                                model.safetensors, tokenizer, importance) plus
        optimizer.safetensors   AdamW state flattened: "state.{param}.{exp_avg|exp_avg_sq|step}"
        rng.safetensors         "cpu" (+ "cuda.{i}") generator states (uint8)
        trainer.json            step, scheduler, data position, optimizer param_groups, config
    checkpoints/latest.json     {"step": 100, "path": "step-000100"}

A checkpoint is written into a temporary directory (.tmp-PID-step-XXXXXX-...), flushed to
disk (every file, then the directory: fsync), moved into place with one rename (the
parent flushed again), and only then does latest.json (itself flushed and replaced
atomically) point at it.  A process killed, or a machine losing power, at any moment
leaves latest.json naming the last complete checkpoint.  Stray temporary files of a save
(checkpoint directories, latest.json temporaries) are removed by the next save: this
process's own, and those whose process is gone; another live process's are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flextron.io.atomic import save_safetensors_atomic, temp_prefix, write_json_atomic
from flextron.io.outputs import fsync_dir, fsync_tree, remove_stale
from flextron.model.checkpoint import save_pretrained
from flextron.model.elastic_model import FlextronModel

LATEST = "latest.json"
TRAINER_FILE, OPTIMIZER_FILE, RNG_FILE = "trainer.json", "optimizer.safetensors", "rng.safetensors"
# trainer.json fields (and their JSON types): every checkpoint's, and those a training resume reads.
CHECKPOINT_FIELDS = {"step": (int, "an integer"), "optimizer_param_groups": (list, "a list")}
RESUME_FIELDS = {
    **CHECKPOINT_FIELDS,
    "scheduler": (dict, "an object"),
    "data": (dict, "an object"),
    "config": (dict, "an object"),
    "num_train_blocks": (int, "an integer"),
}
TEMP_PREFIX = ".tmp-"  # then the PID: .tmp-PID-step-XXXXXX-...


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer state_dict as (tensors, JSON-able param_groups); per-parameter values
    that are not tensors (none for AdamW) are stored as 0-d tensors."""
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"state.{index}.{name}"] = torch.as_tensor(value)
    return tensors, state["param_groups"]


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict[str, Any]:
    state: dict[int | str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        # Keys are "state.{param}.{name}"; param is an index (plain optimizers) or a
        # parameter name, dots included (FSDP2's full state dicts).
        param, name = key.removeprefix("state.").rsplit(".", 1)
        state.setdefault(int(param) if param.isdigit() else param, {})[name] = value
    return {"state": state, "param_groups": param_groups}


def rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in states]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def _write_files(
    directory: Path,
    model: FlextronModel,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> None:
    save_pretrained(model, directory)
    tensors, param_groups = flatten_optimizer_state(optimizer_state)
    save_safetensors_atomic(directory / OPTIMIZER_FILE, tensors)
    save_safetensors_atomic(directory / RNG_FILE, rng_states())
    write_json_atomic(directory / TRAINER_FILE, {**trainer_state, "optimizer_param_groups": param_groups})


def _publish(temp: Path, final: Path) -> None:
    fsync_tree(temp)  # contents on disk before the rename makes them the checkpoint
    if final.exists():  # a checkpoint of this step from an earlier, interrupted run
        shutil.rmtree(final)
    os.replace(temp, final)
    fsync_dir(final.parent)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: FlextronModel,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under root, point latest.json at it, keep the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Left by a killed save: this process's, or a dead one's.
    remove_stale(root, TEMP_PREFIX)
    remove_stale(root, temp_prefix(root / LATEST))
    name = f"step-{step:06d}"
    temp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TEMP_PREFIX}{os.getpid()}-step-{step:06d}-"))
    _write_files(temp, model, optimizer_state, {**trainer_state, "step": step})
    _publish(temp, root / name)
    write_json_atomic(root / LATEST, {"step": step, "path": name})
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The directory latest.json points to, or None when there is no checkpoint yet."""
    root = Path(root)
    latest = root / LATEST
    if not latest.is_file():
        return None
    try:
        data = json.loads(latest.read_text())
    except ValueError as error:
        raise ValueError(f"{latest}: corrupt ({error})") from error
    name = data.get("path") if isinstance(data, dict) else None
    # Only a checkpoint name of this directory: never a path elsewhere.
    if not isinstance(name, str) or not name.startswith("step-") or Path(name).name != name:
        raise ValueError(f'{latest}: expected an object {{"step": N, "path": "step-NNNNNN"}}, got {data!r}')
    path = root / name
    if not path.is_dir():
        raise ValueError(f"{latest} points to {path.name}, which does not exist")
    return path


def read_trainer_state(path: str | os.PathLike, fields: dict = CHECKPOINT_FIELDS) -> dict[str, Any]:
    """A checkpoint's trainer.json with `fields` checked: ValueError naming the file and the field."""
    trainer_file = Path(path) / TRAINER_FILE
    try:
        trainer_state = json.loads(trainer_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: incomplete or corrupt training checkpoint ({error})") from error
    if not isinstance(trainer_state, dict):
        raise ValueError(f"{trainer_file}: expected a JSON object")
    for name, (kind, expected) in fields.items():
        if not isinstance(trainer_state.get(name), kind):
            raise ValueError(f"{trainer_file}: field {name!r} is missing or not {expected}")
    return trainer_state


def resumed_step(root: str | os.PathLike) -> int | None:
    """The step a resume from `root` would continue at (None: no checkpoint yet)."""
    checkpoint = latest_checkpoint(root)
    return None if checkpoint is None else read_trainer_state(checkpoint, RESUME_FIELDS)["step"]


def load_training_state(
    path: str | os.PathLike,
    fields: dict = CHECKPOINT_FIELDS,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(trainer_state, optimizer_state, rng_states) of a checkpoint directory (weights: load_pretrained);
    trainer.json must hold `fields`."""
    path = Path(path)
    trainer_state = read_trainer_state(path, fields)
    try:
        optimizer_tensors = load_file(path / OPTIMIZER_FILE)
        rng = load_file(path / RNG_FILE)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{path}: incomplete or corrupt training checkpoint ({error})") from error
    param_groups = trainer_state.pop("optimizer_param_groups")
    return trainer_state, unflatten_optimizer_state(optimizer_tensors, param_groups), rng
