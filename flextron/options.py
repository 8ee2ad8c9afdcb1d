"""Settings: value types checked at parse time, and config fields that declare their option.

Each type is a callable for argparse's `type=`: it returns the parsed value or raises
argparse.ArgumentTypeError with a message naming what was expected, so a bad number stops
the command before it loads anything.  Config dataclasses (CalibrationConfig, TrainConfig,
RouterTrainingConfig, DemoConfig) declare their fields with `option(...)`; the command line
turns them into options with `config_options` and back with `config_from_args`.

Layer 0: imports no other flextron module (and not torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any


def _number(text: str, kind: type, expected: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= low."""
    expected = {0: "an integer >= 0", 1: "a positive integer"}.get(low, f"an integer >= {low}")

    def parse(text: str) -> int:
        value = _number(text, int, expected)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in its own messages
    return parse


def float_in(
    low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite number in the interval (low_open: excluding low; high_open: excluding high)."""
    left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
    expected = (
        f"a number in {left}{low:g}, {high:g}{right}"
        if high < math.inf
        else (f"a number {'>' if low_open else '>='} {low:g}")
    )

    def parse(text: str) -> float:
        value = _number(text, float, expected)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
positive_float = float_in(0.0, low_open=True)
non_negative_float = float_in(0.0)
unit_float = float_in(0.0, 1.0)
budget_float = float_in(0.0, 1.0, low_open=True)


def parse_budgets(text: str) -> list[float]:
    """Comma-separated budgets, each in (0, 1]."""
    budgets = [budget_float(part) for part in text.split(",") if part.strip()]
    if not budgets:
        raise argparse.ArgumentTypeError("expected comma-separated budgets in (0, 1], got none")
    return budgets


def parse_weights(text: str) -> list[float]:
    """Comma-separated sampling weights, each >= 0, at least one of them positive."""
    weights = [non_negative_float(part) for part in text.split(",") if part.strip()]
    if not any(weights):
        raise argparse.ArgumentTypeError(f"expected comma-separated weights >= 0, not all zero, got {text!r}")
    return weights


# ---- options generated from config dataclasses
# A config dataclass is the single source of a setting's default, check and help text: its
# fields declare their command-line option with `option(...)`, and a command adds them with
# `config_options(Config)` and builds the config back with `config_from_args(Config, args)`.


def option(
    default: Any,
    help: str = "",
    type: Callable[[str], Any] | None = None,
    choices: Sequence[Any] | None = None,
    negative_flag: str | None = None,
) -> Any:
    """A config field with a command-line option `--field-name`.

    A boolean field defaulting to False becomes a store_true flag; one defaulting to True needs
    `negative_flag` (e.g. "--freeze-embeddings"), which sets it to False.  A tuple default is
    given by `type` (which parses the text to a list) and stored as a tuple.
    """
    cli = {"help": help, "type": type, "choices": choices, "negative_flag": negative_flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option(): use a tuple for a sequence default (dataclass defaults are shared)")
    return dataclasses.field(default=default, metadata={"cli": cli})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_options(
    config_class: type, exclude: Sequence[str] = ()
) -> tuple[tuple[tuple[str, ...], dict], ...]:
    """The argparse arguments `(names, options)` of config_class's option(...) fields."""
    arguments = []
    for spec in dataclasses.fields(config_class):
        cli = spec.metadata.get("cli")
        if cli is None or spec.name in exclude:
            continue
        options: dict[str, Any] = {"dest": spec.name, "help": cli["help"]}
        if isinstance(spec.default, bool):
            if spec.default and not cli["negative_flag"]:
                raise TypeError(f"{config_class.__name__}.{spec.name}: a True flag needs negative_flag")
            flag = cli["negative_flag"] or _flag(spec.name)
            options.update(action="store_false" if spec.default else "store_true", default=spec.default)
        else:
            flag = _flag(spec.name)
            options["default"] = list(spec.default) if isinstance(spec.default, tuple) else spec.default
            for key in ("type", "choices"):
                if cli[key] is not None:
                    options[key] = cli[key]
            if spec.default is not None and not isinstance(spec.default, tuple) and "default" in options:
                options["help"] = f"{cli['help']} (default: %(default)s)".lstrip()
        arguments.append(((flag,), options))
    return tuple(arguments)


def config_from_args(config_class: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """config_class built from the parsed options of its option(...) fields, plus overrides."""
    values = {
        spec.name: getattr(args, spec.name)
        for spec in dataclasses.fields(config_class)
        if "cli" in spec.metadata and hasattr(args, spec.name)
    }
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
    return config_class(**(values | overrides))
