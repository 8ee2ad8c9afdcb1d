"""nested_mlp: forward and backward against flextron.reference, opcheck, torch.compile, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import ops, reference

ACTIVATIONS = reference.ACTIVATIONS
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_inputs(
    lead: tuple[int, ...],
    hidden: int,
    d_ff: int,
    activation: str = "swiglu",
    dtype: torch.dtype = torch.float32,
    contiguous: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(x (*lead, D), w_gate (F, D) | None, w_up (F, D), w_down (D, F)); strided views if not contiguous.

    The values depend only on the seed, not on the device."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        if contiguous:
            return (torch.randn(*shape, generator=gen) * std).to(device, dtype)
        # The transpose of a padded buffer: strided, with leading dims larger than the sizes.
        padded = torch.randn(*(s + 3 for s in reversed(shape)), generator=gen) * std
        view = padded.to(device, dtype)[tuple(slice(0, s) for s in reversed(shape))]
        return view.permute(*reversed(range(len(shape))))

    x = randn(*lead, hidden)
    w_gate = randn(d_ff, hidden, std=hidden**-0.5) if activation == "swiglu" else None
    w_up = randn(d_ff, hidden, std=hidden**-0.5)
    w_down = randn(hidden, d_ff, std=d_ff**-0.5)
    return x, w_gate, w_up, w_down


def forward_and_grads(fn, inputs, width, activation, grad_out=None):
    """Output and autograd gradients w.r.t. every float input (None ones skipped)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves, width, activation)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    return y, torch.autograd.grad(y, [t for t in leaves if t is not None], grad_out), grad_out


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    bound = 1e-5 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=bound)


def check_against_reference(inputs, width, activation):
    y, grads, grad_out = forward_and_grads(ops.nested_mlp, inputs, width, activation)
    y_ref, grads_ref, _ = forward_and_grads(reference.nested_mlp, inputs, width, activation, grad_out)
    assert_close_fp32(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_close_fp32(grad, grad_ref)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead", [(1,), (7,), (83,), (2, 5)])
@pytest.mark.parametrize("hidden,d_ff,width", [(8, 64, 64), (24, 96, 40), (24, 96, 1)])
def test_matches_reference_fp32(activation, lead, hidden, d_ff, width):
    check_against_reference(make_inputs(lead, hidden, d_ff, activation, seed=d_ff), width, activation)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_non_contiguous_inputs(activation):
    inputs = make_inputs((83,), 24, 64, activation, contiguous=False)
    assert not inputs[0].is_contiguous() and not inputs[2].is_contiguous()
    check_against_reference(inputs, 40, activation)


def test_weight_grads_exactly_zero_outside_prefix():
    inputs = make_inputs((9,), 8, 64)
    _, (_, grad_gate, grad_up, grad_down), _ = forward_and_grads(ops.nested_mlp, inputs, 24, "swiglu")
    assert grad_gate.shape == (64, 8) and grad_down.shape == (8, 64)
    assert torch.count_nonzero(grad_gate[24:]) == 0 and torch.count_nonzero(grad_up[24:]) == 0
    assert torch.count_nonzero(grad_down[:, 24:]) == 0 and torch.count_nonzero(grad_up[:24]) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_low_precision_error_within_twice_pytorch(dtype, activation):
    # Our error and PyTorch's own error at this precision, both against a float64 reference.
    inputs = make_inputs((83,), 32, 96, activation, dtype=dtype, seed=3)
    inputs64 = tuple(None if t is None else t.double() for t in inputs)
    y, grads, grad_out = forward_and_grads(ops.nested_mlp, inputs, 64, activation)
    y_low, grads_low, _ = forward_and_grads(reference.nested_mlp, inputs, 64, activation, grad_out)
    y64, grads64, _ = forward_and_grads(reference.nested_mlp, inputs64, 64, activation, grad_out.double())
    for ours, torch_low, exact in zip((y, *grads), (y_low, *grads_low), (y64, *grads64), strict=True):
        assert ours.dtype == dtype
        ours_err = (ours.double() - exact).abs().max().item()
        torch_err = (torch_low.double() - exact).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-6 * exact.abs().max().item(), (ours_err, torch_err)


@settings(max_examples=15, deadline=None)
@given(
    tokens=st.integers(1, 40),
    hidden=st.integers(1, 12),
    d_ff=st.integers(1, 40),
    activation=st.sampled_from(ACTIVATIONS),
    data=st.data(),
)
def test_hypothesis_shapes(tokens, hidden, d_ff, activation, data):
    width = data.draw(st.integers(1, d_ff))
    check_against_reference(make_inputs((tokens,), hidden, d_ff, activation), width, activation)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(activation, requires_grad):
    x, w_gate, w_up, w_down = make_inputs((3, 5), 8, 32, activation)
    for t in (x, w_gate, w_up, w_down):
        if t is not None:
            t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.flextron.nested_mlp.default, (x, w_gate, w_up, w_down, 24, activation))


def test_torch_compile_fullgraph():
    inputs = make_inputs((37,), 16, 64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, w_gate, w_up, w_down):
        return ops.nested_mlp(x, w_gate, w_up, w_down, 40, "swiglu").square().sum()

    leaves = [t.detach().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(step(*leaves), leaves)
    ref_leaves = [t.detach().requires_grad_() for t in inputs]
    loss_ref = reference.nested_mlp(*ref_leaves, 40, "swiglu").square().sum()
    for grad, grad_ref in zip(grads, torch.autograd.grad(loss_ref, ref_leaves), strict=True):
        assert_close_fp32(grad, grad_ref)


# ---- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(x=torch.zeros(6, 8, dtype=torch.int64)), "x must be float32"),
        (dict(width=0), r"width must be in \[1, 32\]"),
        (dict(width=33), r"width must be in \[1, 32\]"),
        (dict(w_down=torch.zeros(8, 31)), "w_down must be"),
        (dict(w_down=torch.zeros(8, 32, 1)), "w_down must be 2-D"),
        (dict(w_up=torch.zeros(32, 7)), "w_up has 7 input features"),
        (dict(w_gate=torch.zeros(16, 8)), "w_gate has shape"),
        (dict(w_gate=None), "needs w_gate"),
        (dict(activation="gelu"), "takes no w_gate"),
        (dict(activation="silu"), "activation must be"),
        (dict(w_up=torch.zeros(32, 8, dtype=torch.float16)), "w_up has dtype"),
    ],
)
def test_bad_input_raises(changes, match):
    x, w_gate, w_up, w_down = make_inputs((6,), 8, 32)
    args = dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, width=16, activation="swiglu")
    args.update(changes)
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.nested_mlp(**args)


# ---- CUDA ----------------------------------------------------------------------


@cuda_only
def test_cuda_matches_reference_or_reports_missing_kernel():
    inputs = make_inputs((83,), 24, 64)
    cuda_inputs = tuple(t.cuda() for t in inputs)
    if "CUDA" not in ops.backends("nested_mlp"):
        with pytest.raises(NotImplementedError, match="not built for CUDA yet"):
            ops.nested_mlp(*cuda_inputs, 40, "swiglu")
        return
    y, grads, grad_out = forward_and_grads(ops.nested_mlp, cuda_inputs, 40, "swiglu")
    y_ref, grads_ref, _ = forward_and_grads(reference.nested_mlp, inputs, 40, "swiglu", grad_out.cpu())
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-4)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad.cpu(), grad_ref, rtol=1e-4, atol=1e-4)


@cuda_only
def test_cuda_bf16_error_within_twice_pytorch():
    if "CUDA" not in ops.backends("nested_mlp"):
        pytest.skip("nested_mlp has no CUDA kernel in this build")
    inputs = make_inputs((83,), 64, 128, dtype=torch.bfloat16)
    cuda_inputs = tuple(t.cuda() for t in inputs)
    y = ops.nested_mlp(*cuda_inputs, 64, "swiglu")
    y_low = reference.nested_mlp(*cuda_inputs, 64, "swiglu")
    y64 = reference.nested_mlp(*(t.double() for t in inputs), 64, "swiglu")
    assert (y.cpu().double() - y64).abs().max() <= 2 * (y_low.cpu().double() - y64).abs().max() + 1e-6
