"""The test phase of benchmarks/gpu_check.sh: every CUDA op test gets a result in the time given.

    python benchmarks/test_phase.py --budget 240 --json OUT/tests.json --junit OUT/junit.xml
    python benchmarks/test_phase.py --rehearse --max-per-op 3 ...   # on a machine without a GPU
    python benchmarks/test_phase.py --rehearse --max-per-op 1 --one-session ...   # its quick form

- One pytest session per group of ops (GROUPS), no xdist: each extra process pays CUDA's and
  torch's start-up again. A group's share of the budget is in proportion to its number of tests.
- Each op's core tests (forward, backward, bad input) run first; opcheck and torch.compile tests,
  the slow ones, run in the time left (SLOW_TESTS).
- A session runs under `timeout -s INT`: pytest, interrupted, still writes its JUnit file and
  its -rA lines. Each test's result is also appended to a progress file as it ends
  (pytest_progress.py), so a killed process loses nothing but the test it died in, which is
  reported as failed; the group then restarts from the next test in a fresh process. A test
  that leaves a sticky CUDA error stops its session the same way (pytest_progress.py).
- The JSON summary (per op: passed, failed, skipped, not reached, each test's outcome and the
  failures' messages) is rewritten after every session, so it is there however the run ends.
- --rehearse (no GPU): the CUDA tests are listed as "not run: no device", and the same machinery
  runs the ops' CPU tests instead (--max-per-op N of them per op, core tests first).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Groups of op test files (tests/ops/test_<op>.py; timing: tests/test_timing.py), one session each.
GROUPS = {
    "routing": ("route", "routed_nested_mlp"),
    "dense": ("nested_linear", "nested_linear_int8", "nested_mlp"),
    "attention": ("varhead_attention", "decoder_layer"),
    "support": ("backends", "info", "timing"),
}
SLOW_TESTS = re.compile(r"opcheck|compile|inductor")
NO_DEVICE = "not run: no device"
NOT_REACHED = "not reached"


def test_file(op: str) -> str:
    return "tests/test_timing.py" if op == "timing" else f"tests/ops/test_{op}.py"


def op_of(nodeid: str) -> str:
    return re.match(r"tests/(?:ops/)?test_(\w+)\.py::", nodeid).group(1)


def pytest_env(root: Path, **variables: str) -> dict[str, str]:
    """The environment of a pytest run: the plugin and the tests' root importable."""
    path = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), str(root), os.environ.get("PYTHONPATH")]))
    return os.environ | variables | {"PYTHONPATH": path}


def per_test_timeout() -> list[str]:
    """pytest-timeout's options where it is installed: a test hanging in a CUDA call ends its
    process after TEST_TIMEOUT_S (default 90) seconds, all stacks in the log, and the group goes
    on from the next test like after a crash."""
    if importlib.util.find_spec("pytest_timeout") is None:
        return []
    return ["--timeout", os.environ.get("TEST_TIMEOUT_S", "90"), "--timeout-method", "thread"]


def collect(ops: list[str], work: Path, timeout_s: float, root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(CUDA tests, other tests) of the ops' test files, slow ones left out, in one collection."""
    listing = work / "collected.jsonl"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "--collect-only",
        "-p",
        "no:cacheprovider",
        "-p",
        "pytest_progress",
    ]
    env = pytest_env(root, FLEXTRON_TEST_LIST=str(listing))
    subprocess.run(
        [*command, *map(test_file, ops)], cwd=root, env=env, capture_output=True, timeout=timeout_s
    )
    records = [json.loads(line) for line in listing.read_text().splitlines()] if listing.exists() else []
    return [r["test"] for r in records if r["cuda"]], [r["test"] for r in records if not r["cuda"]]


def ordered(nodeids: list[str], max_per_op: int | None) -> list[str]:
    """Core tests before slow ones, each op's order kept; at most max_per_op per op."""
    kept, per_op = [], {}
    for nodeid in sorted(nodeids, key=lambda n: bool(SLOW_TESTS.search(n.split("::")[1]))):
        per_op[op_of(nodeid)] = per_op.get(op_of(nodeid), 0) + 1
        if max_per_op is None or per_op[op_of(nodeid)] <= max_per_op:
            kept.append(nodeid)
    return kept


class Phase:
    """The results so far, written as the JSON summary and the merged JUnit file."""

    def __init__(self, json_path: Path, junit_path: Path | None, work: Path, root: Path = ROOT) -> None:
        self.json_path, self.junit_path, self.work, self.root = json_path, junit_path, work, root
        self.results: dict[str, dict] = {}  # node id -> {"outcome", "message", "seconds"}
        self.sessions: list[dict] = []
        self.junit_files: list[Path] = []

    def expect(self, nodeids: list[str], outcome: str) -> None:
        for nodeid in nodeids:
            self.results[nodeid] = {"outcome": outcome}

    def write(self) -> None:
        ops: dict[str, dict] = {}
        for nodeid, result in self.results.items():
            entry = ops.setdefault(op_of(nodeid), {"counts": {}, "failed": {}, "tests": {}})
            outcome = result["outcome"]
            entry["counts"][outcome] = entry["counts"].get(outcome, 0) + 1
            entry["tests"][nodeid] = outcome
            if outcome == "failed":
                entry["failed"][nodeid] = result.get("message", "")
        summary = {"ops": ops, "sessions": self.sessions}
        temporary = self.json_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(summary, indent=1))
        temporary.replace(self.json_path)  # whole or not at all, even if the run ends now
        if self.junit_path is not None:
            merged = ET.Element("testsuites")
            for path in self.junit_files:
                try:
                    report = ET.parse(path).getroot()
                except (OSError, ET.ParseError):
                    continue
                merged.extend(report if report.tag == "testsuites" else [report])
            ET.ElementTree(merged).write(self.junit_path, encoding="unicode")

    def run_group(self, group: str, nodeids: list[str], limit_s: float) -> None:
        """Runs the group's tests in order, a fresh session after each crash, within limit_s."""
        deadline = time.monotonic() + limit_s
        files = sorted({test_file(op_of(nodeid)) for nodeid in nodeids})
        remaining = list(nodeids)
        attempt = 0
        while remaining and deadline - time.monotonic() >= 5:
            attempt += 1
            order, progress = self.work / f"{group}_{attempt}.order", self.work / f"{group}_{attempt}.jsonl"
            junit = self.work / f"{group}_{attempt}.xml"
            order.write_text("\n".join(remaining) + "\n")
            progress.write_text("")
            env = pytest_env(self.root, FLEXTRON_TEST_ORDER=str(order), FLEXTRON_TEST_PROGRESS=str(progress))
            budget = max(1, int(deadline - time.monotonic()))
            command = [
                "timeout",
                "-s",
                "INT",
                "-k",
                "10",
                str(budget),
                sys.executable,
                "-m",
                "pytest",
                "-rA",
                "-q",
            ]
            command += ["-p", "no:cacheprovider", "-p", "pytest_progress", "--junitxml", str(junit), *files]
            command += per_test_timeout()
            print(f"== {group} session {attempt}: {len(remaining)} tests, {budget} s", flush=True)
            start = time.monotonic()
            rc = subprocess.run(command, cwd=self.root, env=env).returncode
            self.junit_files.append(junit)
            finished, running = self._read_progress(progress)
            timed_out = rc in (124, 137)
            if running is not None and not timed_out:
                finished[running] = {
                    "outcome": "failed",
                    "message": f"the test process died in this test (rc={rc})",
                }
            self.results.update(finished)
            self.sessions.append(
                {"group": group, "attempt": attempt, "rc": rc, "seconds": round(time.monotonic() - start, 1),
                 "finished": len(finished), "timed_out": timed_out}
            )  # fmt: skip
            remaining = [nodeid for nodeid in remaining if nodeid not in finished]
            self.write()
            if timed_out or not finished:  # out of time, or a session that runs nothing (a collection error)
                break

    @staticmethod
    def _read_progress(path: Path) -> tuple[dict[str, dict], str | None]:
        """(finished tests' results, the test started but never finished, if any)."""
        finished, running = {}, None
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by the kill
                continue
            if record["event"] == "start":
                running = record["test"]
            else:
                finished[record["test"]] = {
                    key: record[key] for key in ("outcome", "message", "seconds") if key in record
                }
                running = None
        return finished, running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=240, help="seconds for the whole phase")
    parser.add_argument("--json", type=Path, required=True, help="the per-op summary")
    parser.add_argument("--junit", type=Path, help="all sessions' JUnit reports, merged")
    parser.add_argument("--work", type=Path, help="scratch folder (default: next to --json)")
    parser.add_argument("--rehearse", action="store_true", help="no GPU: run the ops' CPU tests instead")
    parser.add_argument("--max-per-op", type=int, help="run at most this many tests per op")
    parser.add_argument(
        "--one-session", action="store_true", help="all groups in one session (quick rehearsal)"
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    work = args.work or args.json.parent / "test_phase_work"
    work.mkdir(parents=True, exist_ok=True)
    phase = Phase(args.json, args.junit, work)
    all_ops = [op for ops in GROUPS.values() for op in ops]
    cuda_tests, cpu_tests = collect(all_ops, work, timeout_s=max(10, args.budget / 4))
    phase.expect(cuda_tests, NO_DEVICE if args.rehearse else NOT_REACHED)
    to_run = cpu_tests if args.rehearse else cuda_tests
    to_run = ordered(to_run, args.max_per_op)
    phase.expect(to_run, NOT_REACHED)
    phase.write()
    sessions = {"all": tuple(all_ops)} if args.one_session else GROUPS
    groups = [
        (group, [nodeid for nodeid in to_run if op_of(nodeid) in ops]) for group, ops in sessions.items()
    ]
    for number, (group, tests) in enumerate(groups):
        later = sum(len(their_tests) for _, their_tests in groups[number + 1 :])
        left = args.budget - (time.monotonic() - start)
        if tests:
            phase.run_group(group, tests, left * len(tests) / (len(tests) + later))
    phase.write()
    counts: dict[str, int] = {}
    for result in phase.results.values():
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    print("test phase:", ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())), flush=True)
    return 1 if counts.get("failed") or counts.get(NOT_REACHED) else 0


if __name__ == "__main__":
    sys.exit(main())
