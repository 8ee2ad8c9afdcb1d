"""Command-line argument types checked at parse time, and a parser whose errors are one line.

Each type is a callable for argparse's `type=`: it returns the parsed value or raises
argparse.ArgumentTypeError with a message naming what was expected, so a bad number stops
the command before it loads anything.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one stderr line (`flextron CMD: error: ...`), status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


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
