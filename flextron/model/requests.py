"""Checks that a request fits a model, made before any work starts so that a request the model
cannot serve ends in one line (a ValueError naming the option and the limit).

Configurations from JSON files: one {"mlp_widths": [...], "heads": [...]} or a {name: that} map.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from flextron.model.config import ArchConfig

if TYPE_CHECKING:
    from flextron.model.elastic_model import FlextronModel


def load_arch_file(path: str | os.PathLike) -> dict[str, tuple[float | None, ArchConfig]]:
    """Configurations from JSON: one {"mlp_widths": [...], "heads": [...]} or a {name: that} map."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a configuration ({error})") from error
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a configuration or a non-empty map of named configurations")
    try:
        if "mlp_widths" in data:
            return {Path(path).stem: (None, ArchConfig.from_dict(data))}
        return {name: (None, ArchConfig.from_dict(arch)) for name, arch in data.items()}
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def load_one_arch(path: str | os.PathLike) -> ArchConfig:
    """The single configuration of a JSON file (ValueError when it holds several)."""
    archs = load_arch_file(path)
    if len(archs) != 1:
        raise ValueError(f"{path}: expected one configuration, found {len(archs)}")
    return next(iter(archs.values()))[1]


def check_context(model: FlextronModel, what: str, tokens: int, extra: int = 0) -> None:
    """`tokens` (+ `extra`) must fit the model's context; `what` names the request."""
    context = model.config.max_position_embeddings
    if tokens + extra > context:
        raise ValueError(
            f"{what} {tokens} does not fit the model's context of {context} tokens"
            + (f" (with {extra} more)" if extra else "")
        )


def check_arch_file(model: FlextronModel, path: str | os.PathLike | None) -> None:
    """Every configuration in the file fits the model."""
    for name, (_, arch) in load_arch_file(path).items() if path else ():
        try:
            arch.validate(model.config)
        except ValueError as error:
            raise ValueError(f"--arch {path} ({name}): {error}") from error
