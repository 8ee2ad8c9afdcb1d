"""flextron.speed's timers on CUDA: they wait for the GPU's work, not only for the launches."""

from __future__ import annotations

import time

import torch

from flextron import speed
from tests.helpers import CUDA_MARKS

pytestmark = list(CUDA_MARKS)


def test_elapsed_waits_for_queued_kernels():
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(1_000_000)  # spin ~1M cycles, to measure the clock rate
    torch.cuda.synchronize()
    per_million = time.perf_counter() - start
    cycles = int(1_000_000 * 0.05 / max(per_million, 1e-6))  # ~50 ms of GPU time
    seconds = speed.elapsed(lambda: torch.cuda._sleep(cycles), time.perf_counter)
    assert seconds > 0.025, seconds
    assert speed.best_time(lambda: torch.cuda._sleep(cycles), 2, time.perf_counter) > 0.025
