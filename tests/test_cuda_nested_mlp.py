"""nested_mlp on CUDA against flextron.reference: the CUTLASS prefix GEMMs, their cuBLAS
fallback and the fused activation pass; the backward is ops.py's formula on CUDA tensors.

Tolerances by comparison (tests/utils.py): fp32 close to a float64 reference; bf16/fp16 error
at most twice PyTorch's own at that precision.  Tests marked `cuda` skip without a GPU; the
registration check runs wherever the extension was built with CUDA.
"""

from __future__ import annotations

import pytest
import torch

from flextron import _C, ops, reference
from tests.test_cuda_nested_linear import _cuda_kernel_names
from tests.test_nested_mlp import forward_and_grads, make_inputs
from tests.utils import assert_matches_reference, poison_cuda_cache

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = reference.ACTIVATIONS
# (lead, hidden, d_ff, width): multiples of 8 take the CUTLASS GEMMs for every dtype; odd
# sizes take the cuBLAS fallback for 16-bit types (fp32 always takes CUTLASS's SIMT GEMM).
SHAPES = [
    ((64,), 128, 256, 192),
    ((2, 5), 64, 128, 128),
    ((1,), 256, 512, 64),
    ((83,), 24, 96, 40),
    ((7,), 83, 769, 83),
    ((300,), 40, 65, 1),
]


def check_against_reference(inputs, width: int, activation: str) -> None:
    """Output and gradients: ours, PyTorch's at the same precision, and float64."""
    double = tuple(None if t is None else t.double() for t in inputs)
    y, grads, grad_out = forward_and_grads(ops.nested_mlp, inputs, width, activation)
    y_low, grads_low, _ = forward_and_grads(reference.nested_mlp, inputs, width, activation, grad_out)
    y64, grads64, _ = forward_and_grads(reference.nested_mlp, double, width, activation, grad_out.double())
    for ours, theirs, exact in zip((y, *grads), (y_low, *grads_low), (y64, *grads64), strict=True):
        assert_matches_reference(ours, theirs, exact)


def test_cuda_kernel_registered_when_built():
    if not _C.build_info()["cuda_built"]:
        pytest.skip("built without CUDA")
    assert "CUDA" in ops.backends("nested_mlp")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(dtype, activation, shape):
    lead, hidden, d_ff, width = shape
    inputs = make_inputs(lead, hidden, d_ff, activation, dtype=dtype, seed=d_ff, device="cuda")
    check_against_reference(inputs, width, activation)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_non_contiguous_inputs(dtype, activation):
    # Transposed views of padded buffers: x rows and the weights have non-unit inner strides.
    inputs = make_inputs((83,), 64, 128, activation, dtype=dtype, contiguous=False, device="cuda")
    assert not inputs[0].is_contiguous() and not inputs[2].is_contiguous()
    check_against_reference(inputs, 64, activation)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_x_column_slice_and_batched_view(dtype):
    # x as a column slice of a wider tensor (rows keep a wide stride) and as a transposed batch.
    _, w_gate, w_up, w_down = make_inputs((1,), 128, 256, dtype=dtype, device="cuda")
    base = torch.randn(3, 5, 136, device="cuda").to(dtype)
    for x in (base[..., :128], base.transpose(0, 1)[..., 8:]):
        assert ops.nested_mlp(x, w_gate, w_up, w_down, 192, "swiglu").shape == x.shape
        check_against_reference((x, w_gate, w_up, w_down), 192, "swiglu")


@pytest.mark.cuda
def test_weight_grads_exactly_zero_outside_prefix():
    inputs = make_inputs((9,), 64, 256, device="cuda")
    _, (_, grad_gate, grad_up, grad_down), _ = forward_and_grads(ops.nested_mlp, inputs, 128, "swiglu")
    assert torch.count_nonzero(grad_gate[128:]) == 0 and torch.count_nonzero(grad_up[128:]) == 0
    assert torch.count_nonzero(grad_down[:, 128:]) == 0 and torch.count_nonzero(grad_up[:128]) > 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,width", [(128, 192), (83, 83)])
def test_no_uninitialised_memory_leaks_out(dtype, hidden, width):
    # A buffer the op reads before it writes (a hidden column, an output row) shows up as NaN.
    inputs = make_inputs((37,), hidden, 256, "swiglu", dtype=dtype, device="cuda")
    poison_cuda_cache(dtype)
    y = ops.nested_mlp(*inputs, width, "swiglu")
    assert torch.isfinite(y).all()
    check_against_reference(inputs, width, "swiglu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_input(dtype):
    x = torch.empty(0, 4, 64, device="cuda", dtype=dtype)
    _, w_gate, w_up, w_down = make_inputs((1,), 64, 128, dtype=dtype, device="cuda")
    assert ops.nested_mlp(x, w_gate, w_up, w_down, 64, "swiglu").shape == (0, 4, 64)


@pytest.mark.cuda
def test_weight_prefix_is_read_in_place():
    # A copy of one weight prefix would be 16 MiB; the op's buffers are 64 KiB each.
    x, w_gate, w_up, w_down = make_inputs((8,), 4096, 4096, dtype=torch.bfloat16, device="cuda")
    ops.nested_mlp(x, w_gate, w_up, w_down, 2048, "swiglu")  # warm-up (CUTLASS/cuBLAS set-up)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ops.nested_mlp(x, w_gate, w_up, w_down, 2048, "swiglu")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 1 << 20


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_shapes_run_cutlass_and_one_activation_pass(dtype, monkeypatch):
    monkeypatch.setenv("FLEXTRON_PREFIX_GEMM", "cutlass")  # auto takes cuBLAS on Hopper
    x, w_gate, w_up, w_down = make_inputs((64,), 256, 512, dtype=dtype, device="cuda")
    names = _cuda_kernel_names(lambda: ops.nested_mlp(x, w_gate, w_up, w_down, 192, "swiglu"))
    assert sum("cutlass::gemm::kernel::Gemm<" in name for name in names) == 3, names
    assert sum("activate_in_place" in name for name in names) == 1, names


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
def test_opcheck(dtype, activation):
    inputs = make_inputs((3, 5), 64, 128, activation, dtype=dtype, device="cuda")
    args = tuple(None if t is None else t.requires_grad_() for t in inputs)
    torch.library.opcheck(torch.ops.flextron.nested_mlp.default, (*args, 72, activation))


@pytest.mark.cuda
def test_torch_compile_fullgraph():
    inputs = make_inputs((4, 16), 128, 256, dtype=torch.bfloat16, device="cuda")

    def layer(x, w_gate, w_up, w_down):
        return ops.nested_mlp(x, w_gate, w_up, w_down, 192, "swiglu") + x

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), layer(*inputs))


@pytest.mark.cuda
def test_bad_input_names_the_argument():
    x, w_gate, w_up, w_down = make_inputs((6,), 64, 128, device="cuda")
    with pytest.raises(RuntimeError, match="w_up is on"):
        ops.nested_mlp(x, w_gate, w_up.cpu(), w_down, 64, "swiglu")
    with pytest.raises(RuntimeError, match="w_gate has dtype"):
        ops.nested_mlp(x, w_gate.half(), w_up, w_down, 64, "swiglu")
    with pytest.raises(RuntimeError, match=r"width must be in \[1, 128\]"):
        ops.nested_mlp(x, w_gate, w_up, w_down, 129, "swiglu")
    with pytest.raises(RuntimeError, match="w_down must be"):
        ops.nested_mlp(x, w_gate, w_up, w_down[:, :100], 64, "swiglu")
    with pytest.raises(RuntimeError, match="needs w_gate"):
        ops.nested_mlp(x, None, w_up, w_down, 64, "swiglu")
    with pytest.raises(RuntimeError, match="activation must be"):
        ops.nested_mlp(x, None, w_up, w_down, 64, "silu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["cutlass", "cublas"])
@pytest.mark.parametrize("lead", [(2048,), (3,)])
def test_each_gemm_path_with_k_tails(dtype, path, lead, monkeypatch):
    """Each forced GEMM (FLEXTRON_PREFIX_GEMM) on many tiles and on decode-sized M, with K
    tails: K = D = 264 in the up/gate GEMMs, K = width = 712 in the down GEMM."""
    monkeypatch.setenv("FLEXTRON_PREFIX_GEMM", path)
    inputs = make_inputs(lead, 264, 1024, "swiglu", dtype=dtype, seed=5, device="cuda")
    check_against_reference(inputs, 712, "swiglu")
