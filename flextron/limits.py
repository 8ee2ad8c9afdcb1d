"""Bounds on work driven by a model's files (a chat template is a program).

`time_limit` stops Python code that runs past a deadline: a trace function, called on
every line the code runs in this thread, raises `LimitError` once time is up.  Jinja
compiles a template to Python, so a template's loops are lines like any other; the
tracing slows the bounded code down, which is fine for the milliseconds a sane template
takes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


class LimitError(ValueError):
    """Work driven by a user's file went past its time or size bound."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Run the body with a deadline: LimitError naming `what` once `seconds` have passed."""
    deadline = time.monotonic() + seconds
    previous = sys.gettrace()

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise LimitError(f"{what} ran for more than {seconds:g} s: stopped")
        return trace

    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)


def check_size(text: str, limit: int, what: str) -> str:
    """`text`, or LimitError when it is longer than `limit` characters."""
    if len(text) > limit:
        raise LimitError(f"{what} is {len(text)} characters, more than the limit of {limit}")
    return text
