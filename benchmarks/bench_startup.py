"""Start-up time: `import flextron` and `flextron --help`, against a bare interpreter and
`import torch` measured in the same run (fresh processes, interleaved, best of N).

    python benchmarks/bench_startup.py --repeats 7 --json benchmarks/results/bench_startup.json

Why best of N: start-up is mostly reading files; the minimum is the idle-machine figure, the
others add the noise of whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "python (baseline)": [sys.executable, "-c", "pass"],
    "import torch": [sys.executable, "-c", "import torch"],
    "import flextron": [sys.executable, "-c", "import flextron"],
    "flextron --help": [sys.executable, "-m", "flextron", "--help"],
}


def run_once(command: list[str]) -> float:
    """Seconds for one fresh process to start, run `command` and exit (status 0 required)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):  # interleaved: a noisy moment hits every case alike
        for name, command in CASES.items():
            times[name].append(run_once(command))
    best = {name: min(values) for name, values in times.items()}
    torch_s = best["import torch"]
    print(f"{'case':<20} {'best s':>8} {'median s':>9} {'vs import torch':>16}")
    for name, values in times.items():
        median = sorted(values)[len(values) // 2]
        print(f"{name:<20} {best[name]:8.3f} {median:9.3f} {best[name] / torch_s:15.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"repeats": args.repeats, "best_s": best, "all_s": times}, indent=2)
        )


if __name__ == "__main__":
    main()
