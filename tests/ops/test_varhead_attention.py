"""flextron.ops.varhead_attention against flextron.ops.reference.varhead_attention.

Forward and backward (autograd through both), MHA/GQA/MQA, causal and not, prefill
(Sq == Sk), decode (Sq == 1) and chunked prefill (1 < Sq < Sk), odd sizes, mixed head
counts per sequence, non-contiguous inputs, fp32, bf16 and fp16, opcheck, torch.compile,
hypothesis-drawn shapes and argument errors; the tests of one contract run on every device
(the `device` parameter, tests/conftest.py). On CUDA also: bucketed head counts (consecutive
buckets as views, scattered ones gathered), heads on the CPU, row-blocked backward,
uninitialised memory and CUDA graphs.

fp32 is compared with the fp32 reference at fp32 tolerances; bf16/fp16 error must stay within
twice PyTorch's own SDPA error at that precision (tests/ops/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import ops
from flextron.ops import reference

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

FP32_TOL = dict(atol=1e-5, rtol=1e-4)  # fp32 against a float64 reference


def make_inputs(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    transposed: bool = False,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, Hq, Sq, Dh), k and v (B, Hkv, Sk, Dh); transposed=True gives the strided
    views a model gets from a (B, S, H, Dh) projection.  Values depend only on the seed."""
    gen = torch.Generator().manual_seed(seed)

    def draw(heads: int, length: int) -> torch.Tensor:
        if transposed:
            drawn = torch.randn(batch, length, heads, head_dim, generator=gen).to(device, dtype)
            return drawn.transpose(1, 2)
        return torch.randn(batch, heads, length, head_dim, generator=gen).to(device, dtype)

    return draw(q_heads, q_len), draw(kv_heads, kv_len), draw(kv_heads, kv_len)


def mixed_heads(batch: int, q_heads: int) -> torch.Tensor:
    """(B,) head counts covering all heads, one head and values in between."""
    counts = [q_heads, 1, max(1, q_heads // 2), max(1, q_heads - 1)]
    return torch.tensor([counts[b % len(counts)] for b in range(batch)], dtype=torch.int64)


def run_with_grads(
    fn: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: torch.Tensor,
    causal: bool,
    grad_out: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, Grads]:
    """fn's output and the gradients of <out, grad_out> w.r.t. q, k, v."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, heads, causal, scale)
    out.backward(grad_out)
    return out.detach(), tuple(t.grad for t in leaves)


def assert_all_close(out: torch.Tensor, grads: Grads, out_ref: torch.Tensor, grads_ref: Grads) -> None:
    """fp32 tolerances: the kernel and the reference differ only in summation order."""
    torch.testing.assert_close(out, out_ref, **FP32_TOL)
    for name, grad, grad_ref in zip("qkv", grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, **FP32_TOL, msg=lambda m, n=name: f"grad_{n}: {m}")


def assert_inactive_zero(out: torch.Tensor, grad_q: torch.Tensor, heads: torch.Tensor) -> None:
    for b, count in enumerate(heads.tolist()):
        assert torch.all(out[b, count:] == 0)
        assert torch.all(grad_q[b, count:] == 0)


def check_against_reference(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    causal: bool,
    heads: torch.Tensor,
    transposed: bool = False,
    scale: float | None = None,
    device: str = "cpu",
) -> None:
    q, k, v = make_inputs(
        batch, q_heads, kv_heads, q_len, kv_len, head_dim, transposed=transposed, device=device
    )
    grad_out = torch.randn(batch, q_len, q_heads, head_dim).to(device).transpose(1, 2)  # non-contiguous too
    out, grads = run_with_grads(ops.varhead_attention, q, k, v, heads, causal, grad_out, scale)
    out_ref, grads_ref = run_with_grads(reference.varhead_attention, q, k, v, heads, causal, grad_out, scale)
    assert_all_close(out, grads, out_ref, grads_ref)
    assert_inactive_zero(out, grads[0], heads)


# ---- fp32 against the reference --------------------------------------------------------

HEAD_LAYOUTS = [(4, 4), (6, 2), (3, 1)]  # (Hq, Hkv): MHA, GQA, MQA
LENGTHS = [(1, 1), (7, 7), (83, 83), (1, 83), (5, 12), (70, 130)]  # (Sq, Sk): prefill, decode, chunked


@pytest.mark.parametrize(
    "q_heads,kv_heads,q_len", [(1, 1, 1), (2, 1, 1), (3, 1, 1), (8, 2, 1), (2, 1, 2), (5, 1, 1)]
)
@pytest.mark.parametrize("head_dim", [8, 40, 64, 72])
def test_decode_rows_match_reference(q_heads, kv_heads, q_len, head_dim):
    # 1-4 query rows per KV group take the few-rows kernels (scores, then P @ V),
    # 5 the BLAS; head dims with and without a remainder past the kernels' blocks.
    check_against_reference(2, q_heads, kv_heads, q_len, 97, head_dim, True, mixed_heads(2, q_heads))


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_backward_split_over_threads(threads, causal):
    # Fewer (sequence, KV head) pairs than threads: the backward splits the query
    # blocks into chunks and adds their dK/dV slots.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(1, 3, 1, 300, 300, 16, causal, torch.tensor([2]))
        check_against_reference(2, 4, 2, 130, 140, 8, causal, torch.tensor([4, 1]))
    finally:
        torch.set_num_threads(previous)


def test_expanded_grad_out():
    # out.sum().backward() hands the kernel a stride-0 grad_out.
    q, k, v = make_inputs(2, 4, 2, 11, 11, 8)
    heads = torch.tensor([3, 4])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ops.varhead_attention(*leaves, heads, True).sum().backward()
    leaves_ref = [t.detach().requires_grad_() for t in (q, k, v)]
    reference.varhead_attention(*leaves_ref, heads, True).sum().backward()
    for leaf, leaf_ref in zip(leaves, leaves_ref, strict=True):
        torch.testing.assert_close(leaf.grad, leaf_ref.grad, **FP32_TOL)


def test_default_call_is_causal():
    q, k, v = make_inputs(2, 2, 1, 6, 6, 8)
    heads = torch.tensor([2, 1])
    torch.testing.assert_close(
        ops.varhead_attention(q, k, v, heads), reference.varhead_attention(q, k, v, heads, True)
    )


# ---- bf16: no worse than PyTorch's own bf16 attention ---------------------------------------


def torch_attention(q, k, v, heads, causal, scale=None):
    """PyTorch's SDPA with the same semantics (bottom-right causal mask, head prefix)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    mask = None
    if causal:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    active = torch.arange(q.shape[1], device=q.device)[None, :] < heads[:, None]  # (B, Hq)
    return out * active[:, :, None, None].to(out.dtype)


@pytest.fixture(scope="session")
def check_low_precision(assert_matches_reference):
    """Handed to the tests as a fixture: it needs assert_matches_reference."""

    def check_low_precision(
        dtype: torch.dtype, q_len: int, kv_len: int, causal: bool, device: str = "cpu", head_dim: int = 64
    ) -> None:
        """Output and gradients within 2x PyTorch's own error at `dtype` (SDPA on the same
        inputs), both measured against the fp32 reference on the same values."""
        batch, q_heads, kv_heads = 2, 6, 2
        q, k, v = (
            t.to(device)
            for t in make_inputs(
                batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype=dtype, transposed=True
            )
        )
        heads = torch.tensor([6, 3], device=device)
        grad_out = torch.randn(batch, q_heads, q_len, head_dim).to(device, dtype)
        out_ref, grads_ref = run_with_grads(
            reference.varhead_attention, q.float(), k.float(), v.float(), heads, causal, grad_out.float()
        )
        out, grads = run_with_grads(ops.varhead_attention, q, k, v, heads, causal, grad_out)
        out_torch, grads_torch = run_with_grads(torch_attention, q, k, v, heads, causal, grad_out)
        for ours, theirs, exact in zip(
            (out, *grads), (out_torch, *grads_torch), (out_ref, *grads_ref), strict=True
        ):
            assert_matches_reference(ours, theirs, exact)
        assert_inactive_zero(out.cpu(), grads[0].cpu(), heads.cpu())

    return check_low_precision


# ---- opcheck, torch.compile, hypothesis ---------------------------------------------------


def test_torch_compile_fullgraph():
    q, k, v = make_inputs(2, 6, 2, 9, 9, 16)
    heads = torch.tensor([6, 2])
    grad_out = torch.randn(2, 6, 9, 16)

    def attend(q, k, v, heads, causal, scale):
        return ops.varhead_attention(q * 1.0, k, v, heads, causal, scale)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    out, grads = run_with_grads(compiled, q, k, v, heads, True, grad_out)
    out_ref, grads_ref = run_with_grads(reference.varhead_attention, q, k, v, heads, True, grad_out)
    assert_all_close(out, grads, out_ref, grads_ref)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    q_len=st.integers(1, 70),
    extra_keys=st.integers(0, 20),
    head_dim=st.sampled_from([1, 8, 24]),
    causal=st.booleans(),
    transposed=st.booleans(),
    data=st.data(),
)
def test_hypothesis_shapes(batch, kv_heads, group, q_len, extra_keys, head_dim, causal, transposed, data):
    q_heads = kv_heads * group
    heads = torch.tensor(data.draw(st.lists(st.integers(1, q_heads), min_size=batch, max_size=batch)))
    check_against_reference(
        batch, q_heads, kv_heads, q_len, q_len + extra_keys, head_dim, causal, heads, transposed=transposed
    )


# ---- argument errors ----------------------------------------------------------------------


def _bad_inputs():
    q, k, v = make_inputs(2, 4, 2, 5, 5, 8)
    heads = torch.tensor([4, 2])
    return [
        ("q rank", (q[0], k, v, heads, True), "q must be 4-D"),
        ("k rank", (q, k[0], v, heads, True), "k must be 4-D"),
        ("v rank", (q, k, v[0], heads, True), "v must be 4-D"),
        ("int q", (q.long(), k.long(), v.long(), heads, True), "q must be float32"),
        ("k dtype", (q, k.double(), v, heads, True), "k has dtype"),
        ("v dtype", (q, k, v.to(torch.bfloat16), heads, True), "v has dtype"),
        ("heads dtype", (q, k, v, heads.int(), True), "heads must be int64"),
        ("heads shape", (q, k, v, heads[:1], True), "heads must have shape"),
        ("heads 2-D", (q, k, v, heads[:, None], True), "heads must have shape"),
        ("k batch", (q, k[:1], v[:1], heads, True), "k has batch"),
        ("v shape", (q, k, v[:, :1], heads, True), "v has shape"),
        ("head dim", (q, k[..., :4], v[..., :4], heads, True), "k has head dim"),
        ("group", (q[:, :3], k, v, torch.tensor([3, 2]), True), "not a multiple"),
        ("too few heads", (q, k, v, torch.tensor([4, 0]), True), r"heads\[1\] = 0 is too few heads"),
        ("too many heads", (q, k, v, torch.tensor([5, 2]), True), r"heads\[0\] = 5 is too many heads"),
        ("causal Sk < Sq", (q, k[:, :, :3], v[:, :, :3], heads, True), "causal attention needs"),
        ("no keys", (q, k[:, :, :0], v[:, :, :0], heads, False), "k must have at least one key"),
        ("scale", (q, k, v, heads, True, float("nan")), "scale must be finite"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_input_names_argument(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        ops.varhead_attention(*args)


def test_bad_grad_out_names_argument():
    q, k, v = make_inputs(1, 2, 1, 3, 3, 8)
    heads = torch.tensor([2])
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        torch.ops.flextron.varhead_attention_backward(q[:, :1], q, k, v, heads, True)
    with pytest.raises(RuntimeError, match="grad_out has dtype"):
        torch.ops.flextron.varhead_attention_backward(q.double(), q, k, v, heads, True)


def test_non_causal_allows_fewer_keys_than_queries():
    q, k, v = make_inputs(1, 2, 2, 6, 3, 8)
    heads = torch.tensor([2])
    torch.testing.assert_close(
        ops.varhead_attention(q, k, v, heads, False), reference.varhead_attention(q, k, v, heads, False)
    )


# ---- every device ----------------------------------------------------------------------------


def check_on_device(device: str, heads: list[int], *sizes, causal: bool, **options) -> None:
    """fp32 output and gradients against the reference on tensors on `device`; sizes are
    (Hq, Hkv, Sq, Sk, Dh), options those of check_against_reference."""
    counts = torch.tensor(heads, device=options.pop("heads_device", device))
    check_against_reference(len(heads), *sizes, causal, counts, device=device, **options)


@pytest.mark.parametrize("q_heads,kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("q_len,kv_len", LENGTHS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_matches_reference(device, q_heads, kv_heads, q_len, kv_len, causal, head_dim):
    # One sequence per head count (on CUDA every bucket a single, consecutive sequence).
    heads = mixed_heads(4, q_heads).tolist()
    check_on_device(device, heads, q_heads, kv_heads, q_len, kv_len, head_dim, causal=causal)


@pytest.mark.parametrize(
    "heads",
    [
        [6, 6, 6],  # a static configuration: one bucket, the whole batch as a view
        [3, 3, 3, 3],  # one bucket on half the heads
        [6, 1, 6, 1, 4],  # scattered buckets: gathered and scattered back
        [2, 2, 5, 5, 5, 1],  # consecutive runs of several sequences
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_buckets(device, heads, causal):
    check_on_device(device, heads, 6, 2, 33, 40, 16, causal=causal)


@pytest.mark.parametrize(
    "device,heads_device",
    [
        ("cpu", "cpu"),
        pytest.param("cuda", "cuda", marks=pytest.mark.cuda),
        pytest.param("cuda", "cpu", marks=pytest.mark.cuda),
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_transposed_inputs_and_heads_device(device, heads_device, causal):
    # q/k/v as the transposed views of (B, S, H, Dh) projections, read in place; heads on either device.
    check_on_device(
        device, [6, 2, 6], 6, 2, 83, 83, 64, causal=causal, heads_device=heads_device, transposed=True
    )


def test_head_dim_slice_and_custom_scale(device):
    # Rows with a stride larger than Dh (a slice of a wider tensor) and a given scale.
    q, k, v = (t[..., :24] for t in make_inputs(3, 4, 2, 9, 9, 40, device=device))
    heads = torch.tensor([3, 4, 3], device=device)
    grad_out = torch.randn(3, 4, 9, 24, device=device)
    out, grads = run_with_grads(ops.varhead_attention, q, k, v, heads, True, grad_out, 0.3)
    out_ref, grads_ref = run_with_grads(reference.varhead_attention, q, k, v, heads, True, grad_out, 0.3)
    assert_all_close(out, grads, out_ref, grads_ref)


def test_unused_kv_heads_get_zero_grads(device):
    # With 2 (or 1) of 6 query heads active only KV head 0 (of 3) is read.
    q, k, v = make_inputs(2, 6, 3, 10, 10, 8, device=device)
    grad_out = torch.randn(2, 6, 10, 8, device=device)
    heads = torch.tensor([2, 1], device=device)
    _, (_, grad_k, grad_v) = run_with_grads(ops.varhead_attention, q, k, v, heads, True, grad_out)
    assert torch.all(grad_k[:, 1:] == 0) and torch.all(grad_v[:, 1:] == 0)
    assert grad_k[:, 0].abs().sum() > 0


@pytest.mark.parametrize("causal", [True, False])
def test_no_queries(device, causal):
    q, k, v = make_inputs(2, 4, 2, 0, 5, 8, device=device)
    grad_out = torch.randn(2, 4, 0, 8, device=device)
    heads = torch.tensor([4, 1], device=device)
    out, grads = run_with_grads(ops.varhead_attention, q, k, v, heads, causal, grad_out)
    assert out.shape == (2, 4, 0, 8)
    assert all(torch.all(grad == 0) for grad in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "q_len,kv_len,causal", [(83, 83, True), (1, 83, True), (40, 83, True), (40, 83, False)]
)
def test_low_precision_error_within_twice_torch(check_low_precision, device, dtype, q_len, kv_len, causal):
    check_low_precision(dtype, q_len, kv_len, causal, device=device)


@pytest.mark.parametrize("bf16_dot", ["auto", "portable"])
@pytest.mark.parametrize("q_len", [1, 2])  # 3 and 6 rows per KV group: the few-rows kernels, the BLAS
@pytest.mark.parametrize("head_dim", [8, 40, 72])
def test_bf16_decode_reads_the_cache_as_stored(check_low_precision, monkeypatch, bf16_dot, q_len, head_dim):
    # A bf16 cache at decode time is read in bf16 by skinny_gemm.h (not widened per step).
    monkeypatch.setenv("FLEXTRON_BF16_DOT", bf16_dot)
    check_low_precision(torch.bfloat16, q_len, 97, True, head_dim=head_dim)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, causal, dtype):
    q, k, v = make_inputs(3, 4, 2, 5, 7, 16, dtype=dtype, device=device)
    heads = torch.tensor([4, 1, 4], device=device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), heads, causal, None)
    torch.library.opcheck(torch.ops.flextron.varhead_attention.default, args)


# ---- CUDA only -------------------------------------------------------------------------------


@pytest.mark.cuda
def test_long_sequence_backward_in_row_blocks():
    # 6 sequences x 8 heads x 1024 x 1024 scores in one bucket: two row blocks in the backward.
    check_on_device("cuda", [8, 4, 8, 8, 3, 8, 8, 8], 8, 2, 1024, 1024, 64, causal=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_uninitialised_memory_leaks_out(poison_cuda_cache, dtype):
    # Buffers the op would read before writing (an inactive head, a gradient slot) show up as NaN.
    q, k, v = make_inputs(5, 6, 2, 70, 70, 64, dtype=dtype, transposed=True, device="cuda")
    heads = torch.tensor([6, 1, 6, 4, 3], device="cuda")
    grad_out = torch.randn(5, 6, 70, 64, device="cuda").to(dtype)
    poison_cuda_cache(dtype)
    out, grads = run_with_grads(ops.varhead_attention, q, k, v, heads, True, grad_out)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    assert_inactive_zero(out, grads[0], heads.cpu())
    assert torch.all(grads[1][1, 1:] == 0) and torch.all(grads[2][1, 1:] == 0)  # 1 head reads KV head 0


@pytest.mark.cuda
def test_torch_compile_inductor():
    q, k, v = make_inputs(2, 6, 2, 9, 9, 16, device="cuda")
    heads = torch.tensor([6, 2], device="cuda")
    grad_out = torch.randn(2, 6, 9, 16, device="cuda")

    def attend(q, k, v, heads, causal, scale):
        return ops.varhead_attention(q * 1.0, k, v, heads, causal, scale)

    compiled = torch.compile(attend, fullgraph=True)
    out, grads = run_with_grads(compiled, q, k, v, heads, True, grad_out)
    out_ref, grads_ref = run_with_grads(reference.varhead_attention, q, k, v, heads, True, grad_out)
    assert_all_close(out, grads, out_ref, grads_ref)


@pytest.mark.cuda
def test_bad_input_on_cuda_names_the_argument():
    q, k, v = make_inputs(2, 4, 2, 5, 5, 8, device="cuda")
    heads = torch.tensor([4, 2], device="cuda")
    with pytest.raises(RuntimeError, match="k is on"):
        ops.varhead_attention(q, k.cpu(), v, heads, True)
    with pytest.raises(RuntimeError, match="v has dtype"):
        ops.varhead_attention(q, k, v.half(), heads, True)
    with pytest.raises(RuntimeError, match="heads must be int64"):
        ops.varhead_attention(q, k, v, heads.int(), True)
    with pytest.raises(RuntimeError, match=r"heads\[1\] = 0 is too few heads"):
        ops.varhead_attention(q, k, v, torch.tensor([4, 0], device="cuda"), True)
    with pytest.raises(RuntimeError, match=r"heads\[0\] = 5 is too many heads"):
        ops.varhead_attention(q, k, v, torch.tensor([5, 2]), True)
    with pytest.raises(RuntimeError, match="causal attention needs"):
        ops.varhead_attention(q, k[:, :, :3], v[:, :, :3], heads, True)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        torch.ops.flextron.varhead_attention_backward(q[:, :1], q, k, v, heads, True)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_graph_capture_with_scattered_buckets(causal):
    """With heads on the CPU the forward captures into a CUDA graph, scattered buckets (their
    sequence index on the device) and chunked GQA prefill (Sq != Sk, Sq >= Dh: KV expanded)
    included; replays with new q, k, v match eager runs."""
    heads = torch.tensor([6, 2, 6, 2, 4])
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(5, h, s, 16, device="cuda", generator=gen) for h, s in ((6, 40), (2, 48), (2, 48)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.varhead_attention(q, k, v, heads, causal)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.varhead_attention(q, k, v, heads, causal)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ops.varhead_attention(q, k, v, heads, causal))
