"""nested_linear against flextron.ops.reference: forward, backward, odd sizes and strides, opcheck,
torch.compile and bad input on every device; the CPU's few-rows kernel; on CUDA the GEMM paths
(the CUTLASS kernel, its cuBLAS fallback), their dispatch and in-place weight reads.

Two tolerance rules (tests/ops/conftest.py): assert_matches_reference (fp32 close to float64; 16-bit
error at most twice PyTorch's own) and assert_as_accurate_as_torch (twice PyTorch's error plus a
per-dtype floor, ABS_FLOOR).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import ops
from flextron.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ABS_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make_inputs(lead, in_x, out_w, in_w, dtype, *, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_x, generator=g).to(device, dtype)
    weight = torch.randn(out_w, in_w, generator=g).div(in_w**0.5).to(device, dtype)
    b = torch.randn(out_w, generator=g).to(device, dtype) if bias else None
    return x, weight, b


def grads(fn, x, weight, bias, out_f, in_f, seed=1):
    leaves = [
        t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())
    ]
    y = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, out_f, in_f)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    return y, torch.autograd.grad(y, leaves, grad_y)


@pytest.fixture(scope="session")
def check_against_reference(assert_matches_reference):
    """Handed to the tests as a fixture: it needs assert_matches_reference."""

    def check_against_reference(x, weight, bias, out_f, in_f):
        y, g = grads(ops.nested_linear, x, weight, bias, out_f, in_f)
        y_ref, g_ref = grads(reference.nested_linear, x, weight, bias, out_f, in_f)
        hi = [t.double() if t is not None else None for t in (x, weight, bias)]
        y_exact, g_exact = grads(reference.nested_linear, *hi, out_f, in_f)
        assert_matches_reference(y, y_ref, y_exact)
        for ours, theirs, exact in zip(g, g_ref, g_exact, strict=True):
            assert_matches_reference(ours, theirs, exact)

    return check_against_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lead,in_x,out_w,in_w,out_f,in_f",
    [
        ((7,), 83, 769, 83, 769, 83),
        ((2, 7), 83, 769, 83, 384, 64),
        ((83,), 100, 96, 90, 7, 83),
        ((1,), 8, 8, 8, 1, 1),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(check_against_reference, dtype, lead, in_x, out_w, in_w, out_f, in_f, bias):
    check_against_reference(*make_inputs(lead, in_x, out_w, in_w, dtype, bias=bias), out_f, in_f)


def test_inactive_weight_gradient_is_exactly_zero():
    x, weight, bias = make_inputs((5,), 16, 32, 16, torch.float32)
    _, (gx, gw, gb) = grads(ops.nested_linear, x, weight, bias, 8, 12)
    assert gw[8:].abs().max() == 0 and gw[:, 12:].abs().max() == 0 and gb[8:].abs().max() == 0
    assert gx[:, 12:].abs().max() == 0


def test_non_contiguous_inputs(check_against_reference):
    x, weight, bias = make_inputs((40,), 24, 48, 32, torch.float32)
    x_t = x.t().contiguous().t()  # (40, 24) column-major
    weight_t = weight.t().contiguous().t()  # (48, 32) column-major view
    check_against_reference(x_t, weight_t, bias, 20, 24)
    check_against_reference(x[::2], weight[:, ::1], bias, 48, 16)


def test_reads_weight_prefix_without_copy():
    # The kernel only narrows views; the output must not alias any input.
    x, weight, bias = make_inputs((4,), 16, 32, 16, torch.float32)
    y = ops.nested_linear(x, weight, bias, 8, 16)
    assert y.data_ptr() not in (x.data_ptr(), weight.data_ptr(), bias.data_ptr())


@settings(max_examples=15, deadline=None)
@given(
    tokens=st.integers(1, 40),
    out_w=st.integers(1, 70),
    in_w=st.integers(1, 70),
    data=st.data(),
)
def test_hypothesis_shapes(check_against_reference, tokens, out_w, in_w, data):
    out_f = data.draw(st.integers(1, out_w))
    in_f = data.draw(st.integers(1, in_w))
    extra = data.draw(st.integers(0, 3))
    check_against_reference(*make_inputs((tokens,), in_w + extra, out_w, in_w, torch.float32), out_f, in_f)


def test_torch_compile_fullgraph():
    x, weight, bias = make_inputs((6,), 12, 16, 12, torch.float32)
    fn = torch.compile(
        lambda x, w, b: ops.nested_linear(x, w, b, 8, 10).relu().sum(), fullgraph=True, backend="aot_eager"
    )
    weight.requires_grad_()
    fn(x, weight, bias).backward()
    expected = weight.detach().clone().requires_grad_()
    reference.nested_linear(x, expected, bias, 8, 10).relu().sum().backward()
    torch.testing.assert_close(weight.grad, expected.grad)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "out_features": 0}, "out_features"),
        (lambda a: {**a, "out_features": 17}, "out_features"),
        (lambda a: {**a, "in_features": 0}, "in_features"),
        (lambda a: {**a, "in_features": 13}, "in_features"),
        (lambda a: {**a, "x": a["x"][:, :4]}, "x"),
        (lambda a: {**a, "x": a["x"].double()}, "x"),
        (lambda a: {**a, "x": a["x"].long()}, "x"),
        (lambda a: {**a, "weight": a["weight"].bfloat16()}, "weight"),
        (lambda a: {**a, "weight": a["weight"][0]}, "weight"),
        (lambda a: {**a, "bias": a["bias"][:5]}, "bias"),
        (lambda a: {**a, "bias": a["bias"].bfloat16()}, "bias"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    x, weight, bias = make_inputs((3,), 12, 16, 12, torch.float32)
    args = mutate(dict(x=x, weight=weight, bias=bias, out_features=8, in_features=10))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flextron.nested_linear(**args)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])  # 1-4: the few-rows (decode) kernel; 5: the BLAS
@pytest.mark.parametrize("out_f,in_f", [(769, 83), (7, 7), (96, 64), (33, 1), (40, 200)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "dtype,bf16_dot",
    [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "portable")],
    ids=["fp32", "bf16", "bf16-portable"],
)
def test_few_rows_match_reference(
    check_against_reference, assert_matches_reference, monkeypatch, rows, out_f, in_f, bias, dtype, bf16_dot
):
    # bf16: AVX-512 BF16 dot products where the CPU has them ("auto"), else and with
    # FLEXTRON_BF16_DOT=portable each weight widened to fp32; fp32 sums either way.
    monkeypatch.setenv("FLEXTRON_BF16_DOT", bf16_dot)
    # A prefix of a wider weight: rows of the weight are `in_f` values, `in_f + 9` apart.
    x, weight, b = make_inputs((rows,), in_f + 3, out_f + 5, in_f + 9, dtype, bias=bias)
    check_against_reference(x, weight, b, out_f, in_f)
    # x with a row stride other than its width (a column slice of a wider activation).
    wide = torch.randn(rows, in_f + 20)[:, 5 : 5 + in_f].to(dtype)
    ours, theirs = (
        ops.nested_linear(wide, weight, b, out_f, in_f),
        reference.nested_linear(wide, weight, b, out_f, in_f),
    )
    exact = reference.nested_linear(
        wide.double(), weight.double(), None if b is None else b.double(), out_f, in_f
    )
    assert_matches_reference(ours, theirs, exact)


@pytest.mark.parametrize("in_f", [100, 463, 590])  # gaps of 1000, 274 and 20 bytes between the prefixes
@pytest.mark.parametrize("bf16_dot", ["auto", "portable"])
def test_one_row_on_short_prefixes_of_long_rows(check_against_reference, monkeypatch, in_f, bf16_dot):
    """One bf16 row against prefixes much shorter than the weight rows: the kernel reads several
    rows side by side there (skinny_gemm.h, kFollowedGapBytes), one at a time near the full width."""
    monkeypatch.setenv("FLEXTRON_BF16_DOT", bf16_dot)
    x, weight, b = make_inputs((1,), in_f, 45, 600, torch.bfloat16)
    check_against_reference(x, weight, b, 45, in_f)


def test_unknown_bf16_dot_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("FLEXTRON_BF16_DOT", "fast")
    x, weight, b = make_inputs((1,), 64, 32, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="FLEXTRON_BF16_DOT must be auto or portable"):
        ops.nested_linear(x, weight, b, 32, 64)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_matches_reference(tokens, assert_as_accurate_as_torch, device, dtype, shape, with_bias):
    tokens, out_total, in_total, out_f, in_f = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, in_total + 8, device=device, generator=gen).to(dtype)  # wider than in
    weight = (torch.randn(out_total, in_total, device=device, generator=gen) / in_total**0.5).to(dtype)
    bias = torch.randn(out_total, device=device, generator=gen).to(dtype) if with_bias else None
    ours = ops.nested_linear(x, weight, bias, out_f, in_f)
    theirs = reference.nested_linear(x, weight, bias, out_f, in_f)
    exact = reference.nested_linear(
        x.double(), weight.double(), None if bias is None else bias.double(), out_f, in_f
    )
    assert_as_accurate_as_torch(ours, theirs, exact, ABS_FLOOR[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_batched_x(assert_as_accurate_as_torch, device, dtype):
    gen = torch.Generator(device=device).manual_seed(1)
    weight = torch.randn(128, 256, device=device, generator=gen).to(dtype)
    bias = torch.randn(128, device=device, generator=gen).to(dtype)
    base = torch.randn(3, 5, 320, device=device, generator=gen).to(dtype)
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
        assert_as_accurate_as_torch(ours, theirs, exact, ABS_FLOOR[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_and_misaligned_weight(assert_as_accurate_as_torch, device, dtype):
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(33, 128, device=device, generator=gen).to(dtype)
    weights = [
        torch.randn(128, 96, device=device, generator=gen).to(dtype).t(),  # (96, 128), column-major
        torch.randn(96, 129, device=device, generator=gen).to(dtype)[:, 1:],  # offset by one element
    ]
    for weight in weights:
        ours = ops.nested_linear(x, weight, None, 64, 120)
        theirs = reference.nested_linear(x, weight, None, 64, 120)
        exact = reference.nested_linear(x.double(), weight.double(), None, 64, 120)
        assert_as_accurate_as_torch(ours, theirs, exact, ABS_FLOOR[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows(device, dtype):
    x = torch.empty(0, 4, 64, device=device, dtype=dtype)
    weight = torch.randn(32, 64, device=device, dtype=dtype)
    assert ops.nested_linear(x, weight, None, 16, 64).shape == (0, 4, 16)


@pytest.mark.cuda
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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 1024, 512, 1024, 264), (16, 2048, 1024, 1536, 1024)])
def test_every_gemm_path_matches_reference(dtype, shape, prefix_gemm):
    """Each forced path and auto, with a bias; adds a many-tile case with a K tail (in = 264)
    and a decode-sized one."""
    test_forward_matches_reference("cuda", dtype, shape, with_bias=True)


@pytest.fixture(scope="session")
def _runs_cutlass(cuda_kernel_names):
    """Handed to the tests as a fixture: it needs cuda_kernel_names."""

    def _runs_cutlass(dtype, rows) -> bool:
        x = torch.randn(rows, 256, device="cuda", dtype=dtype)
        weight = torch.randn(256, 256, device="cuda", dtype=dtype)
        names = cuda_kernel_names(lambda: ops.nested_linear(x, weight, None, 128, 192))
        return any("cutlass::gemm::kernel::Gemm<" in name for name in names)

    return _runs_cutlass


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemm_dispatch(_runs_cutlass, dtype, prefix_gemm):
    """auto: CUTLASS for fp32; for 16-bit types cuBLAS on compute capability 9.x (its wgmma
    kernels) and for decode-sized M (<= 16 rows), CUTLASS otherwise. The forced settings win."""
    hopper = torch.cuda.get_device_capability()[0] == 9
    for rows in (64, 16, 1):
        if prefix_gemm == "auto":
            expected = dtype == torch.float32 or (rows > 16 and not hopper)
        else:
            expected = prefix_gemm == "cutlass"
        assert _runs_cutlass(dtype, rows) == expected, rows


@pytest.mark.cuda
def test_unknown_gemm_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("FLEXTRON_PREFIX_GEMM", "fast")
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="FLEXTRON_PREFIX_GEMM must be auto, cutlass or cublas"):
        ops.nested_linear(x, torch.randn(8, 8, device="cuda"), None, 8, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_aligned_shapes_run_cutlass(cuda_kernel_names, dtype, monkeypatch):
    monkeypatch.setenv("FLEXTRON_PREFIX_GEMM", "cutlass")
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    weight = torch.randn(256, 256, device="cuda", dtype=dtype)
    names = cuda_kernel_names(lambda: ops.nested_linear(x, weight, None, 128, 192))
    assert any("cutlass::gemm::kernel::Gemm<" in name for name in names), names


@pytest.mark.cuda
def test_misaligned_16bit_shapes_fall_back(cuda_kernel_names):
    x = torch.randn(64, 83, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(83, 83, device="cuda", dtype=torch.bfloat16)
    names = cuda_kernel_names(lambda: ops.nested_linear(x, weight, None, 83, 83))
    assert names and not any("cutlass::gemm::kernel::Gemm<" in name for name in names), names


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(24, 128, 96, 64, 80), (7, 83, 769, 83, 769)])
def test_backward_matches_reference(tokens, assert_as_accurate_as_torch, device, dtype, shape):
    tokens, out_total, in_total, out_f, in_f = shape
    gen = torch.Generator(device=device).manual_seed(3)
    inputs = [
        torch.randn(tokens, in_total, device=device, generator=gen).to(dtype),
        (torch.randn(out_total, in_total, device=device, generator=gen) / in_total**0.5).to(dtype),
        torch.randn(out_total, device=device, generator=gen).to(dtype),
    ]
    grad_y = torch.randn(tokens, out_f, device=device, generator=gen).to(dtype)

    def grads(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        fn(*leaves, out_f, in_f).backward(grad_y.to(leaves[0].dtype))
        return [leaf.grad for leaf in leaves]

    ours = grads(ops.nested_linear, inputs)
    theirs = grads(reference.nested_linear, inputs)
    exact = grads(reference.nested_linear, [t.double() for t in inputs])
    for our_grad, their_grad, exact_grad in zip(ours, theirs, exact, strict=True):
        assert_as_accurate_as_torch(our_grad, their_grad, exact_grad, ABS_FLOOR[dtype])
    # The inactive part of the weight and bias gets an exactly-zero gradient.
    assert not ours[1][out_f:].any() and not ours[1][:, in_f:].any() and not ours[2][out_f:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(device, dtype, with_bias):
    """Schema, fake kernel and autograd registration, with and without gradients, for a prefix of
    the weight and for all of it."""
    x, weight, bias = make_inputs((2, 9), 136, 96, 136, dtype, device=device, bias=with_bias)
    for out_f, in_f in [(64, 128), (96, 136)]:
        for requires_grad in (False, True):
            args = [
                None if t is None else t.detach().clone().requires_grad_(requires_grad)
                for t in (x, weight, bias)
            ]
            torch.library.opcheck(torch.ops.flextron.nested_linear.default, (*args, out_f, in_f))


@pytest.mark.cuda
def test_torch_compile_inductor():
    x = torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(192, 256, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(192, device="cuda", dtype=torch.bfloat16)

    def layer(x, weight, bias):
        return torch.nn.functional.silu(ops.nested_linear(x, weight, bias, 128, 192))

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, bias), layer(x, weight, bias))


@pytest.mark.cuda
def test_bad_input_on_cuda_names_the_argument():
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
