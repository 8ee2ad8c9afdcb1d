"""nested_linear_int8 against flextron.ops.reference: forward and backward on every device, the CPU's
few-row kernels (VNNI on x rounded to int16, AVX-512 and AVX2 widths, odd sizes, weight prefixes read
in place), the dequantizing path for more rows, opcheck and bad input."""

from __future__ import annotations

import pytest
import torch

from flextron import ops
from flextron.ops import reference
from flextron.ops.extension import _C

# Where the few-row kernels take AVX-512 VNNI (FLEXTRON_INT8_DOT=auto), they read x rounded to int16.
VNNI = _C.cpu_features()["avx512_vnni"] and _C.cpu_features()["avx512bw"]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ABS_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make_inputs(lead, in_x, out_w, in_w, dtype, *, device="cpu", bias=True, seed=0):
    """(x (*lead, in_x), qweight (out_w, in_w) int8, scale (out_w,) fp32, bias (out_w,) | None)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_x, generator=g).to(device, dtype)
    qweight = torch.randint(-127, 128, (out_w, in_w), generator=g, dtype=torch.int8).to(device)
    scale = (torch.rand(out_w, generator=g) + 0.5).div(127 * in_w**0.5).to(device)
    b = torch.randn(out_w, generator=g).to(device, dtype) if bias else None
    return x, qweight, scale, b


def as_the_few_row_kernels_read(x: torch.Tensor, in_f: int, int8_dot: str) -> torch.Tensor:
    """x[..., :in_f] in fp32 as the CPU's few-row kernels read it: with VNNI each row rounded to
    int16 with the scale max|row| / levels (csrc/cpu/nested_linear_int8.cpp), else as it is."""
    x = x[..., :in_f].float()
    if not (VNNI and int8_dot == "auto"):
        return x
    levels = min(32767, (2**31 - 1) // (127 * min(in_f, 2048)))
    largest = x.abs().amax(-1, keepdim=True)  # (..., 1)
    inverse = torch.where(largest > 0, levels / largest, torch.zeros_like(largest))
    return torch.round(x * inverse) * (largest / levels)


def forward_and_grads(fn, x, qweight, scale, bias, out_f, in_f, seed=1):
    """fn's output and its gradients w.r.t. x, scale and bias (when given)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, scale) + ((bias,) if bias is not None else ())]
    y = fn(leaves[0], qweight, leaves[1], leaves[2] if bias is not None else None, out_f, in_f)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    return y, torch.autograd.grad(y, leaves, grad_y)


SHAPES = [  # (lead, in_x, out_w, in_w, out_f, in_f): whole matrices, prefixes, odd sizes, 1 x 1
    ((1,), 576, 1536, 576, 1536, 576),
    ((3,), 100, 96, 90, 37, 83),
    ((2, 2), 40, 33, 40, 33, 17),
    ((1,), 8, 8, 8, 1, 1),
    ((9,), 64, 48, 64, 48, 64),  # more rows than the few-row kernels take
    ((2, 7), 83, 129, 83, 64, 80),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(assert_as_accurate_as_torch, monkeypatch, device, dtype, shape, with_bias):
    """The output and the gradients of x, scale and bias: within twice PyTorch's own error at that
    precision of a float64 reference (PyTorch: the reference run in x's dtype).  On the CPU, the
    few-row kernels' float path (the VNNI path: test_few_row_kernels_every_tail)."""
    monkeypatch.setenv("FLEXTRON_INT8_DOT", "portable")
    lead, in_x, out_w, in_w, out_f, in_f = shape
    x, qweight, scale, bias = make_inputs(lead, in_x, out_w, in_w, dtype, device=device, bias=with_bias)
    y, grads = forward_and_grads(ops.nested_linear_int8, x, qweight, scale, bias, out_f, in_f)
    y_same, grads_same = forward_and_grads(_reference_in_dtype, x, qweight, scale, bias, out_f, in_f)
    hi = (x.double(), qweight, scale.double(), None if bias is None else bias.double())
    y_exact, grads_exact = forward_and_grads(reference.nested_linear_int8, *hi, out_f, in_f)
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    for ours, theirs, exact in zip((y, *grads), (y_same, *grads_same), (y_exact, *grads_exact), strict=True):
        assert_as_accurate_as_torch(ours, theirs.to(ours.dtype), exact.double(), ABS_FLOOR[dtype])


def _reference_in_dtype(x, qweight, scale, bias, out_f, in_f):
    """PyTorch at x's precision: the dequantized prefix in x's dtype, then a plain linear."""
    weight = (qweight[:out_f, :in_f].float() * scale[:out_f, None]).to(x.dtype)
    y = x[..., :in_f] @ weight.T
    return y if bias is None else y + bias[:out_f]


@pytest.mark.parametrize("int8_dot", ["auto", "portable"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("in_f", [1, 15, 16, 17, 31, 33, 63, 64, 65, 129, 576, 2100])
def test_few_row_kernels_every_tail(monkeypatch, int8_dot, rows, in_f):
    """The few-row kernels (and past 4 rows the dequantizing GEMM) for every tail length of the
    16-, 32-, 64- and 128-wide loops and past a VNNI chunk (2048): exact to fp32 rounding of a
    float64 product of x as they read it."""
    monkeypatch.setenv("FLEXTRON_INT8_DOT", int8_dot)
    x, qweight, scale, bias = make_inputs((rows,), 2200, 70, 2200, torch.float32, seed=in_f)
    x[0, : in_f // 2] = 0  # a row that is partly (or, at in_f 1, wholly) zero
    y = ops.nested_linear_int8(x, qweight, scale, bias, 70, in_f)
    read = as_the_few_row_kernels_read(x, in_f, int8_dot if rows <= 4 else "portable")
    exact = reference.nested_linear_int8(read.double(), qweight, scale.double(), bias.double(), 70, in_f)
    torch.testing.assert_close(y.double(), exact, atol=1e-5, rtol=1e-5)


def test_vnni_rounding_of_x_is_far_below_the_weights_own():
    """At a decode shape, the int16 rounding of x changes the output by under a twentieth of what
    rounding the weights to int8 changes (docs/ops.md)."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 1536, generator=g), torch.randn(576, 1536, generator=g) / 1536**0.5
    scale = weight.abs().amax(1) / 127
    qweight = torch.round(weight / scale[:, None]).to(torch.int8)
    int8_weights = reference.nested_linear_int8(x.double(), qweight, scale.double(), None, 576, 1536)
    weights_change = (int8_weights - x.double() @ weight.double().T).abs().max()
    y = ops.nested_linear_int8(x, qweight, scale, None, 576, 1536)
    assert (y.double() - int8_weights).abs().max() <= weights_change / 20


def test_int8_dot_setting_is_checked(monkeypatch):
    monkeypatch.setenv("FLEXTRON_INT8_DOT", "fast")
    x, qweight, scale, _ = make_inputs((1,), 64, 8, 64, torch.float32)
    with pytest.raises(RuntimeError, match="FLEXTRON_INT8_DOT must be auto or portable"):
        ops.nested_linear_int8(x, qweight, scale, None, 8, 64)


def test_weight_prefix_is_read_in_place():
    """A prefix of the int8 weight is the sub-network: no copy, and the rows and columns past the
    prefix are never read (they hold values that would change the result)."""
    x, qweight, scale, _ = make_inputs((1,), 32, 24, 32, torch.float32)
    poisoned = qweight.clone()
    poisoned[16:] = 127
    poisoned[:, 20:] = -128
    read = as_the_few_row_kernels_read(x, 20, "auto")
    for weights in (qweight, poisoned):
        y = ops.nested_linear_int8(x, weights, scale, None, 16, 20)
        torch.testing.assert_close(y, reference.nested_linear_int8(read, qweight, scale, None, 16, 20))


def test_inactive_scale_and_bias_gradients_are_exactly_zero():
    x, qweight, scale, bias = make_inputs((5,), 16, 32, 16, torch.float32)
    _, (grad_x, grad_scale, grad_bias) = forward_and_grads(
        ops.nested_linear_int8, x, qweight, scale, bias, 8, 12
    )
    assert not grad_scale[8:].any() and not grad_bias[8:].any() and not grad_x[:, 12:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(device, dtype, with_bias):
    """Schema, fake kernel and autograd registration, with and without gradients, for a prefix and
    for all of the weight, at decode (2 rows) and prefill (18 rows) sizes."""
    for lead in ((2,), (2, 9)):
        x, qweight, scale, bias = make_inputs(lead, 136, 96, 136, dtype, device=device, bias=with_bias)
        for out_f, in_f in [(64, 128), (96, 136)]:
            for requires_grad in (False, True):
                x_, scale_, bias_ = (
                    None if t is None else t.detach().clone().requires_grad_(requires_grad)
                    for t in (x, scale, bias)
                )
                torch.library.opcheck(
                    torch.ops.flextron.nested_linear_int8.default, (x_, qweight, scale_, bias_, out_f, in_f)
                )


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "qweight": a["qweight"].float()}, "qweight must be int8"),
        (lambda a: {**a, "scale": a["scale"].double()}, "scale must be float32"),
        (lambda a: {**a, "scale": a["scale"][:5]}, "scale has 5 entries"),
        (lambda a: {**a, "out_features": 33}, "out_features"),
        (lambda a: {**a, "in_features": 0}, "in_features"),
        (lambda a: {**a, "x": a["x"].int()}, "x must be float32"),
        (lambda a: {**a, "x": a["x"][:, :8]}, "fewer than in_features"),
    ],
)
def test_bad_input_names_the_argument(device, mutate, match):
    x, qweight, scale, _ = make_inputs((4,), 16, 32, 16, torch.float32, device=device, bias=False)
    args = mutate({"x": x, "qweight": qweight, "scale": scale, "out_features": 32, "in_features": 16})
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flextron.nested_linear_int8(
            args["x"], args["qweight"], args["scale"], None, args["out_features"], args["in_features"]
        )
