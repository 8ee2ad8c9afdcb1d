"""flextron.timing: round-robin order, warm-up and repeat counts, CUDA synchronisation (mocked)
and a CPU run that never touches CUDA, staged preparation outside the clock, clock checks."""

from __future__ import annotations

import time

import pytest
import torch

from flextron import timing
from flextron.timing import Staged, sample_times_ms, times_ms

CPU = torch.device("cpu")


@pytest.fixture
def fake_clock(monkeypatch):
    """A wall clock that moves only when a test's function says so: clock[0] seconds."""
    clock = [0.0]
    monkeypatch.setitem(timing.CLOCKS, "wall", lambda: clock[0])
    return clock


def test_candidates_run_round_robin_warm_up_included() -> None:
    calls: list[str] = []
    times = times_ms(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU, repeats=3, warmup=1
    )
    assert calls == ["a", "b"] * 4  # interleaved, warm-up included
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_repeats_warmup_and_calls_per_sample_are_counted() -> None:
    calls: list[str] = []
    samples = sample_times_ms(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU, repeats=4, warmup=2, calls=3
    )
    assert [len(values) for values in samples.values()] == [4, 4]
    # Warm-up: single calls, round-robin; then each sample runs one candidate `calls` times.
    assert calls == ["a", "b"] * 2 + (["a"] * 3 + ["b"] * 3) * 4


def test_samples_are_milliseconds_per_call_and_the_statistic_is_chosen(fake_clock) -> None:
    durations = iter([0.004, 0.001, 0.002, 0.003, 0.010])  # seconds of successive timed calls

    def work() -> None:
        fake_clock[0] += next(durations)

    samples = sample_times_ms({"a": work}, CPU, repeats=4, warmup=1)
    assert samples["a"] == pytest.approx([1.0, 2.0, 3.0, 10.0])  # the 4 ms warm-up is not kept
    durations = iter([0.004, 0.001, 0.002, 0.003, 0.010])
    assert times_ms({"a": work}, CPU, repeats=4, warmup=1) == {"a": pytest.approx(2.5)}  # median
    durations = iter([0.004, 0.001, 0.002, 0.003, 0.010])
    assert times_ms({"a": work}, CPU, repeats=4, warmup=1, statistic="min") == {"a": pytest.approx(1.0)}
    durations = iter([0.001, 0.002, 0.003, 0.006])
    assert sample_times_ms({"a": work}, CPU, repeats=2, warmup=0, calls=2)["a"] == pytest.approx([1.5, 4.5])


def test_staged_preparation_runs_before_each_call_outside_the_clock(fake_clock) -> None:
    events: list[str] = []

    def prepare():
        events.append("prepare")
        fake_clock[0] += 1.0  # a slow prefill: not timed

        def decode() -> None:
            events.append("decode")
            fake_clock[0] += 0.002

        return decode

    samples = sample_times_ms({"decode": Staged(prepare), "other": lambda: events.append("other")}, CPU, 2, 1)
    assert events == ["prepare", "decode", "other"] * 3
    assert samples["decode"] == pytest.approx([2.0, 2.0]) and samples["other"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="needs calls 1"):
        sample_times_ms({"decode": Staged(prepare)}, CPU, calls=2)


def test_a_cuda_device_synchronises_before_and_after_each_call(monkeypatch) -> None:
    events: list[str] = []
    device = torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: events.append(f"sync {d}"))
    times_ms({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, device, repeats=2, warmup=1)
    assert events == ["sync cuda:1", "a", "sync cuda:1", "sync cuda:1", "b", "sync cuda:1"] * 3
    events.clear()
    sample_times_ms({"a": lambda: events.append("a")}, device, repeats=1, warmup=0, calls=2)
    assert events == ["sync cuda:1", "a", "a", "sync cuda:1"]  # the calls of a sample run back to back


def test_the_cpu_never_touches_cuda(monkeypatch) -> None:
    def touched(*_args, **_kwargs):
        raise AssertionError("CUDA touched on the CPU")

    for name in ("synchronize", "is_available", "is_initialized", "current_device", "device_count"):
        monkeypatch.setattr(torch.cuda, name, touched)
    assert set(times_ms({"a": lambda: None}, CPU, repeats=2, warmup=1)) == {"a"}


def test_clock_and_argument_checks(one_thread) -> None:
    times = times_ms({"a": lambda: sum(range(1000))}, CPU, repeats=2, clock="cpu")
    assert times["a"] >= 0
    with pytest.raises(ValueError, match="one thread"):
        times_ms({"a": lambda: None}, torch.device("cuda"), clock="cpu")  # CPU time of a GPU's work
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="one thread"):
        times_ms({"a": lambda: None}, CPU, clock="cpu")
    with pytest.raises(ValueError, match="clock must be one of"):
        times_ms({"a": lambda: None}, CPU, clock="gpu")
    with pytest.raises(ValueError, match="repeats >= 1"):
        times_ms({"a": lambda: None}, CPU, repeats=0)
    with pytest.raises(ValueError, match="statistic must be one of"):
        times_ms({"a": lambda: None}, CPU, statistic="mean")


@pytest.mark.cuda
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
