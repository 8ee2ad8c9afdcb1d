"""varhead_attention on CUDA against flextron.reference: per-sequence head counts bucketed
(consecutive buckets as views, scattered ones gathered), GQA, causal alignment for prefill,
decode and chunked prefill, forward (SDPA) and backward (fp32 recompute).

fp32 is compared with the fp32 reference at fp32 tolerances; bf16/fp16 error must stay within
twice PyTorch's own SDPA error at that precision (tests/utils.py).  Tests marked `cuda` skip
without a GPU; the registration check runs wherever the extension was built with CUDA.
"""

from __future__ import annotations

import pytest
import torch

from flextron import _C, ops, reference
from tests.test_varhead_attention import (
    HEAD_LAYOUTS,
    LENGTHS,
    assert_all_close,
    assert_inactive_zero,
    check_against_reference,
    check_low_precision,
    make_inputs,
    run_with_grads,
)
from tests.helpers import poison_cuda_cache


def check_on_cuda(heads: list[int], *sizes, causal: bool, heads_device: str = "cuda", **options) -> None:
    """fp32 output and gradients against the reference on the same CUDA tensors; sizes are
    (Hq, Hkv, Sq, Sk, Dh), options those of check_against_reference."""
    counts = torch.tensor(heads, device=heads_device)
    check_against_reference(len(heads), *sizes, causal, counts, device="cuda", **options)


def test_cuda_kernels_registered_when_built():
    if not _C.build_info()["cuda_built"]:
        pytest.skip("built without CUDA")
    assert "CUDA" in ops.backends("varhead_attention")
    assert "CUDA" in ops.backends("varhead_attention_backward")


@pytest.mark.cuda
@pytest.mark.parametrize("q_heads,kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("q_len,kv_len", LENGTHS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_matches_reference(q_heads, kv_heads, q_len, kv_len, causal, head_dim):
    # One sequence per head count: every bucket is a single (consecutive) sequence.
    heads = [q_heads, 1, max(1, q_heads // 2), max(1, q_heads - 1)]
    check_on_cuda(heads, q_heads, kv_heads, q_len, kv_len, head_dim, causal=causal)


@pytest.mark.cuda
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
def test_buckets(heads, causal):
    check_on_cuda(heads, 6, 2, 33, 40, 16, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads_device", ["cuda", "cpu"])
def test_transposed_inputs_and_heads_device(causal, heads_device):
    # q/k/v as the transposed views of (B, S, H, Dh) projections; heads on either device.
    check_on_cuda([6, 2, 6], 6, 2, 83, 83, 64, causal=causal, heads_device=heads_device, transposed=True)


@pytest.mark.cuda
def test_head_dim_slice_and_custom_scale():
    q, k, v = (t[..., :24] for t in make_inputs(3, 4, 2, 9, 9, 40, device="cuda"))
    heads = torch.tensor([3, 4, 3], device="cuda")
    grad_out = torch.randn(3, 4, 9, 24, device="cuda")
    out, grads = run_with_grads(ops.varhead_attention, q, k, v, heads, True, grad_out, 0.3)
    out_ref, grads_ref = run_with_grads(reference.varhead_attention, q, k, v, heads, True, grad_out, 0.3)
    assert_all_close(out, grads, out_ref, grads_ref)


@pytest.mark.cuda
def test_long_sequence_backward_in_row_blocks():
    # 6 sequences x 8 heads x 1024 x 1024 scores in one bucket: two row blocks in the backward.
    check_on_cuda([8, 4, 8, 8, 3, 8, 8, 8], 8, 2, 1024, 1024, 64, causal=True)


@pytest.mark.cuda
def test_unused_kv_heads_get_zero_grads():
    q, k, v = make_inputs(2, 6, 3, 10, 10, 8, device="cuda")
    grad_out = torch.randn(2, 6, 10, 8, device="cuda")
    heads = torch.tensor([2, 1], device="cuda")
    _, (_, grad_k, grad_v) = run_with_grads(ops.varhead_attention, q, k, v, heads, True, grad_out)
    assert torch.all(grad_k[:, 1:] == 0) and torch.all(grad_v[:, 1:] == 0)
    assert grad_k[:, 0].abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
def test_no_queries(causal):
    q, k, v = make_inputs(2, 4, 2, 0, 5, 8, device="cuda")
    grad_out = torch.randn(2, 4, 0, 8, device="cuda")
    out, grads = run_with_grads(ops.varhead_attention, q, k, v, torch.tensor([4, 1]), causal, grad_out)
    assert out.shape == (2, 4, 0, 8)
    assert all(torch.all(grad == 0) for grad in grads)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "q_len,kv_len,causal", [(83, 83, True), (1, 83, True), (40, 83, True), (40, 83, False)]
)
def test_low_precision_error_within_twice_torch(dtype, q_len, kv_len, causal):
    check_low_precision(dtype, q_len, kv_len, causal, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_uninitialised_memory_leaks_out(dtype):
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
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(causal, dtype):
    q, k, v = make_inputs(3, 4, 2, 5, 7, 16, dtype=dtype, device="cuda")
    heads = torch.tensor([4, 1, 4], device="cuda")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), heads, causal, None)
    torch.library.opcheck(torch.ops.flextron.varhead_attention.default, args)


@pytest.mark.cuda
def test_torch_compile_fullgraph():
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
def test_bad_input_names_the_argument():
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
