"""route against the reference: decisions bit-equal, probabilities and gradients close."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import ops, reference

INDEX_OUTPUTS = (0, 2, 3, 4)  # choice, perm, inv_perm, offsets


def make_inputs(tokens, choices, hidden=None, dtype=torch.float32, noise=True, device="cpu", seed=0):
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


@pytest.mark.cuda
@pytest.mark.parametrize("hard", [False, True])
def test_cuda_matches_cpu_or_says_not_built(hard):
    inp, _, gumbel = make_inputs(4099, 4, device="cuda")
    if "CUDA" not in ops.backends("route"):
        with pytest.raises(NotImplementedError, match="not built for CUDA"):
            ops.route(inp, None, gumbel, 1.0, hard)
        return
    out = ops.route(inp, None, gumbel, 1.0, hard)
    cpu = ops.route(inp.cpu(), None, gumbel.cpu(), 1.0, hard)
    for i in INDEX_OUTPUTS:
        assert torch.equal(out[i].cpu(), cpu[i])
    torch.testing.assert_close(out[1].cpu(), cpu[1])
