"""route against the reference: decisions bit-equal, probabilities and gradients close, on every
device; on CUDA also bit-equality with the CPU op, ties and NaN, CUDA graph capture and outputs
written in full."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import ops
from flextron.ops import reference

INDEX_OUTPUTS = (0, 2, 3, 4)  # choice, perm, inv_perm, offsets
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tokens, choices): one token, partial warps, more choices than lanes, many tiles.
SIZES = [(1, 1), (7, 3), (83, 8), (769, 37), (4099, 8), (100003, 5)]


def _route_both(input, weight=None, noise=None, tau=1.0, hard=False):
    on_cuda = torch.ops.flextron.route.default(input, weight, noise, tau, hard)
    cpu = [None if t is None else t.cpu() for t in (input, weight, noise)]
    on_cpu = torch.ops.flextron.route.default(*cpu, tau, hard)
    return on_cuda, on_cpu


def _assert_same_grouping(on_cuda, expected):
    for name, ours, theirs in zip(
        ("choice", "perm", "inv_perm", "offsets"),
        (on_cuda[0], *on_cuda[2:]),
        (expected[0], *expected[2:]),
        strict=True,
    ):
        assert ours.dtype == torch.int64, name
        assert torch.equal(ours.cpu(), theirs.cpu()), name


def make_inputs(tokens, choices, *, hidden=None, dtype=torch.float32, noise=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    width = choices if hidden is None else hidden
    inp = torch.randn(tokens, width, generator=g).to(device, dtype)
    weight = None if hidden is None else torch.randn(choices, hidden, generator=g).to(device, dtype)
    gumbel = -torch.log(-torch.log(torch.rand(tokens, choices, generator=g).clamp_min(1e-9)))
    return inp, weight, gumbel.to(device) if noise else None


def check_against_reference(inp, weight, noise, tau, hard):
    leaves = [t.detach().clone().requires_grad_() for t in (inp, weight) if t is not None]
    leaves_ref = [t.detach().clone().requires_grad_() for t in (inp, weight) if t is not None]
    out = ops.route(leaves[0], leaves[1] if weight is not None else None, noise, tau, hard)
    ref = reference.route(leaves_ref[0], leaves_ref[1] if weight is not None else None, noise, tau, hard)
    for i in INDEX_OUTPUTS:
        assert out[i].dtype == torch.int64
        assert torch.equal(out[i], ref[i]), f"output {i} differs"
    assert torch.equal(out[2], torch.sort(out[0], stable=True).indices)
    tol = dict(atol=1e-6, rtol=1e-5) if inp.dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out[1], ref[1], **tol)
    grad_probs = torch.randn(out[1].shape, generator=torch.Generator().manual_seed(3)).to(out[1])
    grads = torch.autograd.grad(out[1], leaves, grad_probs)
    grads_ref = torch.autograd.grad(ref[1], leaves_ref, grad_probs)
    for ours, theirs in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("tokens,choices", [(1, 1), (7, 4), (83, 3), (769, 8)])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(tokens, choices, hard, noise, dtype):
    inp, _, gumbel = make_inputs(tokens, choices, dtype=dtype, noise=noise)
    check_against_reference(inp, None, gumbel, 0.7, hard)


@pytest.mark.parametrize("hard", [False, True])
def test_fused_router_projection(hard):
    inp, weight, gumbel = make_inputs(83, 4, hidden=24)
    check_against_reference(inp, weight, gumbel, 1.3, hard)


def test_ties_go_to_the_lowest_index():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0], [0.0, 0.0, 5.0]])
    choice, *_ = ops.route(logits)
    assert choice.tolist() == [0, 1, 0, 2]


def test_grouping_is_stable_and_offsets_count_groups():
    logits = torch.nn.functional.one_hot(torch.tensor([2, 0, 2, 1, 0, 2]), 4).float()
    choice, _, perm, inv_perm, offsets = ops.route(logits)
    assert perm.tolist() == [1, 4, 3, 0, 2, 5]
    assert offsets.tolist() == [0, 2, 3, 6, 6]  # the last choice is empty
    assert torch.equal(perm[inv_perm], torch.arange(6))


def test_hard_probs_are_one_hot_with_soft_gradient():
    inp, _, _ = make_inputs(9, 3)
    _, probs, *_ = ops.route(inp, hard=True)
    assert torch.equal(probs.sum(-1), torch.ones(9)) and set(probs.unique().tolist()) <= {0.0, 1.0}


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 200), choices=st.integers(1, 9), hard=st.booleans(), seed=st.integers(0, 99))
def test_hypothesis_shapes(tokens, choices, hard, seed):
    inp, _, gumbel = make_inputs(tokens, choices, seed=seed)
    check_against_reference(inp.round(decimals=1), None, None, 1.0, hard)  # rounding makes ties common
    check_against_reference(inp, None, gumbel, 0.5, hard)


def test_opcheck():
    inp, weight, gumbel = make_inputs(11, 4, hidden=6)
    for requires_grad in (False, True):
        logits = inp.detach().clone().requires_grad_(requires_grad)  # 6 choices
        fused = (inp.detach().clone().requires_grad_(requires_grad), weight.detach().clone())
        # opcheck's AOT backward check sums all outputs starting from `choice` (int64) and
        # fails on the dtype promotion; test_torch_compile_fullgraph covers AOT autograd.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        utils += () if requires_grad else ("test_aot_dispatch_dynamic",)
        for args in [(logits, None, torch.zeros(11, 6), 0.5, False), (*fused, None, 1.0, True)]:
            torch.library.opcheck(torch.ops.flextron.route.default, args, test_utils=utils)


def test_torch_compile_fullgraph():
    inp, weight, _ = make_inputs(10, 3, hidden=5)
    weight.requires_grad_()

    def loss(inp, weight):
        choice, probs, perm, inv_perm, offsets = ops.route(inp, weight, None, 0.5, True)
        return (probs.gather(1, choice[:, None]) * perm[inv_perm].float()[:, None]).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(inp, weight), weight)
    (grad_eager,) = torch.autograd.grad(loss(inp, weight), weight)
    torch.testing.assert_close(grad, grad_eager)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("weight", [False, True])
def test_nan_logits_follow_the_reference(hard, weight):
    """A NaN logit is the row's choice (the first NaN), and its probabilities are all NaN."""
    inp, _, gumbel = make_inputs(64, 5)
    inp[::3, 2] = float("nan")
    inp[::6, 4] = float("nan")  # two NaNs in a row: the first one is chosen
    inp[1::9, 0] = float("nan")
    projection = torch.eye(5) if weight else None
    for noise in (None, gumbel):
        out = ops.route(inp, projection, noise, 0.7, hard)
        ref = reference.route(inp, projection, noise, 0.7, hard)
        for i in INDEX_OUTPUTS:
            assert torch.equal(out[i], ref[i]), f"output {i} differs"
        torch.testing.assert_close(out[1], ref[1], equal_nan=True)
    if not weight:  # (through the projection, NaN * 0 spreads a NaN over its whole row)
        assert out[0][::3].eq(2).all() and out[0][1::9].eq(0).all()
    assert out[1][::3].isnan().all() and not out[1][2::3].isnan().any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input=torch.randn(5)), "input"),
        (dict(input=torch.randn(5, 3).long()), "input"),
        (dict(tau=0.0), "tau"),
        (dict(noise=torch.randn(5, 2)), "noise"),
        (dict(weight=torch.randn(4, 7)), "weight"),
        (dict(weight=torch.randn(4, 3).double()), "weight"),
        (dict(input=torch.randn(5, 0)), "choice"),
        (dict(noise=torch.randn(5, 3).double()), "noise must be float32 or the input's dtype"),
        (dict(noise=torch.zeros(5, 3, dtype=torch.int64)), "noise must be float32 or the input's dtype"),
        (dict(input=torch.randn(5, 3).bfloat16(), noise=torch.randn(5, 3).half()), "noise must be"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(input=torch.randn(5, 3), weight=None, noise=None, tau=1.0, hard=False) | kwargs
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flextron.route(**args)


# ---- every device and CUDA only --------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize("hard", [False, True])
def test_matches_cpu_op(dtype, size, with_noise, hard):
    tokens, choices = size
    gen = torch.Generator(device="cuda").manual_seed(tokens + choices)
    logits = torch.randn(tokens, choices, device="cuda", generator=gen).to(dtype)
    noise = torch.rand(tokens, choices, device="cuda", generator=gen) if with_noise else None
    on_cuda, on_cpu = _route_both(logits, noise=noise, tau=0.7, hard=hard)
    _assert_same_grouping(on_cuda, on_cpu)
    assert on_cuda[1].dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}  # else dtype defaults
    torch.testing.assert_close(on_cuda[1].cpu(), on_cpu[1], **tolerance)
    _assert_same_grouping(on_cuda, reference.route(logits, None, noise, 0.7, hard))


@pytest.mark.cuda
def test_ties_go_to_the_lowest_index_and_nan_matches_cpu():
    gen = torch.Generator(device="cuda").manual_seed(5)
    ties = torch.randint(0, 3, (5000, 40), device="cuda", generator=gen).float()  # many ties
    on_cuda, on_cpu = _route_both(ties)
    _assert_same_grouping(on_cuda, on_cpu)
    _assert_same_grouping(on_cuda, reference.route(ties, None, None, 1.0, False))
    nans = torch.randn(300, 40, device="cuda", generator=gen)
    nans[torch.rand(300, 40, device="cuda", generator=gen) < 0.1] = float("nan")
    nans[::7, 0] = float("nan")  # NaN at index 0 wins the CPU's strict '>' scan
    nans[1::7] = float("-inf")
    on_cuda, on_cpu = _route_both(nans)
    _assert_same_grouping(on_cuda, on_cpu)
    torch.testing.assert_close(on_cuda[1].cpu(), on_cpu[1], equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_weight_and_non_contiguous_input(device, dtype):
    gen = torch.Generator(device=device).manual_seed(6)
    hidden = torch.randn(96, 515, device=device, generator=gen).to(dtype)[:, 3:]  # (T, 512), strided
    weight = (torch.randn(8, 512, device=device, generator=gen) / 512**0.5).to(dtype)
    ours = ops.route(hidden, weight, None, 1.0, False)
    theirs = reference.route(hidden, weight, None, 1.0, False)
    _assert_same_grouping(ours, theirs)
    torch.testing.assert_close(ours[1], theirs[1])
    logits_t = torch.randn(8, 257, device=device, generator=gen).to(dtype).t()  # (257, 8), transposed
    _assert_same_grouping(ops.route(logits_t), reference.route(logits_t.cpu(), None, None, 1.0, False))


def test_empty_and_deterministic(device):
    empty = torch.empty(0, 4, device=device)
    choice, probs, perm, inv_perm, offsets = ops.route(empty)
    assert choice.shape == (0,) and probs.shape == (0, 4) and perm.shape == inv_perm.shape == (0,)
    assert torch.equal(offsets.cpu(), torch.zeros(5, dtype=torch.int64))
    logits = torch.randn(20000, 6, device=device)
    first, second = ops.route(logits), ops.route(logits)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("with_weight", [False, True])
def test_backward_matches_reference(device, hard, with_weight):
    gen = torch.Generator(device=device).manual_seed(7)
    tensors = [torch.randn(50, 16 if with_weight else 6, device=device, generator=gen)]
    if with_weight:
        tensors.append(torch.randn(6, 16, device=device, generator=gen))
    noise = torch.rand(50, 6, device=device, generator=gen)
    grad_probs = torch.randn(50, 6, device=device, generator=gen)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in tensors]
        weight = leaves[1] if with_weight else None
        fn(leaves[0], weight, noise, 0.5, hard)[1].backward(grad_probs)
        return [leaf.grad for leaf in leaves]

    for ours, theirs in zip(grads(ops.route), grads(reference.route), strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_opcheck(dtype):
    logits = torch.randn(37, 5, device="cuda", dtype=dtype, requires_grad=True)
    noise = torch.rand(37, 5, device="cuda")
    torch.library.opcheck(torch.ops.flextron.route.default, (logits, None, noise, 0.5, False))
    hidden = torch.randn(37, 24, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(5, 24, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.flextron.route.default, (hidden, weight, None, 1.0, True))


@pytest.mark.cuda
def test_torch_compile_inductor():
    logits = torch.randn(300, 8, device="cuda")

    def grouped(logits):
        choice, probs, perm, inv_perm, offsets = ops.route(logits, None, None, 1.0, True)
        return probs.sum(-1), perm, offsets

    compiled = torch.compile(grouped, fullgraph=True)
    for ours, theirs in zip(compiled(logits), grouped(logits), strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.cuda
def test_bad_input_on_cuda_names_the_argument():
    logits = torch.randn(10, 4, device="cuda")
    with pytest.raises(RuntimeError, match="tau must be positive"):
        ops.route(logits, tau=0.0)
    with pytest.raises(RuntimeError, match="noise must have shape"):
        ops.route(logits, noise=torch.rand(10, 5, device="cuda"))
    with pytest.raises(RuntimeError, match="noise is on"):
        ops.route(logits, noise=torch.rand(10, 4))
    with pytest.raises(RuntimeError, match="input must be 2-D"):
        ops.route(logits[0])
    with pytest.raises(RuntimeError, match="input must be float32"):
        ops.route(logits.long())
    with pytest.raises(RuntimeError, match="weight has 3 input features"):
        ops.route(logits, torch.randn(2, 3, device="cuda"))
    with pytest.raises(RuntimeError, match="weight is on"):
        ops.route(logits, torch.randn(2, 4))


@pytest.mark.cuda
def test_cuda_graph_capture():
    """route captures into a CUDA graph (no host synchronisation); replays with new logits
    copied into the static input give the eager grouping bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    static_logits = torch.randn(1000, 6, device="cuda", generator=gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.route(static_logits, None, None, 1.0, True)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.route(static_logits, None, None, 1.0, True)
    for _ in range(3):
        static_logits.copy_(torch.randn(1000, 6, device="cuda", generator=gen))
        graph.replay()
        eager = ops.route(static_logits, None, None, 1.0, True)
        _assert_same_grouping(captured, eager)
        torch.testing.assert_close(captured[1], eager[1], rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 33, 4099])
def test_outputs_fully_written_over_poisoned_memory(tokens):
    """perm, inv_perm, offsets and probs are written in full: with sentinel-filled blocks of
    their sizes waiting in the allocator, the results equal the CPU op's."""
    choices = 5
    logits = torch.randn(
        tokens, choices, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9)
    )
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [
        torch.full((n,), -7, device="cuda", dtype=torch.int64)
        for n in (tokens, choices + 1)
        for _ in range(4)
    ]
    blocks += [torch.full((tokens, choices), float("nan"), device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    del blocks
    on_cuda, on_cpu = _route_both(logits)
    _assert_same_grouping(on_cuda, on_cpu)
    assert torch.isfinite(on_cuda[1]).all()
    torch.testing.assert_close(on_cuda[1].cpu(), on_cpu[1])
