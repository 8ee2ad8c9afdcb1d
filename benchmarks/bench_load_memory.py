"""Loading peak memory against the size of the loaded weights, one fresh process per dtype.

    python benchmarks/bench_load_memory.py --model default --dtypes float32,bfloat16

Peak = the process's high-water resident set (VmHWM) after load_model, minus its resident
set just before (torch, transformers and flextron already imported).  Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
import torch, transformers  # imported before the baseline, as the docstring says
import flextron
from flextron.model.placement import parse_dtype
from flextron.model.loading import load_model

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
start = time.perf_counter()
model = load_model(sys.argv[1], parse_dtype(sys.argv[2]))
seconds = time.perf_counter() - start
peak = status("VmHWM") - before
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"dtype": sys.argv[2], "weights_mib": weights / 2**20, "peak_mib": peak / 2**20,
                  "ratio": peak / weights, "seconds": seconds}))
"""


def measure(model: str, dtype: str) -> dict:
    """One load in a fresh process: {"dtype", "weights_mib", "peak_mib", "ratio", "seconds"}."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, model, dtype], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="any flextron --model source")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = parser.parse_args()
    print(f"{'dtype':<9} {'weights MiB':>11} {'peak MiB':>9} {'peak/weights':>12} {'seconds':>8}")
    for dtype in args.dtypes.split(","):
        row = measure(args.model, dtype)
        print(
            f"{dtype:<9} {row['weights_mib']:>11.0f} {row['peak_mib']:>9.0f} {row['ratio']:>12.2f} "
            f"{row['seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
