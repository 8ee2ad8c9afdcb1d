"""routed_nested_mlp: forward and backward against flextron.reference, opcheck, torch.compile, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import ops, reference

ACTIVATIONS = reference.ACTIVATIONS
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_inputs(
    tokens: int,
    hidden: int,
    d_ff: int,
    widths: list[int],
    activation: str = "swiglu",
    routing: str = "random",
    with_scale: bool = True,
    dtype: torch.dtype = torch.float32,
    contiguous: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x (T, D), w_gate (F, D) | None, w_up (F, D), w_down (D, F), choice (T,), scale (T,) | None).

    routing: random | one:<c> (every token picks c) | skip (every other choice left empty).
    contiguous=False builds every tensor as a strided view (transposed or sliced storage).
    """
    gen = torch.Generator().manual_seed(seed)
    num_choices = len(widths)
    if routing == "random":
        choice = torch.randint(0, num_choices, (tokens,), generator=gen)
    elif routing.startswith("one:"):
        choice = torch.full((tokens,), int(routing[4:]), dtype=torch.int64)
    else:  # skip: only even choices
        choice = 2 * torch.randint(0, (num_choices + 1) // 2, (tokens,), generator=gen)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        if contiguous:
            return (torch.randn(*shape, generator=gen) * std).to(dtype)
        # The transpose of a (shape reversed, padded) buffer: strided, with a leading dim > size.
        padded = torch.randn(*(s + 3 for s in reversed(shape)), generator=gen) * std
        view = padded.to(dtype)[tuple(slice(0, s) for s in reversed(shape))]
        return view.permute(*reversed(range(len(shape))))

    x = randn(tokens, hidden)
    w_gate = randn(d_ff, hidden, std=hidden**-0.5) if activation == "swiglu" else None
    w_up = randn(d_ff, hidden, std=hidden**-0.5)
    w_down = randn(hidden, d_ff, std=d_ff**-0.5)
    scale = None
    if with_scale:
        scale = (torch.rand(2 * tokens, generator=gen) + 0.5).to(dtype)
        scale = scale[::2] if not contiguous else scale[:tokens].clone()
    if not contiguous:
        choice = torch.stack([choice, choice], 1)[:, 0]  # stride 2
    return x, w_gate, w_up, w_down, choice, scale


def forward_and_grads(fn, inputs, widths, activation, grad_out=None):
    """Output and autograd gradients w.r.t. the float inputs (None ones skipped)."""
    x, w_gate, w_up, w_down, choice, scale = inputs
    leaves = [
        t.detach().requires_grad_() if t is not None else None for t in (x, w_gate, w_up, w_down, scale)
    ]
    x_, w_gate_, w_up_, w_down_, scale_ = leaves
    y = fn(x_, w_gate_, w_up_, w_down_, choice, widths, scale_, activation)
    grad_out = (
        torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        if grad_out is None
        else grad_out
    )
    wrt = [t for t in leaves if t is not None]
    return y, torch.autograd.grad(y, wrt, grad_out), grad_out


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    bound = 1e-5 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=bound)


def assert_matches_reference(inputs, widths, activation) -> None:
    """Output and every gradient of the op vs the reference, fp32 tolerances."""
    y, grads, grad_out = forward_and_grads(ops.routed_nested_mlp, inputs, widths, activation)
    y_ref, grads_ref, _ = forward_and_grads(reference.routed_nested_mlp, inputs, widths, activation, grad_out)
    assert_close_fp32(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_close_fp32(grad, grad_ref)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("tokens", [1, 7, 83, 300])  # 300: several tiles, the threaded path
@pytest.mark.parametrize("hidden,d_ff,widths", [(8, 64, [64, 40, 16]), (24, 96, [80, 64, 24, 8])])
@pytest.mark.parametrize("with_scale", [False, True])
def test_matches_reference_fp32(activation, tokens, hidden, d_ff, widths, with_scale):
    inputs = make_inputs(tokens, hidden, d_ff, widths, activation, with_scale=with_scale, seed=tokens)
    assert_matches_reference(inputs, widths, activation)


@pytest.mark.usefixtures("one_thread")
def test_one_thread_runs_tiles_of_the_largest_size_in_turn():
    # One thread: tiles of 256 sorted tokens (600 -> 256 + 256 + 88), no balancing.
    widths = [96, 72, 40, 16]
    inputs = make_inputs(600, 24, 96, widths, "swiglu", with_scale=True, seed=5)
    assert_matches_reference(inputs, widths, "swiglu")


@pytest.mark.parametrize("routing", ["one:0", "one:1", "one:3", "skip"])
@pytest.mark.parametrize("tokens", [5, 200])
def test_routing_patterns(routing, tokens):
    # One group only (widest, middle, narrowest) and empty groups in between.
    widths = [96, 72, 40, 16]
    inputs = make_inputs(tokens, 24, 96, widths, "swiglu", routing=routing)
    assert_matches_reference(inputs, widths, "swiglu")


def test_weight_grads_exactly_zero_outside_used_prefix():
    widths = [48, 32, 8]
    inputs = make_inputs(40, 8, 64, widths, "swiglu", routing="one:1")  # everyone at width 32
    _, (_, grad_gate, grad_up, grad_down, _), _ = forward_and_grads(
        ops.routed_nested_mlp, inputs, widths, "swiglu"
    )
    assert grad_gate.shape == (64, 8) and grad_down.shape == (8, 64)
    assert torch.count_nonzero(grad_gate[32:]) == 0
    assert torch.count_nonzero(grad_up[32:]) == 0
    assert torch.count_nonzero(grad_down[:, 32:]) == 0
    assert torch.count_nonzero(grad_up[:32]) > 0


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_non_contiguous_inputs(activation):
    widths = [64, 48, 16]
    inputs = make_inputs(83, 24, 64, widths, activation, contiguous=False)
    assert not inputs[0].is_contiguous() and not inputs[2].is_contiguous() and not inputs[4].is_contiguous()
    assert_matches_reference(inputs, widths, activation)


def test_expanded_grad_out():
    # A .sum() loss hands the backward a stride-0 grad_out.
    widths = [64, 32]
    x, w_gate, w_up, w_down, choice, scale = make_inputs(150, 8, 64, widths)
    x.requires_grad_()
    ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference.routed_nested_mlp(x_ref, w_gate, w_up, w_down, choice, widths, scale, "swiglu").sum().backward()
    assert_close_fp32(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_low_precision_error_within_twice_pytorch(dtype, activation):
    # Our error and PyTorch's own error at this precision, both against a float64 reference.
    widths = [96, 64, 32]
    inputs = make_inputs(83, 32, 96, widths, activation, dtype=dtype, seed=3)
    inputs64 = tuple(t if t is None or t.dtype == torch.int64 else t.double() for t in inputs)
    y, grads, grad_out = forward_and_grads(ops.routed_nested_mlp, inputs, widths, activation)
    y_low, grads_low, _ = forward_and_grads(reference.routed_nested_mlp, inputs, widths, activation, grad_out)
    y64, grads64, _ = forward_and_grads(
        reference.routed_nested_mlp, inputs64, widths, activation, grad_out.double()
    )
    for ours, torch_low, exact in zip((y, *grads), (y_low, *grads_low), (y64, *grads64), strict=True):
        assert ours.dtype == dtype
        ours_err = (ours.double() - exact).abs().max().item()
        torch_err = (torch_low.double() - exact).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-6 * exact.abs().max().item(), (ours_err, torch_err)


def test_empty_token_batch():
    widths = [64, 32]
    x, w_gate, w_up, w_down, choice, scale = make_inputs(0, 8, 64, widths)
    y = ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale)
    assert y.shape == (0, 8)
    grads = torch.ops.flextron.routed_nested_mlp_backward(
        y, x, w_gate, w_up, w_down, choice, widths, scale, "swiglu"
    )
    assert grads[0].shape == (0, 8) and torch.count_nonzero(grads[2]) == 0 and grads[4].shape == (0,)


def test_backward_op_empty_slots_without_gate_or_scale():
    widths = [64, 32]
    x, _, w_up, w_down, choice, _ = make_inputs(9, 8, 64, widths, "relu", with_scale=False)
    grads = torch.ops.flextron.routed_nested_mlp_backward(
        torch.ones_like(x), x, None, w_up, w_down, choice, widths, None, "relu"
    )
    assert grads[1].numel() == 0 and grads[4].numel() == 0
    assert grads[2].shape == w_up.shape and grads[3].shape == w_down.shape


@settings(max_examples=15, deadline=None)
@given(
    tokens=st.integers(1, 40),  # T=0: test_empty_token_batch (the reference has no graph)
    hidden=st.integers(1, 12),
    d_ff=st.integers(4, 40),
    num_choices=st.integers(1, 4),
    activation=st.sampled_from(ACTIVATIONS),
    with_scale=st.booleans(),
    data=st.data(),
)
def test_hypothesis_shapes(tokens, hidden, d_ff, num_choices, activation, with_scale, data):
    widths = sorted(
        data.draw(st.sets(st.integers(1, d_ff), min_size=num_choices, max_size=num_choices)), reverse=True
    )
    inputs = make_inputs(tokens, hidden, d_ff, widths, activation, with_scale=with_scale)
    assert_matches_reference(inputs, widths, activation)


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(activation, requires_grad):
    widths = [32, 24, 8]
    x, w_gate, w_up, w_down, choice, scale = make_inputs(11, 8, 32, widths, activation)
    for t in (x, w_gate, w_up, w_down, scale):
        if t is not None:
            t.requires_grad_(requires_grad)
    torch.library.opcheck(
        torch.ops.flextron.routed_nested_mlp.default,
        (x, w_gate, w_up, w_down, choice, widths, scale, activation),
    )
    torch.library.opcheck(
        torch.ops.flextron.routed_nested_mlp.default,
        (x, w_gate, w_up, w_down, choice, widths, None, activation),
    )


def test_opcheck_backward_op():
    widths = [32, 16]
    x, w_gate, w_up, w_down, choice, scale = make_inputs(9, 8, 32, widths)
    grad_out = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.flextron.routed_nested_mlp_backward.default,
        (grad_out, x, w_gate, w_up, w_down, choice, widths, scale, "swiglu"),
    )


def test_torch_compile_fullgraph():
    widths = [64, 40, 16]
    inputs = make_inputs(37, 16, 64, widths)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, w_gate, w_up, w_down, choice, scale):
        return ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale).square().sum()

    leaves = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    loss = step(*leaves)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None and t.requires_grad])
    ref_leaves = [
        t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs
    ]
    x, w_gate, w_up, w_down, choice, scale = ref_leaves
    loss_ref = (
        reference.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale, "swiglu").square().sum()
    )
    grads_ref = torch.autograd.grad(loss_ref, [t for t in ref_leaves if t is not None and t.requires_grad])
    assert_close_fp32(loss, loss_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_close_fp32(grad, grad_ref)


# ---- bad input -----------------------------------------------------------------


def _bad_call(**changes):
    widths = changes.pop("widths", [32, 16, 8])
    x, w_gate, w_up, w_down, choice, scale = make_inputs(6, 8, 32, [32, 16, 8])
    args = dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, choice=choice, scale=scale, activation="swiglu")
    args.update(changes)
    return ops.routed_nested_mlp(
        args["x"],
        args["w_gate"],
        args["w_up"],
        args["w_down"],
        args["choice"],
        widths,
        args["scale"],
        args["activation"],
    )


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(x=torch.zeros(6, 8, dtype=torch.int32)), "x must be float32"),
        (dict(x=torch.zeros(6, 8, dtype=torch.float64)), "x must be float32"),
        (dict(x=torch.zeros(2, 3, 8)), "x must be 2-D"),
        (dict(choice=torch.zeros(6, dtype=torch.int32)), "choice must be int64"),
        (dict(choice=torch.zeros(5, dtype=torch.int64)), "choice has 5 entries"),
        (dict(choice=torch.zeros(6, 1, dtype=torch.int64)), "choice must be 1-D"),
        (dict(choice=torch.tensor([0, 1, 2, 3, 0, 0])), r"choice\[3\] = 3 is out of range"),
        (dict(choice=torch.tensor([0, -1, 2, 1, 0, 0])), r"choice\[1\] = -1 is out of range"),
        (dict(widths=[32, 0]), r"widths\[1\] must be in \[1, 32\]"),
        (dict(widths=[33, 16]), r"widths\[0\] must be in \[1, 32\]"),
        (dict(widths=[16, 32, 8]), "widths must be strictly descending"),
        (dict(widths=[32, 32, 8]), "widths must be strictly descending"),
        (dict(widths=[]), "widths must hold at least one width"),
        (dict(w_down=torch.zeros(8, 31)), "w_down must be"),
        (dict(w_up=torch.zeros(32, 7)), "w_up has 7 input features"),
        (dict(w_gate=torch.zeros(16, 8)), "w_gate has shape"),
        (dict(w_gate=None), "needs w_gate"),
        (dict(activation="gelu"), "takes no w_gate"),
        (dict(activation="tanh"), "activation must be"),
        (dict(w_up=torch.zeros(32, 8, dtype=torch.bfloat16)), "w_up has dtype"),
        (dict(scale=torch.ones(5)), "scale has 5 entries"),
        (dict(scale=torch.ones(6, 1)), "scale must be 1-D"),
        (dict(scale=torch.ones(6, dtype=torch.int64)), "scale must be float32"),
    ],
)
def test_bad_input_raises(changes, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        _bad_call(**changes)


def test_backward_bad_grad_out():
    widths = [32, 16]
    x, w_gate, w_up, w_down, choice, scale = make_inputs(6, 8, 32, widths)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        torch.ops.flextron.routed_nested_mlp_backward(
            torch.ones(5, 8), x, w_gate, w_up, w_down, choice, widths, scale, "swiglu"
        )
    with pytest.raises(RuntimeError, match="grad_out has dtype"):
        torch.ops.flextron.routed_nested_mlp_backward(
            torch.ones(6, 8, dtype=torch.bfloat16), x, w_gate, w_up, w_down, choice, widths, scale, "swiglu"
        )


# ---- CUDA ----------------------------------------------------------------------


@cuda_only
def test_cuda_matches_reference_or_reports_missing_kernel():
    widths = [64, 48, 16]
    inputs = make_inputs(83, 24, 64, widths)
    cuda_inputs = tuple(None if t is None else t.cuda() for t in inputs)
    if "CUDA" not in ops.backends("routed_nested_mlp"):
        with pytest.raises(NotImplementedError, match="not built for CUDA yet"):
            ops.routed_nested_mlp(*cuda_inputs[:5], widths, cuda_inputs[5])
        return
    y, grads, grad_out = forward_and_grads(ops.routed_nested_mlp, cuda_inputs, widths, "swiglu")
    y_ref, grads_ref, _ = forward_and_grads(
        reference.routed_nested_mlp, inputs, widths, "swiglu", grad_out.cpu()
    )
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-4)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad.cpu(), grad_ref, rtol=1e-4, atol=1e-4)


@cuda_only
def test_cuda_bf16_error_within_twice_pytorch():
    if "CUDA" not in ops.backends("routed_nested_mlp"):
        pytest.skip("routed_nested_mlp has no CUDA kernel in this build")
    widths = [128, 64]
    inputs = make_inputs(83, 64, 128, widths, dtype=torch.bfloat16)
    cuda_inputs = tuple(None if t is None else t.cuda() for t in inputs)
    y = ops.routed_nested_mlp(*cuda_inputs[:5], widths, cuda_inputs[5])
    y_low = reference.routed_nested_mlp(*cuda_inputs[:5], widths, cuda_inputs[5], "swiglu")
    inputs64 = tuple(t if t is None or t.dtype == torch.int64 else t.double() for t in inputs)
    y64 = reference.routed_nested_mlp(*inputs64[:5], widths, inputs64[5], "swiglu")
    assert (y.cpu().double() - y64).abs().max() <= 2 * (y_low.cpu().double() - y64).abs().max() + 1e-6
