"""flextron.timing on CUDA: a sample waits for the GPU's work, not only for the launches."""

from __future__ import annotations

import time

import pytest
import torch

from flextron.timing import times_ms

pytestmark = pytest.mark.cuda


def test_samples_wait_for_queued_kernels():
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(1_000_000)  # spin ~1M cycles, to measure the clock rate
    torch.cuda.synchronize()
    per_million = time.perf_counter() - start
    cycles = int(1_000_000 * 0.05 / max(per_million, 1e-6))  # ~50 ms of GPU time
    device = torch.device("cuda")
    sleep = {"sleep": lambda: torch.cuda._sleep(cycles)}
    assert times_ms(sleep, device, repeats=1, warmup=0)["sleep"] > 25
    assert times_ms(sleep, device, repeats=2, warmup=1, statistic="min")["sleep"] > 25
    assert times_ms(sleep, device, repeats=1, warmup=0, calls=2)["sleep"] > 25  # per call
