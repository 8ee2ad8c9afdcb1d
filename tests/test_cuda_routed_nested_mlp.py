"""routed_nested_mlp on CUDA against flextron.reference (grouped CUTLASS path and fallback).

Tolerances by comparison: our error against an fp64 reference stays within twice PyTorch's
own error at the same precision (plus a small floor).  Every test but the build check skips
without a GPU; the skip condition is a string, so nothing touches CUDA at import.
An out-of-range choice trips a device-side assert (it would poison the CUDA context), so
that case is not tested here.
"""

from __future__ import annotations

import pytest
import torch

from flextron import _C, ops, reference

needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA device")
pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = ["swiglu", "gelu", "gelu_tanh", "relu"]
ABS_FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# (tokens, hidden, ffn, widths): multiples of 8 take the grouped CUTLASS path for 16-bit
# dtypes; odd sizes and more than 32 choices take the masked fallback.
CASES = [
    (300, 64, 256, [256, 192, 64]),
    (5, 128, 128, [128, 64]),
    (83, 20, 37, [37, 20, 7]),
    (77, 16, 320, list(range(320, 0, -8))),
]


def _inputs(tokens, hidden, ffn, widths, activation, dtype, seed=0, with_scale=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)

    x = randn(tokens, hidden)
    w_gate = randn(ffn, hidden, scale=hidden**-0.5) if activation == "swiglu" else None
    w_up = randn(ffn, hidden, scale=hidden**-0.5)
    w_down = randn(hidden, ffn, scale=ffn**-0.5)
    # Skip choice 1 so that one group is empty.
    usable = torch.tensor([c for c in range(len(widths)) if c != 1 or len(widths) == 1], device="cuda")
    choice = usable[torch.randint(0, usable.numel(), (tokens,), device="cuda", generator=gen)]
    scale = torch.rand(tokens, device="cuda", generator=gen).to(dtype) if with_scale else None
    return x, w_gate, w_up, w_down, choice, widths, scale


def _assert_as_accurate_as_torch(ours, theirs, exact):
    assert ours.shape == exact.shape and ours.dtype == theirs.dtype
    our_err = (ours.double() - exact).abs().max().item()
    their_err = (theirs.double() - exact).abs().max().item()
    assert our_err <= 2 * their_err + ABS_FLOOR[ours.dtype], (our_err, their_err)


def _double(tensors):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def test_cuda_kernel_registered_when_built():
    if not _C.build_info()["cuda_built"]:
        pytest.skip("built without CUDA")
    assert "CUDA" in ops.backends("routed_nested_mlp")
    assert "CUDA" in ops.backends("routed_nested_mlp_backward")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_forward_matches_reference(dtype, activation, case, with_scale):
    args = _inputs(*case, activation, dtype, with_scale=with_scale)
    ours = ops.routed_nested_mlp(*args, activation)
    theirs = reference.routed_nested_mlp(*args, activation)
    exact = reference.routed_nested_mlp(*_double(args), activation)
    _assert_as_accurate_as_torch(ours, theirs, exact)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", CASES[:3])
def test_backward_matches_reference(dtype, activation, case):
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(*case, activation, dtype, seed=1)
    grad_y = torch.randn_like(x)
    differentiable = [x, w_gate, w_up, w_down, scale]

    def grads(fn, tensors):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
        xl, gl, ul, dl, sl = leaves
        fn(xl, gl, ul, dl, choice, widths, sl, activation).backward(grad_y.to(xl.dtype))
        return [leaf.grad for leaf in leaves if leaf is not None]

    ours = grads(ops.routed_nested_mlp, differentiable)
    theirs = grads(reference.routed_nested_mlp, differentiable)
    exact = grads(reference.routed_nested_mlp, _double(differentiable))
    for our_grad, their_grad, exact_grad in zip(ours, theirs, exact, strict=True):
        _assert_as_accurate_as_torch(our_grad, their_grad, exact_grad)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aligned_16bit_shapes_run_grouped_cutlass(dtype):
    args = _inputs(*CASES[0], "swiglu", dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.routed_nested_mlp(*args, "swiglu")
        torch.cuda.synchronize()
    names = [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("cutlass::gemm::kernel::GemmGrouped<" in name for name in names) == 2, names


@needs_cuda
def test_unused_neurons_get_exactly_zero_gradient():
    x, w_gate, w_up, w_down, choice, _, scale = _inputs(64, 32, 128, [128], "swiglu", torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (w_gate, w_up, w_down)]
    ops.routed_nested_mlp(x, *leaves, choice, [96, 40], scale, "swiglu").sum().backward()
    assert not leaves[0].grad[96:].any() and not leaves[1].grad[96:].any()
    assert not leaves[2].grad[:, 96:].any()


@needs_cuda
def test_empty_tokens_and_non_contiguous_choice():
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(0, 64, 128, [128, 64], "swiglu", torch.bfloat16)
    assert ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale).shape == (0, 64)
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(40, 64, 128, [128, 64], "swiglu", torch.bfloat16)
    strided = torch.stack([choice, choice], 1)[:, 0]
    torch.testing.assert_close(
        ops.routed_nested_mlp(x, w_gate, w_up, w_down, strided, widths, scale),
        ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale),
        rtol=0,
        atol=0,
    )


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(37, 64, 128, [128, 64, 32], "swiglu", dtype)
    tensors = [t.requires_grad_() for t in (x, w_gate, w_up, w_down, scale)]
    torch.library.opcheck(
        torch.ops.flextron.routed_nested_mlp.default,
        (tensors[0], tensors[1], tensors[2], tensors[3], choice, widths, tensors[4], "swiglu"),
    )


@needs_cuda
def test_torch_compile_fullgraph():
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(
        64, 64, 256, [256, 128], "swiglu", torch.bfloat16
    )

    def layer(x):
        return x + ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale, "swiglu")

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@needs_cuda
def test_bad_input_names_the_argument():
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(16, 64, 128, [128, 64], "swiglu", torch.float32)
    with pytest.raises(RuntimeError, match="strictly descending"):
        ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, [64, 128], scale)
    with pytest.raises(RuntimeError, match=r"widths\[0\] must be in"):
        ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, [129, 64], scale)
    with pytest.raises(RuntimeError, match="choice must be int64"):
        ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice.int(), widths, scale)
    with pytest.raises(RuntimeError, match="choice is on"):
        ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice.cpu(), widths, scale)
    with pytest.raises(RuntimeError, match="scale has 15 entries"):
        ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale[:15])
    with pytest.raises(RuntimeError, match="needs w_gate"):
        ops.routed_nested_mlp(x, None, w_up, w_down, choice, widths, scale, "swiglu")
