"""nested_linear against the reference: forward, backward, opcheck, compile, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import ops, reference
from tests.utils import assert_matches_reference


def make_inputs(lead, in_x, out_w, in_w, dtype, device="cpu", bias=True, seed=0):
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


def check_against_reference(x, weight, bias, out_f, in_f):
    y, g = grads(ops.nested_linear, x, weight, bias, out_f, in_f)
    y_ref, g_ref = grads(reference.nested_linear, x, weight, bias, out_f, in_f)
    hi = [t.double() if t is not None else None for t in (x, weight, bias)]
    y_exact, g_exact = grads(reference.nested_linear, *hi, out_f, in_f)
    assert_matches_reference(y, y_ref, y_exact)
    for ours, theirs, exact in zip(g, g_ref, g_exact, strict=True):
        assert_matches_reference(ours, theirs, exact)


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
def test_matches_reference(dtype, lead, in_x, out_w, in_w, out_f, in_f, bias):
    check_against_reference(*make_inputs(lead, in_x, out_w, in_w, dtype, bias=bias), out_f, in_f)


def test_inactive_weight_gradient_is_exactly_zero():
    x, weight, bias = make_inputs((5,), 16, 32, 16, torch.float32)
    _, (gx, gw, gb) = grads(ops.nested_linear, x, weight, bias, 8, 12)
    assert gw[8:].abs().max() == 0 and gw[:, 12:].abs().max() == 0 and gb[8:].abs().max() == 0
    assert gx[:, 12:].abs().max() == 0


def test_non_contiguous_inputs():
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
def test_hypothesis_shapes(tokens, out_w, in_w, data):
    out_f = data.draw(st.integers(1, out_w))
    in_f = data.draw(st.integers(1, in_w))
    extra = data.draw(st.integers(0, 3))
    check_against_reference(*make_inputs((tokens,), in_w + extra, out_w, in_w, torch.float32), out_f, in_f)


def test_opcheck():
    x, weight, bias = make_inputs((3, 5), 12, 16, 12, torch.float32)
    for args in [(x, weight, bias, 8, 10), (x, weight, None, 16, 12)]:
        for requires_grad in (False, True):
            args_rg = tuple(
                t.detach().clone().requires_grad_(requires_grad) if isinstance(t, torch.Tensor) else t
                for t in args
            )
            torch.library.opcheck(torch.ops.flextron.nested_linear.default, args_rg)


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
@pytest.mark.parametrize("out_f,in_f", [(769, 83), (7, 7), (96, 64), (33, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_match_reference(rows, out_f, in_f, bias):
    # A prefix of a wider weight: rows of the weight are `in_f` floats, `in_f + 9` apart.
    x, weight, b = make_inputs((rows,), in_f + 3, out_f + 5, in_f + 9, torch.float32, bias=bias)
    check_against_reference(x, weight, b, out_f, in_f)
    # x with a row stride other than its width (a column slice of a wider activation).
    wide = torch.randn(rows, in_f + 20)[:, 5 : 5 + in_f]
    torch.testing.assert_close(
        ops.nested_linear(wide, weight, b, out_f, in_f), reference.nested_linear(wide, weight, b, out_f, in_f)
    )
