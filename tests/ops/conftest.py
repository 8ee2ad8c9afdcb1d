"""Fixtures of the op tests: the two tolerance rules and the CUDA probes, each handed to the test
as a function.  The `device` parameter and the CUDA skip: tests/conftest.py."""

from __future__ import annotations

import pytest
import torch

FP32_TOL = dict(atol=1e-5, rtol=1e-4)


def max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (actual.double() - exact.double()).abs().max().item() if exact.numel() else 0.0


def check_matches_reference(
    actual: torch.Tensor, pytorch_same_dtype: torch.Tensor, exact: torch.Tensor
) -> None:
    """fp32: tight closeness to `exact`. Lower precision: our error against `exact`
    (an fp32/fp64 reference) is at most 2x PyTorch's own error at that precision."""
    assert actual.shape == exact.shape, (actual.shape, exact.shape)
    assert actual.dtype == pytorch_same_dtype.dtype
    if actual.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(actual.double(), exact.double(), **FP32_TOL)
        return
    ours, theirs = max_error(actual, exact), max_error(pytorch_same_dtype, exact)
    assert ours <= 2 * theirs + 1e-6, f"error {ours:.3g} > 2 x PyTorch's {theirs:.3g} in {actual.dtype}"


def check_as_accurate_as_torch(
    ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor, floor: float
) -> None:
    """Every dtype: max |ours - exact| <= 2 max |theirs - exact| + floor + 4 ulps of the largest
    |exact|, where `theirs` is PyTorch at our precision and `exact` a float64 reference of the
    same shape.  The ulps: outputs near 50 are a few fp32 ulps (4e-6 each) off in any summation
    order, and PyTorch's own error depends on which of its paths the layout picks."""
    assert ours.shape == exact.shape and ours.dtype == theirs.dtype
    our_err = (ours.double() - exact).abs().max().item()
    their_err = (theirs.double() - exact).abs().max().item()
    ulps = 4 * torch.finfo(ours.dtype).eps * exact.abs().max().item()
    assert our_err <= 2 * their_err + floor + ulps, (our_err, their_err, ulps)


def fill_freed_cuda_memory_with_nan(dtype: torch.dtype) -> None:
    """Fill freed blocks of both pools of PyTorch's CUDA caching allocator with NaN, so that a
    kernel that reads a buffer it never wrote (an output element it skipped) returns NaN."""
    small = (1 << 19) // torch.tensor([], dtype=dtype).element_size()  # 512 KiB: the small pool
    blocks = [torch.full((small,), float("nan"), dtype=dtype, device="cuda") for _ in range(8)]
    blocks.append(torch.full((1 << 26,), float("nan"), dtype=dtype, device="cuda"))  # the large pool
    del blocks


def launched_cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels that `fn()` launches, in launch order (from the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]


@pytest.fixture(scope="session")
def assert_matches_reference():
    """check_matches_reference: fp32 close to the reference; 16-bit at most 2x PyTorch's error."""
    return check_matches_reference


@pytest.fixture(scope="session")
def assert_as_accurate_as_torch():
    """check_as_accurate_as_torch: at most 2x PyTorch's error against a float64 reference."""
    return check_as_accurate_as_torch


@pytest.fixture(scope="session")
def poison_cuda_cache():
    """fill_freed_cuda_memory_with_nan (see its docstring)."""
    return fill_freed_cuda_memory_with_nan


@pytest.fixture(scope="session")
def cuda_kernel_names():
    """launched_cuda_kernels (see its docstring)."""
    return launched_cuda_kernels
