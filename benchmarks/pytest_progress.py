"""pytest plugin of benchmarks/test_phase.py (`-p pytest_progress`, benchmarks/ on sys.path).

- Lists the collected tests, and which are CUDA tests, in $FLEXTRON_TEST_LIST.
- Runs the tests listed in $FLEXTRON_TEST_ORDER (one node id a line) in that order, and only those.
- Appends each test's start and result to $FLEXTRON_TEST_PROGRESS as one JSON line, flushed at
  once: what a killed process leaves there says which tests finished and which one it died in.
- After each test on a GPU, synchronises: a test that leaves a sticky CUDA error (an illegal
  address, a device-side assert) fails with that error, and the session stops there, so that the
  tests after it run in a fresh process (test_phase.py restarts) instead of failing as its victims.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

_results: dict[str, dict] = {}


def _append(record: dict) -> None:
    path = os.environ.get("FLEXTRON_TEST_PROGRESS")
    if path:
        with open(path, "a") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            os.fsync(stream.fileno())


def device_fault() -> str | None:
    """The sticky CUDA error this process is in, if any (None without an initialised GPU)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    listing = os.environ.get("FLEXTRON_TEST_LIST")
    if listing:  # every collected test, and whether it is a CUDA test
        records = [
            {"test": item.nodeid, "cuda": item.get_closest_marker("cuda") is not None} for item in items
        ]
        Path(listing).write_text("".join(json.dumps(record) + "\n" for record in records))
    path = os.environ.get("FLEXTRON_TEST_ORDER")
    if not path:
        return
    order = {nodeid: i for i, nodeid in enumerate(Path(path).read_text().splitlines())}
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in order])
    items[:] = sorted((item for item in items if item.nodeid in order), key=lambda item: order[item.nodeid])


def pytest_runtest_logstart(nodeid, location):
    _append({"test": nodeid, "event": "start"})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    fault = device_fault()
    if fault is not None:
        item.session.shouldstop = f"sticky CUDA error after {item.nodeid}"
        raise RuntimeError(f"CUDA fault left by this test (the session restarts after it): {fault}")
    return result


def pytest_runtest_logreport(report):
    # One outcome per test: a failed setup or teardown wins over the call's outcome.
    record = _results.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed", "seconds": 0.0})
    record["seconds"] += report.duration
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)  # the exception's "E ..." line
        message = crash.message if crash is not None else report.longreprtext.strip()
        record.update(outcome="failed", message=message.splitlines()[0][:300] if message else "")
    elif report.skipped and record["outcome"] == "passed":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        record.update(outcome="skipped", message=reason)


def pytest_runtest_logfinish(nodeid, location):
    record = _results.pop(nodeid, None)
    if record is not None:
        _append(record | {"event": "end"})
