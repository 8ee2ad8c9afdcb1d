"""nested_linear on CUDA against flextron.reference (the CUTLASS kernel and its fallback).

Tolerances by comparison: our error against an fp64 reference must stay within twice
PyTorch's own error at the same precision (plus a small absolute floor).  Every test but
the build check skips without a GPU; the skip condition is a string, so nothing touches
CUDA when the module is imported.
"""

from __future__ import annotations

import pytest
import torch

from flextron import _C, ops, reference

needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA device")
pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ABS_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _assert_as_accurate_as_torch(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
    """|ours - exact| <= 2 |theirs - exact| + floor, elementwise maxima."""
    assert ours.shape == exact.shape and ours.dtype == theirs.dtype
    our_err = (ours.double() - exact).abs().max().item()
    their_err = (theirs.double() - exact).abs().max().item()
    assert our_err <= 2 * their_err + ABS_FLOOR[ours.dtype], (our_err, their_err)


def _cuda_kernel_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def test_cuda_kernel_registered_when_built():
    if not _C.build_info()["cuda_built"]:
        pytest.skip("built without CUDA")
    assert "CUDA" in ops.backends("nested_linear")


# (tokens, out_total, in_total, out_features, in_features): aligned shapes take the
# 16-byte CUTLASS kernel; odd ones take the fallback for 16-bit types (fp32 always
# takes the SIMT kernel, which needs no alignment).
SHAPES = [
    (64, 256, 128, 192, 96),
    (1, 128, 64, 128, 64),
    (300, 512, 256, 64, 256),
    (7, 83, 769, 83, 769),
    (83, 769, 7, 5, 7),
    (769, 96, 83, 40, 83),
]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_matches_reference(dtype, shape, with_bias):
    tokens, out_total, in_total, out_f, in_f = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, in_total + 8, device="cuda", generator=gen).to(dtype)  # wider than in
    weight = (torch.randn(out_total, in_total, device="cuda", generator=gen) / in_total**0.5).to(dtype)
    bias = torch.randn(out_total, device="cuda", generator=gen).to(dtype) if with_bias else None
    ours = ops.nested_linear(x, weight, bias, out_f, in_f)
    theirs = reference.nested_linear(x, weight, bias, out_f, in_f)
    exact = reference.nested_linear(
        x.double(), weight.double(), None if bias is None else bias.double(), out_f, in_f
    )
    _assert_as_accurate_as_torch(ours, theirs, exact)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_batched_x(dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    weight = torch.randn(128, 256, device="cuda", generator=gen).to(dtype)
    bias = torch.randn(128, device="cuda", generator=gen).to(dtype)
    base = torch.randn(3, 5, 320, device="cuda", generator=gen).to(dtype)
    cases = [
        base[..., :256],  # a column slice: rows stay a view with a wide stride
        base.transpose(0, 1)[..., 8:264],  # not viewable as rows: reshape copies x
        base[..., 1:257],  # misaligned by one element: the fallback
    ]
    for x in cases:
        ours = ops.nested_linear(x, weight, bias, 64, 192)
        assert ours.shape == (*x.shape[:-1], 64)
        theirs = reference.nested_linear(x, weight, bias, 64, 192)
        exact = reference.nested_linear(x.double(), weight.double(), bias.double(), 64, 192)
        _assert_as_accurate_as_torch(ours, theirs, exact)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_and_misaligned_weight(dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(33, 128, device="cuda", generator=gen).to(dtype)
    weights = [
        torch.randn(128, 96, device="cuda", generator=gen).to(dtype).t(),  # (96, 128), column-major
        torch.randn(96, 129, device="cuda", generator=gen).to(dtype)[:, 1:],  # offset by one element
    ]
    for weight in weights:
        ours = ops.nested_linear(x, weight, None, 64, 120)
        theirs = reference.nested_linear(x, weight, None, 64, 120)
        exact = reference.nested_linear(x.double(), weight.double(), None, 64, 120)
        _assert_as_accurate_as_torch(ours, theirs, exact)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows(dtype):
    x = torch.empty(0, 4, 64, device="cuda", dtype=dtype)
    weight = torch.randn(32, 64, device="cuda", dtype=dtype)
    assert ops.nested_linear(x, weight, None, 16, 64).shape == (0, 4, 16)


@needs_cuda
def test_weight_prefix_is_read_in_place():
    # A copy of the weight prefix would be 8 MiB; the output is 64 KiB.
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    ops.nested_linear(x, weight, None, 2048, 2048)  # warm-up (CUTLASS/cuBLAS set-up)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ops.nested_linear(x, weight, None, 2048, 2048)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 1 << 20


@pytest.fixture(params=["auto", "cutlass", "cublas"])
def prefix_gemm(request, monkeypatch):
    """Runs a test under each FLEXTRON_PREFIX_GEMM setting (which GEMM nested_linear and
    nested_mlp run)."""
    monkeypatch.setenv("FLEXTRON_PREFIX_GEMM", request.param)
    return request.param


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 1024, 512, 1024, 264), (16, 2048, 1024, 1536, 1024)])
def test_every_gemm_path_matches_reference(dtype, shape, prefix_gemm):
    """Each forced path and auto, with a bias; adds a many-tile case with a K tail (in = 264)
    and a decode-sized one."""
    test_forward_matches_reference(dtype, shape, with_bias=True)


def _runs_cutlass(dtype, rows) -> bool:
    x = torch.randn(rows, 256, device="cuda", dtype=dtype)
    weight = torch.randn(256, 256, device="cuda", dtype=dtype)
    names = _cuda_kernel_names(lambda: ops.nested_linear(x, weight, None, 128, 192))
    return any("cutlass::gemm::kernel::Gemm<" in name for name in names)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemm_dispatch(dtype, prefix_gemm):
    """auto: CUTLASS for fp32; for 16-bit types cuBLAS on compute capability 9.x (its wgmma
    kernels) and for decode-sized M (<= 16 rows), CUTLASS otherwise. The forced settings win."""
    hopper = torch.cuda.get_device_capability()[0] == 9
    for rows in (64, 16, 1):
        if prefix_gemm == "auto":
            expected = dtype == torch.float32 or (rows > 16 and not hopper)
        else:
            expected = prefix_gemm == "cutlass"
        assert _runs_cutlass(dtype, rows) == expected, rows


@needs_cuda
def test_unknown_gemm_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("FLEXTRON_PREFIX_GEMM", "fast")
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="FLEXTRON_PREFIX_GEMM must be auto, cutlass or cublas"):
        ops.nested_linear(x, torch.randn(8, 8, device="cuda"), None, 8, 8)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_aligned_shapes_run_cutlass(dtype, monkeypatch):
    monkeypatch.setenv("FLEXTRON_PREFIX_GEMM", "cutlass")
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    weight = torch.randn(256, 256, device="cuda", dtype=dtype)
    names = _cuda_kernel_names(lambda: ops.nested_linear(x, weight, None, 128, 192))
    assert any("cutlass::gemm::kernel::Gemm<" in name for name in names), names


@needs_cuda
def test_misaligned_16bit_shapes_fall_back():
    x = torch.randn(64, 83, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(83, 83, device="cuda", dtype=torch.bfloat16)
    names = _cuda_kernel_names(lambda: ops.nested_linear(x, weight, None, 83, 83))
    assert names and not any("cutlass::gemm::kernel::Gemm<" in name for name in names), names


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(24, 128, 96, 64, 80), (7, 83, 769, 83, 769)])
def test_backward_matches_reference(dtype, shape):
    tokens, out_total, in_total, out_f, in_f = shape
    gen = torch.Generator(device="cuda").manual_seed(3)
    inputs = [
        torch.randn(tokens, in_total, device="cuda", generator=gen).to(dtype),
        (torch.randn(out_total, in_total, device="cuda", generator=gen) / in_total**0.5).to(dtype),
        torch.randn(out_total, device="cuda", generator=gen).to(dtype),
    ]
    grad_y = torch.randn(tokens, out_f, device="cuda", generator=gen).to(dtype)

    def grads(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        fn(*leaves, out_f, in_f).backward(grad_y.to(leaves[0].dtype))
        return [leaf.grad for leaf in leaves]

    ours = grads(ops.nested_linear, inputs)
    theirs = grads(reference.nested_linear, inputs)
    exact = grads(reference.nested_linear, [t.double() for t in inputs])
    for our_grad, their_grad, exact_grad in zip(ours, theirs, exact, strict=True):
        _assert_as_accurate_as_torch(our_grad, their_grad, exact_grad)
    # The inactive part of the weight and bias gets an exactly-zero gradient.
    assert not ours[1][out_f:].any() and not ours[1][:, in_f:].any() and not ours[2][out_f:].any()


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(dtype, with_bias):
    x = torch.randn(2, 9, 136, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(96, 136, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(96, device="cuda", dtype=dtype, requires_grad=True) if with_bias else None
    torch.library.opcheck(torch.ops.flextron.nested_linear.default, (x, weight, bias, 64, 128))


@needs_cuda
def test_torch_compile_fullgraph():
    x = torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(192, 256, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(192, device="cuda", dtype=torch.bfloat16)

    def layer(x, weight, bias):
        return torch.nn.functional.silu(ops.nested_linear(x, weight, bias, 128, 192))

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, bias), layer(x, weight, bias))


@needs_cuda
def test_bad_input_names_the_argument():
    x = torch.randn(4, 64, device="cuda")
    weight = torch.randn(32, 64, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on"):
        ops.nested_linear(x, weight.cpu(), None, 32, 64)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        ops.nested_linear(x, weight.half(), None, 32, 64)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.nested_linear(x.int(), weight.int(), None, 32, 64)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.nested_linear(x, weight, None, 33, 64)
    with pytest.raises(RuntimeError, match="in_features"):
        ops.nested_linear(x, weight, None, 32, 0)
    with pytest.raises(RuntimeError, match="fewer than in_features"):
        ops.nested_linear(x[:, :32], weight, None, 32, 64)
    with pytest.raises(RuntimeError, match="bias has 31 entries"):
        ops.nested_linear(x, weight, torch.randn(31, device="cuda"), 32, 64)
    with pytest.raises(RuntimeError, match="bias is on"):
        ops.nested_linear(x, weight, torch.randn(32), 32, 64)
