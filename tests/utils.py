"""Shared test helpers: device markers and the low-precision tolerance rule."""

from __future__ import annotations

import torch

FP32_TOL = dict(atol=1e-5, rtol=1e-4)


def max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (actual.double() - exact.double()).abs().max().item() if exact.numel() else 0.0


def assert_matches_reference(
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


def poison_cuda_cache(dtype: torch.dtype) -> None:
    """Fill freed blocks of both pools of PyTorch's CUDA caching allocator with NaN, so that a
    kernel that reads a buffer it never wrote (an output element it skipped) returns NaN."""
    small = (1 << 19) // torch.tensor([], dtype=dtype).element_size()  # 512 KiB: the small pool
    blocks = [torch.full((small,), float("nan"), dtype=dtype, device="cuda") for _ in range(8)]
    blocks.append(torch.full((1 << 26,), float("nan"), dtype=dtype, device="cuda"))  # the large pool
    del blocks
