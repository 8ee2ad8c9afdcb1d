"""routed_nested_mlp against flextron.ops.reference: forward and backward in every dtype and routing
pattern, strided views, opcheck and bad input on every device; on the CPU also its tiling, fp32
against the fp32 reference, torch.compile (aot_eager); on CUDA the grouped CUTLASS path and its
fallback, CUDA graphs, uninitialised memory, K tails and device asserts.

Tolerances by comparison (CPU and CUDA tests alike): our error against an fp64 reference stays
within twice PyTorch's own error at the same precision (plus a small per-dtype floor, ABS_FLOOR).
An out-of-range choice trips a device-side assert, which poisons the CUDA context: that case
runs in a child process. The cases that reach the kernels' risky paths (many tiles per CTA,
K tails, D = 0) run on the sm90 (CUTLASS 3.x) and sm80 (2.x) kernels (FLEXTRON_ROUTED_GEMM), which
are also compared with each other, and the 3.x kernels' self-check is checked to pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import _C, ops
from flextron.ops import reference

ACTIVATIONS = reference.ACTIVATIONS
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ABS_FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# (tokens, hidden, ffn, widths): hidden and ffn multiples of 8 take the grouped CUTLASS path
# for 16-bit dtypes, other widths padded to a multiple of 8 on CUDA (PADDED: 203 and 201 pad
# alike, to 208); odd sizes and more than 32 choices take the masked fallback.
PADDED = (150, 64, 256, [256, 203, 201, 61, 5])
CASES = [
    (300, 64, 256, [256, 192, 64]),
    PADDED,
    (5, 128, 128, [128, 64]),
    (83, 20, 37, [37, 20, 7]),
    (77, 16, 320, list(range(320, 0, -8))),
]


def make_inputs(
    tokens: int,
    hidden: int,
    d_ff: int,
    widths: list[int],
    activation: str = "swiglu",
    *,
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


def check_forward_and_backward(inputs, widths, activation) -> None:
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
    check_forward_and_backward(inputs, widths, activation)


@pytest.mark.usefixtures("one_thread")
def test_one_thread_runs_tiles_of_the_largest_size_in_turn():
    # One thread: tiles of 256 sorted tokens (600 -> 256 + 256 + 88), no balancing.
    widths = [96, 72, 40, 16]
    inputs = make_inputs(600, 24, 96, widths, "swiglu", with_scale=True, seed=5)
    check_forward_and_backward(inputs, widths, "swiglu")


@pytest.mark.parametrize("routing", ["one:0", "one:1", "one:3", "skip"])
@pytest.mark.parametrize("tokens", [5, 200])
def test_routing_patterns(routing, tokens):
    # One group only (widest, middle, narrowest) and empty groups in between.
    widths = [96, 72, 40, 16]
    inputs = make_inputs(tokens, 24, 96, widths, "swiglu", routing=routing)
    check_forward_and_backward(inputs, widths, "swiglu")


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
    check_forward_and_backward(inputs, widths, activation)


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
    check_forward_and_backward(inputs, widths, activation)


@settings(max_examples=12, deadline=None)
@given(
    tokens=st.integers(1, 300),  # past 64 rows: several tiles, the threaded path
    hidden=st.integers(1, 48),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    activation=st.sampled_from(ACTIVATIONS),
    with_scale=st.booleans(),
    data=st.data(),
)
def test_hypothesis_odd_widths_forward_and_backward(
    assert_as_accurate_as_torch, tokens, hidden, dtype, activation, with_scale, data
):
    """Widths that are not multiples of 8 or 32 (vector lengths of the CPU kernels), fp32 and bf16:
    the output and every gradient within twice PyTorch's own error at that precision."""
    d_ff = data.draw(st.integers(33, 120).filter(lambda f: f % 8))
    odd = st.integers(1, d_ff - 1).filter(lambda w: w % 8)
    widths = sorted({d_ff, *data.draw(st.lists(odd, min_size=1, max_size=3))}, reverse=True)
    inputs = make_inputs(tokens, hidden, d_ff, widths, activation, with_scale=with_scale, dtype=dtype, seed=5)
    inputs64 = tuple(t if t is None or t.dtype == torch.int64 else t.double() for t in inputs)
    y, grads, grad_out = forward_and_grads(ops.routed_nested_mlp, inputs, widths, activation)
    y_same, grads_same, _ = forward_and_grads(
        reference.routed_nested_mlp, inputs, widths, activation, grad_out
    )
    y64, grads64, _ = forward_and_grads(
        reference.routed_nested_mlp, inputs64, widths, activation, grad_out.double()
    )
    for ours, theirs, exact in zip((y, *grads), (y_same, *grads_same), (y64, *grads64), strict=True):
        assert torch.isfinite(ours).all()
        assert_as_accurate_as_torch(ours, theirs, exact, ABS_FLOOR[dtype])


def test_cpu_kernels_read_no_uninitialised_memory():
    """With glibc's allocator filling every new block with 0x7f bytes (about 3.4e38 in fp32 and
    bf16), a buffer read before it is written turns the results infinite or NaN."""
    script = textwrap.dedent(
        """
        import torch
        from flextron import ops
        assert torch.empty(4096).abs().min() > 1e38  # the poison is on
        gen = torch.Generator().manual_seed(7)
        for dtype in (torch.float32, torch.bfloat16):
            for tokens, widths in ((5, [37, 20, 7]), (300, [100, 61, 33, 9])):
                shapes = [(tokens, 24), (widths[0], 24), (widths[0], 24), (24, widths[0]), (tokens,)]
                leaves = [(torch.rand(s, generator=gen) * 0.3).to(dtype).requires_grad_() for s in shapes]
                choice = torch.randint(0, len(widths), (tokens,), generator=gen)
                x, w_gate, w_up, w_down, scale = leaves
                y = ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale)
                grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
                for name, t in zip(("y", "x", "gate", "up", "down", "scale"), (y, *grads)):
                    assert torch.isfinite(t).all(), (dtype, tokens, name)
        """
    )
    env = os.environ | {
        "MALLOC_PERTURB_": "128",
        "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    }  # no zeroed mmap blocks
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_cpu_kernels_never_read_nan_garbage_past_a_width():
    """With every uninitialised tensor filled with NaN (PyTorch's deterministic mode), the bf16 and
    fp32 forward and backward at widths that are not multiples of 8 or 32 stay finite: the
    buffers whose column prefixes the GEMMs read are zeroed, so a GEMM that reads past K (bf16
    kernels pad K to their vector length) cannot pick up NaN (the CPU bf16 NaN of issue 28)."""
    script = textwrap.dedent(
        """
        import torch
        from flextron import ops
        torch.use_deterministic_algorithms(True)
        assert torch.empty(8).isnan().all()  # the NaN fill is on
        gen = torch.Generator().manual_seed(3)
        for dtype in (torch.bfloat16, torch.float32):
            for tokens, hidden, widths in ((64, 64, [160, 136, 40]), (129, 64, [576, 136, 100, 7])):
                ffn = widths[0]
                shapes = [(tokens, hidden), (ffn, hidden), (ffn, hidden), (hidden, ffn), (tokens,)]
                leaves = [(torch.rand(s, generator=gen) * 0.3).to(dtype).requires_grad_() for s in shapes]
                choice = torch.randint(0, len(widths), (tokens,), generator=gen)
                y = ops.routed_nested_mlp(*leaves[:4], choice, widths, leaves[4])
                grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
                for name, t in zip(("y", "x", "gate", "up", "down", "scale"), (y, *grads)):
                    assert torch.isfinite(t).all(), (dtype, tokens, name)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


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


# ---- every device and CUDA only --------------------------------------------------------


def _inputs(tokens, hidden, ffn, widths, activation, dtype, *, seed=0, with_scale=True, device="cuda"):
    """(x, w_gate | None, w_up, w_down, choice, widths, scale | None); choice 1 is left empty."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    x = randn(tokens, hidden)
    w_gate = randn(ffn, hidden, scale=hidden**-0.5) if activation == "swiglu" else None
    w_up = randn(ffn, hidden, scale=hidden**-0.5)
    w_down = randn(hidden, ffn, scale=ffn**-0.5)
    # Skip choice 1 so that one group is empty.
    usable = torch.tensor([c for c in range(len(widths)) if c != 1 or len(widths) == 1], device=device)
    choice = usable[torch.randint(0, usable.numel(), (tokens,), device=device, generator=gen)]
    scale = torch.rand(tokens, device=device, generator=gen).to(dtype) if with_scale else None
    return x, w_gate, w_up, w_down, choice, widths, scale


@pytest.fixture(scope="session")
def _assert_as_accurate_as_torch(assert_as_accurate_as_torch):
    """Handed to the tests as a fixture: it needs assert_as_accurate_as_torch."""

    def _assert_as_accurate_as_torch(ours, theirs, exact):
        assert_as_accurate_as_torch(ours, theirs, exact, ABS_FLOOR[ours.dtype])

    return _assert_as_accurate_as_torch


def _double(tensors):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_forward_matches_reference(_assert_as_accurate_as_torch, device, dtype, activation, case, with_scale):
    args = _inputs(*case, activation, dtype, with_scale=with_scale, device=device)
    ours = ops.routed_nested_mlp(*args, activation)
    theirs = reference.routed_nested_mlp(*args, activation)
    exact = reference.routed_nested_mlp(*_double(args), activation)
    _assert_as_accurate_as_torch(ours, theirs, exact)


def _grads(fn, tensors, choice, widths, activation, grad_y):
    """Gradients of fn's output (against grad_y) w.r.t. the tensors that are not None."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    xl, gl, ul, dl, sl = leaves
    fn(xl, gl, ul, dl, choice, widths, sl, activation).backward(grad_y.to(xl.dtype))
    return [leaf.grad for leaf in leaves if leaf is not None]


@pytest.fixture(scope="session")
def _check_backward(_assert_as_accurate_as_torch):
    """Handed to the tests as a fixture: it needs _assert_as_accurate_as_torch."""

    def _check_backward(x, w_gate, w_up, w_down, choice, widths, scale, activation):
        gen = torch.Generator(device=x.device).manual_seed(9)
        grad_y = torch.randn(x.shape, device=x.device, generator=gen)
        differentiable = [x, w_gate, w_up, w_down, scale]
        ours = _grads(ops.routed_nested_mlp, differentiable, choice, widths, activation, grad_y)
        theirs = _grads(reference.routed_nested_mlp, differentiable, choice, widths, activation, grad_y)
        exact = _grads(
            reference.routed_nested_mlp, _double(differentiable), choice, widths, activation, grad_y
        )
        for our_grad, their_grad, exact_grad in zip(ours, theirs, exact, strict=True):
            _assert_as_accurate_as_torch(our_grad, their_grad, exact_grad)

    return _check_backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_backward_matches_reference(_check_backward, device, dtype, activation, case, with_scale):
    _check_backward(
        *_inputs(*case, activation, dtype, seed=1, with_scale=with_scale, device=device), activation
    )


# Group occupancy of the band-form backward: every token in the widest group, every token in
# the narrowest (the wider bands have K = 0 rows: their weight gradients must be exactly zero),
# every token in a middle group, and one token.
ONE_GROUP = [
    (64, 64, 256, [256, 192, 128, 64], 0),
    (64, 64, 256, [256, 192, 128, 64], 3),
    (129, 64, 256, [256, 192, 128, 64], 2),
    (1, 64, 256, [256, 128], 1),
    (64, 64, 256, [256, 203, 61], 1),  # padded to 208: the padding's gradients must be zero
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", ONE_GROUP)
def test_backward_all_tokens_in_one_group(_check_backward, device, dtype, case):
    tokens, hidden, ffn, widths, only = case
    x, w_gate, w_up, w_down, _, _, scale = _inputs(
        tokens, hidden, ffn, widths, "swiglu", dtype, seed=2, device=device
    )
    choice = torch.full((tokens,), only, device=device, dtype=torch.int64)
    _check_backward(x, w_gate, w_up, w_down, choice, widths, scale, "swiglu")
    leaves = [t.clone().requires_grad_() for t in (w_gate, w_up, w_down)]
    ops.routed_nested_mlp(x, *leaves, choice, widths, scale, "swiglu").sum().backward()
    used = widths[only]
    assert not leaves[0].grad[used:].any() and not leaves[1].grad[used:].any()
    assert not leaves[2].grad[:, used:].any()


def _runs_sm90_path() -> bool:
    """The forward GEMMs run CUTLASS 3.x ptr-array kernels: a 90a build on an sm_90 device."""
    return bool(_C.build_info().get("sm90_kernels")) and torch.cuda.get_device_capability() == (9, 0)


def _grouped_launches(names: list[str]) -> tuple[int, int]:
    """(CUTLASS 2.x GemmGrouped launches, CUTLASS 3.x grouped GemmUniversal launches)."""
    v2 = sum("cutlass::gemm::kernel::GemmGrouped<" in name for name in names)
    v3 = sum("GemmUniversal<" in name and "GroupProblemShape" in name for name in names)
    return v2, v3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("routed_gemm", ["auto", "sm80"])
@pytest.mark.parametrize("case", [CASES[0], PADDED])
def test_aligned_16bit_shapes_run_grouped_cutlass(
    _assert_as_accurate_as_torch, _check_backward, cuda_kernel_names, dtype, routed_gemm, case, monkeypatch
):
    """Forward: 2 grouped launches (up+gate, down); backward: recompute up+gate, grad_hidden,
    grad_x (up, then gate with beta = 1), all weight-gradient bands: 5 launches, all on the
    sm90a kernel where it runs and has passed its self-check (auto). Widths that are not
    multiples of 8 (PADDED) are padded, not sent to the masked fallback, and warn nothing."""
    monkeypatch.setenv("FLEXTRON_ROUTED_GEMM", routed_gemm)
    sm90 = _runs_sm90_path() and routed_gemm == "auto"
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(*case, "swiglu", dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forward = _grouped_launches(
            cuda_kernel_names(lambda: ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale))
        )
    assert not [w for w in caught if "routed_nested_mlp" in str(w.message)], [str(w.message) for w in caught]
    assert forward == ((0, 2) if sm90 else (2, 0)), forward
    leaves = [t.clone().requires_grad_() for t in (x, w_gate, w_up, w_down, scale)]
    y = ops.routed_nested_mlp(leaves[0], *leaves[1:4], choice, widths, leaves[4])
    backward = _grouped_launches(cuda_kernel_names(lambda: y.backward(torch.ones_like(y))))
    assert backward == ((0, 5) if sm90 else (5, 0)), backward
    # Either kernel family matches the reference.
    args = (x, w_gate, w_up, w_down, choice, widths, scale)
    _assert_as_accurate_as_torch(
        ops.routed_nested_mlp(*args, "swiglu"),
        reference.routed_nested_mlp(*args, "swiglu"),
        reference.routed_nested_mlp(*_double(args), "swiglu"),
    )
    _check_backward(*args, "swiglu")


def test_unused_neurons_get_exactly_zero_gradient(device):
    x, w_gate, w_up, w_down, choice, _, scale = _inputs(
        64, 32, 128, [128], "swiglu", torch.bfloat16, device=device
    )
    leaves = [t.clone().requires_grad_() for t in (w_gate, w_up, w_down)]
    ops.routed_nested_mlp(x, *leaves, choice, [96, 40], scale, "swiglu").sum().backward()
    assert not leaves[0].grad[96:].any() and not leaves[1].grad[96:].any()
    assert not leaves[2].grad[:, 96:].any()


def test_empty_tokens_and_non_contiguous_choice(device):
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(
        0, 64, 128, [128, 64], "swiglu", torch.bfloat16, device=device
    )
    assert ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale).shape == (0, 64)
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(
        40, 64, 128, [128, 64], "swiglu", torch.bfloat16, device=device
    )
    strided = torch.stack([choice, choice], 1)[:, 0]
    torch.testing.assert_close(
        ops.routed_nested_mlp(x, w_gate, w_up, w_down, strided, widths, scale),
        ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, dtype, activation, requires_grad):
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(
        37, 64, 128, [128, 64, 32], activation, dtype, device=device
    )
    x, w_gate, w_up, w_down, scale = (
        None if t is None else t.requires_grad_(requires_grad) for t in (x, w_gate, w_up, w_down, scale)
    )
    for with_scale in (scale, None):
        torch.library.opcheck(
            torch.ops.flextron.routed_nested_mlp.default,
            (x, w_gate, w_up, w_down, choice, widths, with_scale, activation),
        )


@pytest.mark.cuda
def test_torch_compile_inductor():
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(
        64, 64, 256, [256, 128], "swiglu", torch.bfloat16
    )

    def layer(x):
        return x + ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale, "swiglu")

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.cuda
def test_bad_input_on_cuda_names_the_argument():
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


def _route_and_mlp(x, router, w_gate, w_up, w_down, widths):
    """A routed layer: route (hard choice, its probability as the scale), then the MLP."""
    choice, probs, _, _, _ = ops.route(x, router, None, 1.0, True)
    scale = probs.gather(1, choice.unsqueeze(1)).squeeze(1)
    return ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale, "swiglu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_capture_of_route_and_mlp(dtype):
    """route + routed_nested_mlp (forward and backward) capture into a CUDA graph: no host
    synchronisation, no host data read at replay. Replays with new inputs copied into the
    static buffers match eager runs (to dtype tolerance: cuBLAS may pick other algorithms
    under capture for the router's logits)."""
    tokens, hidden, ffn, widths = 256, 64, 256, [256, 192, 128, 64]
    x, w_gate, w_up, w_down, _, _, _ = _inputs(tokens, hidden, ffn, widths, "swiglu", dtype, seed=3)
    gen = torch.Generator(device="cuda").manual_seed(4)
    router = (torch.randn(len(widths), hidden, device="cuda", generator=gen) * hidden**-0.5).to(dtype)
    weights = [t.requires_grad_() for t in (w_gate, w_up, w_down)]
    static_x = x.clone().requires_grad_()
    static_grad = torch.randn_like(x)

    def step():
        y = _route_and_mlp(static_x, router, *weights, widths)
        grads = torch.autograd.grad(y, [static_x, *weights], static_grad)
        return y, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (workspace, lazy init)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_grads = step()

    for seed in range(3):
        new = torch.Generator(device="cuda").manual_seed(100 + seed)
        with torch.no_grad():
            static_x.copy_(torch.randn(x.shape, device="cuda", generator=new).to(dtype))
            static_grad.copy_(torch.randn(x.shape, device="cuda", generator=new).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        eager_y, eager_grads = step()
        torch.testing.assert_close(static_y, eager_y)
        for captured, eager in zip(static_grads, eager_grads, strict=True):
            torch.testing.assert_close(captured, eager)


def _poison_allocator(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], copies: int = 4) -> None:
    """Leave NaN-filled blocks of these sizes in the caching allocator, so that outputs or
    buffers the op does not fully write show up as NaN."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [
        torch.full(shape, float("nan"), device="cuda", dtype=dtype)
        for shape in shapes
        for dtype in dtypes
        for _ in range(copies)
    ]
    torch.cuda.synchronize()
    del blocks


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("choices_used", [[1, 2], [0, 2, 3], [3]])
def test_outputs_fully_written_over_poisoned_memory(dtype, choices_used):
    """Every element of y and of every gradient is written: with NaN blocks of the right
    sizes waiting in the allocator, results stay finite and equal a clean run. Unused
    choices (empty groups) and an unused widest band (K = 0) are included."""
    tokens, hidden, ffn, widths = 200, 64, 256, [256, 192, 128, 64]
    x, w_gate, w_up, w_down, _, _, scale = _inputs(tokens, hidden, ffn, widths, "swiglu", dtype, seed=5)
    gen = torch.Generator(device="cuda").manual_seed(6)
    pick = torch.tensor(choices_used, device="cuda")
    choice = pick[torch.randint(0, len(choices_used), (tokens,), device="cuda", generator=gen)]
    grad_y = torch.randn(x.shape, device="cuda", generator=gen).to(dtype)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w_gate, w_up, w_down, scale)]
        y = ops.routed_nested_mlp(leaves[0], *leaves[1:4], choice, widths, leaves[4], "swiglu")
        return [y.detach(), *torch.autograd.grad(y, leaves, grad_y)]

    clean = run()
    shapes = [(tokens, hidden), (tokens, ffn), (ffn, hidden), (hidden, ffn), (tokens,)]
    _poison_allocator(shapes, [dtype, torch.float32])
    poisoned = run()
    for name, ours, expected in zip(("y", "x", "gate", "up", "down", "scale"), poisoned, clean, strict=True):
        assert torch.isfinite(ours).all(), name
        torch.testing.assert_close(ours, expected, rtol=0, atol=0, msg=name)


@pytest.fixture(params=["sm90", "sm80"])
def sm90_path(request, monkeypatch):
    """Runs a test on the CUTLASS 3.x kernels, forced (FLEXTRON_ROUTED_GEMM=sm90: no
    self-check, so a wrong kernel fails here rather than being swapped out), and on the 2.x
    kernels (sm80); the same path twice on GPUs other than sm_90."""
    monkeypatch.setenv("FLEXTRON_ROUTED_GEMM", request.param)
    return request.param


@pytest.fixture(scope="session")
def _check_against_fp32(_assert_as_accurate_as_torch):
    """Handed to the tests as a fixture: it needs _assert_as_accurate_as_torch."""

    def _check_against_fp32(args, activation):
        """Forward and backward within twice the error of the same-dtype reference, both measured
        against an fp32 reference (fp64 would be slow at these sizes)."""
        as_fp32 = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
        x, w_gate, w_up, w_down, choice, widths, scale = args
        _assert_as_accurate_as_torch(
            ops.routed_nested_mlp(*args, activation),
            reference.routed_nested_mlp(*args, activation),
            reference.routed_nested_mlp(*as_fp32, activation).double(),
        )
        grad_y = torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9))
        differentiable = [x, w_gate, w_up, w_down, scale]
        ours = _grads(ops.routed_nested_mlp, differentiable, choice, widths, activation, grad_y)
        theirs = _grads(reference.routed_nested_mlp, differentiable, choice, widths, activation, grad_y)
        exact = _grads(
            reference.routed_nested_mlp, as_fp32[:4] + as_fp32[6:], choice, widths, activation, grad_y
        )
        labels = ("x", "w_gate", "w_up", "w_down", "scale")
        names = [name for name, t in zip(labels, differentiable, strict=True) if t is not None]
        for name, our_grad, their_grad, exact_grad in zip(names, ours, theirs, exact, strict=True):
            assert torch.isfinite(our_grad).all(), name
            _assert_as_accurate_as_torch(our_grad, their_grad, exact_grad.double())

    return _check_against_fp32


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_tile_grouped_gemms(_check_against_fp32, dtype, sm90_path):
    """Hundreds of 128x128 tiles per launch, more than one per persistent CTA: CTAs move to
    further tiles and across groups (TMA descriptor updates, pipeline phases, the 2.x
    scheduler's grid-stride loop). All four groups are used."""
    tokens, hidden, ffn, widths = 4096, 512, 2048, [2048, 1536, 1024, 512]
    args = _inputs(tokens, hidden, ffn, widths, "swiglu", dtype, seed=11)
    gen = torch.Generator(device="cuda").manual_seed(12)
    choice = torch.randint(0, len(widths), (tokens,), device="cuda", generator=gen)
    _check_against_fp32((*args[:4], choice, widths, args[6]), "swiglu")


# (tokens, hidden, ffn, widths): K tails in every GEMM: K = D = 72 (up/gate, grad_hidden), K =
# a width of 200, 136 or 40 (down, grad_x), K = a group's row count (weight-gradient bands).
K_TAILS = [
    (333, 72, 200, [200, 136, 40]),
    (1000, 72, 200, [200, 136, 40]),
    (129, 136, 72, [72, 40, 8]),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", K_TAILS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_k_tails(_check_against_fp32, dtype, case, activation, sm90_path):
    tokens, hidden, ffn, widths = case
    args = _inputs(tokens, hidden, ffn, widths, activation, dtype, seed=13)
    gen = torch.Generator(device="cuda").manual_seed(14)
    choice = torch.randint(0, len(widths), (tokens,), device="cuda", generator=gen)
    _check_against_fp32((*args[:4], choice, widths, args[6]), activation)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_hidden_size_zero(dtype, with_scale, sm90_path):
    """D = 0 with tokens: the output and grad_x are empty, the weight gradients empty or zero,
    grad_scale zero (the unscaled output is empty)."""
    tokens, ffn, widths = 50, 128, [128, 64]
    choice = torch.arange(tokens, device="cuda") % len(widths)
    scale = torch.rand(tokens, device="cuda").to(dtype) if with_scale else None
    tensors = [torch.empty(tokens, 0), torch.empty(ffn, 0), torch.empty(ffn, 0), torch.empty(0, ffn), scale]
    leaves = [t if t is None else t.to("cuda", dtype).requires_grad_() for t in tensors]
    y = ops.routed_nested_mlp(leaves[0], *leaves[1:4], choice, widths, leaves[4], "swiglu")
    assert y.shape == (50, 0)
    y.sum().backward()
    for leaf in leaves:
        if leaf is not None:
            assert leaf.grad.shape == leaf.shape and not leaf.grad.any()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_outputs_are_distinct(dtype, sm90_path):
    """No two outputs of the backward op are the same tensor (the schema promises fresh
    outputs), also for the empty slots of an absent gate and scale; bf16 runs the grouped path,
    fp32 the masked one."""
    x, _, w_up, w_down, choice, widths, _ = _inputs(40, 64, 128, [128, 64], "relu", dtype)
    grads = torch.ops.flextron.routed_nested_mlp_backward(
        torch.ones_like(x), x, None, w_up, w_down, choice, widths, None, "relu"
    )
    assert len({g._cdata for g in grads}) == 5


@pytest.mark.cuda
@pytest.mark.parametrize("tokens,ffn,widths", [(40, 37, [37, 20, 7]), (40, 128, [128, 64])])
def test_out_of_range_choice_trips_a_device_assert_on_the_masked_path(tokens, ffn, widths):
    """fp32 (and odd sizes) take the masked path; an out-of-range choice must fail loudly there,
    as on the grouped path, instead of reading past the widths. The assert poisons the CUDA
    context, so the op runs in a child process."""
    script = textwrap.dedent(f"""
        import torch
        from flextron import ops
        x = torch.randn({tokens}, 16, device="cuda")
        w_up = torch.randn({ffn}, 16, device="cuda")
        w_down = torch.randn(16, {ffn}, device="cuda")
        choice = torch.zeros({tokens}, dtype=torch.int64, device="cuda")
        choice[3] = {len(widths)}
        ops.routed_nested_mlp(x, None, w_up, w_down, choice, {widths}, None, "relu")
        torch.cuda.synchronize()
        print("no error")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode != 0 and "no error" not in result.stdout, result.stdout
    assert re.search("device-side assert|choice out of range", result.stderr), result.stderr[-2000:]


def _forward_and_backward(args, activation="swiglu"):
    x, w_gate, w_up, w_down, choice, widths, scale = args
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_gate, w_up, w_down, scale)]
    y = ops.routed_nested_mlp(leaves[0], *leaves[1:4], choice, widths, leaves[4], activation)
    grad_y = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_y.to(y.dtype))]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[0], K_TAILS[0]])
def test_sm90_and_sm80_kernels_agree(dtype, case, monkeypatch):
    """The CUTLASS 3.x and 2.x grouped GEMMs on the same problems: the output and every
    gradient agree to within a few roundings of the dtype (both accumulate in fp32)."""
    if not _runs_sm90_path():
        pytest.skip("the sm90a kernels run on sm_90 devices only")
    args = _inputs(*case, "swiglu", dtype, seed=21)
    results = {}
    for path in ("sm90", "sm80"):
        monkeypatch.setenv("FLEXTRON_ROUTED_GEMM", path)
        results[path] = _forward_and_backward(args)
    for name, ours, theirs in zip(("y", "x", "gate", "up", "down", "scale"), *results.values(), strict=True):
        scale = theirs.float().abs().max().item() or 1.0
        error = (ours.float() - theirs.float()).abs().max().item() / scale
        assert error <= 8 * torch.finfo(dtype).eps, (name, error)


@pytest.mark.cuda
def test_sm90_self_check_passes_and_the_3x_kernel_runs():
    """FLEXTRON_ROUTED_GEMM=auto in a fresh process: the self-check runs once, warns nothing,
    and the 3.x kernels run; an unknown value is a clear error."""
    if not _runs_sm90_path():
        pytest.skip("the sm90a kernels run on sm_90 devices only")
    script = textwrap.dedent(
        """
        import warnings
        import torch
        from flextron import ops
        from tests.ops.test_routed_nested_mlp import CASES, _grouped_launches, _inputs
        x, w_gate, w_up, w_down, choice, widths, scale = _inputs(*CASES[0], "swiglu", torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            args = (x, w_gate, w_up, w_down, choice, widths, scale)
            ops.routed_nested_mlp(*args)  # runs the self-check
            names = cuda_kernel_names(lambda: ops.routed_nested_mlp(*args))
        assert _grouped_launches(names) == (0, 2), _grouped_launches(names)
        """
    )
    env = os.environ | {"FLEXTRON_ROUTED_GEMM": "auto"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    env["FLEXTRON_ROUTED_GEMM"] = "fastest"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "FLEXTRON_ROUTED_GEMM must be auto, sm90 or sm80" in run.stderr


@pytest.mark.cuda
def test_fallbacks_warn_once_with_op_reason_and_shape():
    """Shapes the grouped kernels cannot take run the masked path with one warning per reason
    and process (a fresh process: the warnings are once per process)."""
    script = textwrap.dedent(
        """
        import warnings
        import torch
        from flextron import ops
        from tests.ops.test_routed_nested_mlp import CASES, _inputs
        odd = _inputs(83, 20, 37, [37, 20, 7], "swiglu", torch.bfloat16)
        fp32 = _inputs(*CASES[0], "swiglu", torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for args in (odd, odd, fp32, fp32):
                ops.routed_nested_mlp(*args)
        messages = [str(w.message) for w in caught if "routed_nested_mlp" in str(w.message)]
        assert len(messages) == 2, messages
        assert "hidden size or d_ff not a multiple of 8 (T=83 D=20 F=37 widths [37, 20, 7])" in messages[0]
        assert "no grouped kernel for Float" in messages[1] and "masked full-width MLP" in messages[1]
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
