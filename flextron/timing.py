"""The one timer of Flextron: candidates timed round-robin, CUDA-synchronised, in milliseconds.

Every measurement (the latency table and its check, router calibration, `flextron bench` and
the scripts in benchmarks/) goes through `sample_times_ms` or `times_ms`:

    times_ms({"dense": f, "nested": g}, device, repeats=15, warmup=2)  # {"dense": ms, "nested": ms}

- Round-robin: each repeat times every candidate once, so that a load change on a shared
  machine (or a GPU's clock drift) hits all candidates alike; the warm-up runs round-robin too.
- CUDA work is asynchronous: on a CUDA device the timer synchronises before and after each
  timed call, so that a sample covers the kernels and not only their launches.  On any other
  device it never touches CUDA.
- clock "wall" is elapsed time; "cpu" this process's CPU time, which on one CPU thread is the
  time the work would take on a core of its own (a shared, oversubscribed machine inflates
  wall time by whatever else runs).
- A sample may time `calls` back-to-back calls (per-call time: their total / calls), which
  amortises the synchronisation and clock reads for kernels of a few microseconds; a warm-up
  is `warmup` single calls of each candidate.
- A `Staged` candidate gets untimed preparation before each timed call (a decode loop timed
  after its prefill).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
STATISTICS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}

Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class Staged:
    """A candidate that needs untimed preparation before each timed call: `prepare()` runs
    outside the clock and returns the callable that is timed (e.g. a prefilled decode stream)."""

    prepare: Callable[[], Callable[[], object]]


Candidate = Callable[[], object] | Staged


def check_clock(clock: str, device: torch.device) -> Callable[[], float]:
    """The clock function of a clock name; ValueError for an unknown one, or for "cpu" off the
    CPU or with several threads (process CPU time then is not the latency)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError(
            "clock 'cpu' (process CPU time) measures latency only on the CPU with one thread "
            f"(device {device.type}, {torch.get_num_threads()} threads): set one thread "
            "(--threads 1) or use clock 'wall'"
        )
    return CLOCKS[clock]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work: torch.cuda.synchronize on CUDA, else nothing (and
    CUDA is then never touched)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def sample_times_ms(
    functions: Mapping[Key, Candidate],
    device: torch.device,
    repeats: int = 15,
    warmup: int = 2,
    clock: str = "wall",
    *,
    calls: int = 1,
) -> dict[Key, list[float]]:
    """`repeats` milliseconds per call of each candidate, in the order measured.

    First `warmup` untimed calls of each candidate, then `repeats` timed rounds; both go
    round-robin, one candidate after the other.  A timed sample is `calls` back-to-back calls,
    their total / calls; a Staged candidate needs calls 1.
    """
    if repeats < 1 or warmup < 0 or calls < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and calls >= 1, got {repeats}, {warmup}, {calls}")
    if calls > 1 and any(isinstance(function, Staged) for function in functions.values()):
        raise ValueError("a Staged candidate is prepared before each call: it needs calls 1")
    now, sync = check_clock(clock, device), synchronizer(device)
    samples: dict[Key, list[float]] = {key: [] for key in functions}
    for repeat in range(warmup + repeats):
        timed = repeat >= warmup
        for key, candidate in functions.items():
            function = candidate.prepare() if isinstance(candidate, Staged) else candidate
            sync()
            start = now()
            for _ in range(calls if timed else 1):
                function()
            sync()
            if timed:
                samples[key].append((now() - start) * 1e3 / calls)
    return samples


def times_ms(
    functions: Mapping[Key, Candidate],
    device: torch.device,
    repeats: int = 15,
    warmup: int = 2,
    clock: str = "wall",
    *,
    calls: int = 1,
    statistic: str = "median",
) -> dict[Key, float]:
    """Milliseconds per call of each candidate: the median (or "min") of its `sample_times_ms`."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    samples = sample_times_ms(functions, device, repeats, warmup, clock, calls=calls)
    return {key: STATISTICS[statistic](values) for key, values in samples.items()}
