"""route on CUDA: bit-equal to the CPU op in choice/perm/inv_perm/offsets, close in probs.

Every test but the build check skips without a GPU; the skip condition is a string,
so nothing touches CUDA when the module is imported.
"""

from __future__ import annotations

import pytest
import torch

from flextron import _C, ops, reference

needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA device")
pytestmark = pytest.mark.cuda

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


def test_cuda_kernel_registered_when_built():
    if not _C.build_info()["cuda_built"]:
        pytest.skip("built without CUDA")
    assert "CUDA" in ops.backends("route")


@needs_cuda
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


@needs_cuda
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


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_weight_and_non_contiguous_input(dtype):
    gen = torch.Generator(device="cuda").manual_seed(6)
    hidden = torch.randn(96, 515, device="cuda", generator=gen).to(dtype)[:, 3:]  # (T, 512), strided
    weight = (torch.randn(8, 512, device="cuda", generator=gen) / 512**0.5).to(dtype)
    ours = ops.route(hidden, weight, None, 1.0, False)
    theirs = reference.route(hidden, weight, None, 1.0, False)
    _assert_same_grouping(ours, theirs)
    torch.testing.assert_close(ours[1], theirs[1])
    logits_t = torch.randn(8, 257, device="cuda", generator=gen).to(dtype).t()  # (257, 8), transposed
    _assert_same_grouping(*_route_both(logits_t))


@needs_cuda
def test_empty_and_deterministic():
    empty = torch.empty(0, 4, device="cuda")
    choice, probs, perm, inv_perm, offsets = ops.route(empty)
    assert choice.shape == (0,) and probs.shape == (0, 4) and perm.shape == inv_perm.shape == (0,)
    assert torch.equal(offsets.cpu(), torch.zeros(5, dtype=torch.int64))
    logits = torch.randn(20000, 6, device="cuda")
    first, second = ops.route(logits), ops.route(logits)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("with_weight", [False, True])
def test_backward_matches_reference(hard, with_weight):
    gen = torch.Generator(device="cuda").manual_seed(7)
    tensors = [torch.randn(50, 16 if with_weight else 6, device="cuda", generator=gen)]
    if with_weight:
        tensors.append(torch.randn(6, 16, device="cuda", generator=gen))
    noise = torch.rand(50, 6, device="cuda", generator=gen)
    grad_probs = torch.randn(50, 6, device="cuda", generator=gen)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in tensors]
        weight = leaves[1] if with_weight else None
        fn(leaves[0], weight, noise, 0.5, hard)[1].backward(grad_probs)
        return [leaf.grad for leaf in leaves]

    for ours, theirs in zip(grads(ops.route), grads(reference.route), strict=True):
        torch.testing.assert_close(ours, theirs)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    logits = torch.randn(37, 5, device="cuda", dtype=dtype, requires_grad=True)
    noise = torch.rand(37, 5, device="cuda")
    torch.library.opcheck(torch.ops.flextron.route.default, (logits, None, noise, 0.5, False))
    hidden = torch.randn(37, 24, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(5, 24, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.flextron.route.default, (hidden, weight, None, 1.0, True))


@needs_cuda
def test_torch_compile_fullgraph():
    logits = torch.randn(300, 8, device="cuda")

    def grouped(logits):
        choice, probs, perm, inv_perm, offsets = ops.route(logits, None, None, 1.0, True)
        return probs.sum(-1), perm, offsets

    compiled = torch.compile(grouped, fullgraph=True)
    for ours, theirs in zip(compiled(logits), grouped(logits), strict=True):
        torch.testing.assert_close(ours, theirs)


@needs_cuda
def test_bad_input_names_the_argument():
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


@needs_cuda
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


@needs_cuda
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
