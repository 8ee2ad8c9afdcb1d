"""Which backends each op has (ops.backends), and the error for a device without a kernel."""

from __future__ import annotations

import pytest
import torch

from flextron import ops

# The forward ops and the backward ops that have their own CUDA kernels.
CUDA_OPS = (*ops.OP_NAMES, "routed_nested_mlp_backward", "varhead_attention_backward")


@pytest.mark.parametrize("op_name", ops.OP_NAMES)
def test_every_op_has_a_cpu_kernel(op_name):
    assert "CPU" in ops.backends(op_name)


@pytest.mark.cuda
@pytest.mark.parametrize("op_name", CUDA_OPS)
def test_cuda_kernel_registered(op_name):
    assert "CUDA" in ops.backends(op_name)


@pytest.mark.cuda
def test_missing_kernel_is_an_error_not_a_cpu_fallback(monkeypatch):
    """A build without an op's CUDA kernel (here: as if) says so instead of running on the CPU."""
    monkeypatch.setattr(ops, "backends", lambda op_name: ["CPU"])
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(NotImplementedError, match="flextron.nested_linear: not built for CUDA yet"):
        ops.nested_linear(x, torch.randn(8, 8, device="cuda"))
