"""benchmarks/gpu_check.sh and its test phase (benchmarks/test_phase.py) on a machine without a GPU:
a test that kills its process or leaves a (stand-in) sticky CUDA error does not hide the results of
the tests after it, and the rehearsal runs every phase and reports every CUDA test."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"

# Stand-ins for device faults: test_killed ends its process as a crashed kernel would;
# test_sticky_fault leaves what the plugin's device check reports as a sticky CUDA error.
FAKE_TESTS = """
import os, signal
import pytest_progress

FAULT = []
pytest_progress.device_fault = lambda: FAULT[0] if FAULT else None

def test_first():
    pass

def test_killed():
    os.kill(os.getpid(), signal.SIGKILL)

def test_after_the_kill():
    pass

def test_sticky_fault():
    FAULT.append("CUDA error: an illegal memory access was encountered (stand-in)")

def test_after_the_fault():
    assert not FAULT  # a fresh process

def test_fails():
    assert 1 == 2

def test_skipped():
    pytest.skip("no reason to run")
"""


def load_test_phase():
    spec = importlib.util.spec_from_file_location("test_phase", BENCHMARKS / "test_phase.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tests_after_a_crash_or_a_sticky_fault_still_report(tmp_path):
    (tmp_path / "tests" / "ops").mkdir(parents=True)
    (tmp_path / "tests" / "ops" / "test_fake.py").write_text("import pytest\n" + FAKE_TESTS)
    phase_module = load_test_phase()
    cuda_tests, nodeids = phase_module.collect(["fake"], tmp_path, timeout_s=60, root=tmp_path)
    assert not cuda_tests and len(nodeids) == 7
    phase = phase_module.Phase(tmp_path / "tests.json", tmp_path / "junit.xml", tmp_path, root=tmp_path)
    phase.expect(nodeids, phase_module.NOT_REACHED)
    phase.run_group("fake", nodeids, limit_s=120)
    ops = json.loads((tmp_path / "tests.json").read_text())["ops"]
    outcomes = {nodeid.split("::")[1]: outcome for nodeid, outcome in ops["fake"]["tests"].items()}
    assert outcomes == {
        "test_first": "passed",
        "test_killed": "failed",
        "test_after_the_kill": "passed",
        "test_sticky_fault": "failed",
        "test_after_the_fault": "passed",
        "test_fails": "failed",
        "test_skipped": "skipped",
    }
    failed = {nodeid.split("::")[1]: message for nodeid, message in ops["fake"]["failed"].items()}
    assert "died in this test" in failed["test_killed"]
    assert "illegal memory access" in failed["test_sticky_fault"]
    assert ops["fake"]["counts"] == {"passed": 3, "failed": 3, "skipped": 1}
    assert [
        session["attempt"] for session in json.loads((tmp_path / "tests.json").read_text())["sessions"]
    ] == [1, 2, 3]
    # The killed session wrote no JUnit file: its two tests are in the JSON summary alone.
    assert (tmp_path / "junit.xml").read_text().count("<testcase") == 5


@pytest.mark.skipif(sys.platform != "linux", reason="the script needs bash and coreutils' timeout")
def test_fast_rehearsal_runs_every_phase_and_lists_every_cuda_test(tmp_path):
    env = os.environ | {"OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--rehearse", "--fast"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = {step["step"]: step for step in report["steps"]}
    assert {"build", "smoke", "tests", "bench"} <= set(steps), steps
    assert all(isinstance(step["seconds"], int) for step in steps.values())
    assert report["deadline_s"] > 0
    tests = json.loads((tmp_path / "out" / "tests.json").read_text())["ops"]
    cuda = [
        outcome for op in tests.values() for outcome in op["tests"].values() if outcome.startswith("not run")
    ]
    assert len(cuda) > 100 and set(cuda) == {"not run: no device"}
    assert all(op["counts"].get("failed", 0) == 0 for op in tests.values())
    assert sum(op["counts"].get("passed", 0) for op in tests.values()) > 0
