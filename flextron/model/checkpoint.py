"""Flextron checkpoint directories: save_pretrained / load_pretrained.

Layout:
    config.json          {"format": "flextron", "version": 1, "model_type": "flextron",
                          "model": ModelConfig fields}  (model_type: for transformers' Auto
                          classes; directories written without it load all the same)
    model.safetensors    the weights (names as in FlextronModel.state_dict())
    importance.safetensors   conversion scores per layer, when converted
    tokenizer files      when the model carries a tokenizer

Every file is written atomically (flextron.io.atomic), config.json last, so neither a
crash nor a power loss leaves a half-written file under its final name, and a directory
with config.json is complete.  Only safetensors and JSON are read: nothing is unpickled,
and no code shipped with a model directory is run.

This module is the format only: FlextronModel knows nothing of files, so the model layer
does no I/O and the dependency runs one way (checkpoint -> model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flextron.io.atomic import save_safetensors_atomic, save_tokenizer_atomic, write_json_atomic
from flextron.io.local_hf import load_local_tokenizer
from flextron.model.budget_configs import FILE as BUDGET_CONFIGS_FILE
from flextron.model.budget_configs import BudgetConfigs
from flextron.model.config import ModelConfig
from flextron.model.elastic_model import FlextronModel

FORMAT, VERSION = "flextron", 1
CONFIG_FILE, WEIGHTS_FILE, IMPORTANCE_FILE = "config.json", "model.safetensors", "importance.safetensors"


def save_pretrained(model: FlextronModel, path: str | os.PathLike) -> None:
    """Write `model` (weights, config, tokenizer, importance) to directory `path`."""
    if model.is_int8:
        raise ValueError("an int8 model is for inference and is not saved: save the float model it came from")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if model.tokenizer is not None:
        save_tokenizer_atomic(model.tokenizer, path)
    if model.importance:
        save_safetensors_atomic(path / IMPORTANCE_FILE, model.importance)
    # Tied weights are one tensor: store it once, under embed_tokens.
    save_safetensors_atomic(path / WEIGHTS_FILE, model.state_dict(), {"format": "pt"})
    if model.budget_configs is not None:  # re-fingerprinted: they belong to these weights now
        model.budget_configs.save(path, model, model.config)
    else:
        (path / BUDGET_CONFIGS_FILE).unlink(missing_ok=True)
    # config.json last: its presence marks a complete checkpoint.
    meta = {"format": FORMAT, "version": VERSION, "model_type": FORMAT, "model": model.config.to_dict()}
    write_json_atomic(path / CONFIG_FILE, meta)


def is_flextron_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def require_flextron_dir(path: str | os.PathLike) -> Path:
    """`path` as a Path when it is a Flextron directory; ValueError saying how to make one otherwise."""
    if not is_flextron_dir(path):
        raise ValueError(f"{path} is not a Flextron directory: run `flextron convert --out DIR` first")
    return Path(path)


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | None = None
) -> FlextronModel:
    """Load a directory written by save_pretrained; clear errors for missing or corrupt files.

    dtype: the floating-point weights' dtype (None: as stored); device: where they go (None: CPU).
    """
    from flextron.io.weight_readers import iter_safetensors, read_safetensors  # loading's, not saving's

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: missing {CONFIG_FILE}")
    try:
        meta = json.loads(config_file.read_text())
    except ValueError as error:  # bad JSON or bad UTF-8
        raise ValueError(f"{config_file}: corrupt JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise ValueError(f'{config_file}: not a Flextron checkpoint (no "format": "{FORMAT}")')
    if meta.get("version") != VERSION:
        raise ValueError(f"{config_file}: unsupported checkpoint version {meta.get('version')!r}")
    try:
        config = ModelConfig.from_dict(meta["model"])
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from error
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS_FILE}")
    try:
        weights = read_safetensors(weights_file, dtype, device)
    except (ValueError, OSError) as error:
        raise ValueError(f"{weights_file}: corrupt safetensors file ({error})") from error
    try:
        model = FlextronModel.from_state_dict(config, weights).to(device)
    except ValueError as error:
        raise ValueError(f"{weights_file} does not match {CONFIG_FILE}: {error}") from error
    importance_file = path / IMPORTANCE_FILE
    if importance_file.is_file():
        try:
            model.importance = load_file(importance_file)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{importance_file}: corrupt safetensors file ({error})") from error
    # budget_configs.json fingerprints the weights rounded to bfloat16, which a float16 load
    # rounds otherwise: check it against the file's weights as stored, read once more.
    stored = iter_safetensors(weights_file) if dtype == torch.float16 else model
    model.budget_configs = BudgetConfigs.load(path, stored, config)
    model.tokenizer = load_local_tokenizer(path)
    return model.eval()
