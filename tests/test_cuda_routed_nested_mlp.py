"""routed_nested_mlp on CUDA against flextron.reference (grouped CUTLASS path and fallback).

Tolerances by comparison: our error against an fp64 reference stays within twice PyTorch's
own error at the same precision (plus a small floor).  Every test but the build check skips
without a GPU; the skip condition is a string, so nothing touches CUDA at import.
An out-of-range choice trips a device-side assert, which poisons the CUDA context: that
case runs in a child process.  The cases that reach the kernels' risky paths (many tiles per
CTA, K tails, D = 0) run with the sm90 path on and off (FLEXTRON_DISABLE_SM90).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

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


def _grads(fn, tensors, choice, widths, activation, grad_y):
    """Gradients of fn's output (against grad_y) w.r.t. the tensors that are not None."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    xl, gl, ul, dl, sl = leaves
    fn(xl, gl, ul, dl, choice, widths, sl, activation).backward(grad_y.to(xl.dtype))
    return [leaf.grad for leaf in leaves if leaf is not None]


def _check_backward(x, w_gate, w_up, w_down, choice, widths, scale, activation):
    grad_y = torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9))
    differentiable = [x, w_gate, w_up, w_down, scale]
    ours = _grads(ops.routed_nested_mlp, differentiable, choice, widths, activation, grad_y)
    theirs = _grads(reference.routed_nested_mlp, differentiable, choice, widths, activation, grad_y)
    exact = _grads(reference.routed_nested_mlp, _double(differentiable), choice, widths, activation, grad_y)
    for our_grad, their_grad, exact_grad in zip(ours, theirs, exact, strict=True):
        _assert_as_accurate_as_torch(our_grad, their_grad, exact_grad)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_backward_matches_reference(dtype, activation, case, with_scale):
    _check_backward(*_inputs(*case, activation, dtype, seed=1, with_scale=with_scale), activation)


# Group occupancy of the band-form backward: every token in the widest group, every token in
# the narrowest (the wider bands have K = 0 rows: their weight gradients must be exactly zero),
# every token in a middle group, and one token.
ONE_GROUP = [
    (64, 64, 256, [256, 192, 128, 64], 0),
    (64, 64, 256, [256, 192, 128, 64], 3),
    (129, 64, 256, [256, 192, 128, 64], 2),
    (1, 64, 256, [256, 128], 1),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", ONE_GROUP)
def test_backward_all_tokens_in_one_group(dtype, case):
    tokens, hidden, ffn, widths, only = case
    x, w_gate, w_up, w_down, _, _, scale = _inputs(tokens, hidden, ffn, widths, "swiglu", dtype, seed=2)
    choice = torch.full((tokens,), only, device="cuda", dtype=torch.int64)
    _check_backward(x, w_gate, w_up, w_down, choice, widths, scale, "swiglu")
    leaves = [t.clone().requires_grad_() for t in (w_gate, w_up, w_down)]
    ops.routed_nested_mlp(x, *leaves, choice, widths, scale, "swiglu").sum().backward()
    used = widths[only]
    assert not leaves[0].grad[used:].any() and not leaves[1].grad[used:].any()
    assert not leaves[2].grad[:, used:].any()


def _cuda_kernel_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def _runs_sm90_path() -> bool:
    """The forward GEMMs run CUTLASS 3.x ptr-array kernels: a 90a build on an sm_90 device."""
    return bool(_C.build_info().get("sm90_kernels")) and torch.cuda.get_device_capability() == (9, 0)


def _grouped_launches(names: list[str]) -> tuple[int, int]:
    """(CUTLASS 2.x GemmGrouped launches, CUTLASS 3.x grouped GemmUniversal launches)."""
    v2 = sum("cutlass::gemm::kernel::GemmGrouped<" in name for name in names)
    v3 = sum("GemmUniversal<" in name and "GroupProblemShape" in name for name in names)
    return v2, v3


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("disable_sm90", [False, True])
def test_aligned_16bit_shapes_run_grouped_cutlass(dtype, disable_sm90, monkeypatch):
    """Forward: 2 grouped launches (up+gate, down); backward: recompute up+gate, grad_hidden,
    grad_x (up, then gate with beta = 1), all weight-gradient bands: 5 launches, all on the
    sm90a kernel where it runs."""
    if disable_sm90:
        monkeypatch.setenv("FLEXTRON_DISABLE_SM90", "1")
    sm90 = _runs_sm90_path() and not disable_sm90
    x, w_gate, w_up, w_down, choice, widths, scale = _inputs(*CASES[0], "swiglu", dtype)
    forward = _grouped_launches(
        _cuda_kernel_names(lambda: ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale))
    )
    assert forward == ((0, 2) if sm90 else (2, 0)), forward
    leaves = [t.clone().requires_grad_() for t in (x, w_gate, w_up, w_down, scale)]
    y = ops.routed_nested_mlp(leaves[0], *leaves[1:4], choice, widths, leaves[4])
    backward = _grouped_launches(_cuda_kernel_names(lambda: y.backward(torch.ones_like(y))))
    assert backward == ((0, 5) if sm90 else (5, 0)), backward
    # Either kernel family matches the reference.
    args = (x, w_gate, w_up, w_down, choice, widths, scale)
    _assert_as_accurate_as_torch(
        ops.routed_nested_mlp(*args, "swiglu"),
        reference.routed_nested_mlp(*args, "swiglu"),
        reference.routed_nested_mlp(*_double(args), "swiglu"),
    )
    _check_backward(*args, "swiglu")


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


def _route_and_mlp(x, router, w_gate, w_up, w_down, widths):
    """A routed layer: route (hard choice, its probability as the scale), then the MLP."""
    choice, probs, _, _, _ = ops.route(x, router, None, 1.0, True)
    scale = probs.gather(1, choice.unsqueeze(1)).squeeze(1)
    return ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale, "swiglu")


@needs_cuda
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


@needs_cuda
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


@pytest.fixture(params=["sm90", "no_sm90"])
def sm90_path(request, monkeypatch):
    """Runs a test with the sm90a kernels allowed and with FLEXTRON_DISABLE_SM90=1 (the same
    path twice on GPUs other than sm_90)."""
    if request.param == "no_sm90":
        monkeypatch.setenv("FLEXTRON_DISABLE_SM90", "1")
    else:
        monkeypatch.delenv("FLEXTRON_DISABLE_SM90", raising=False)
    return request.param


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
    exact = _grads(reference.routed_nested_mlp, as_fp32[:4] + as_fp32[6:], choice, widths, activation, grad_y)
    labels = ("x", "w_gate", "w_up", "w_down", "scale")
    names = [name for name, t in zip(labels, differentiable, strict=True) if t is not None]
    for name, our_grad, their_grad, exact_grad in zip(names, ours, theirs, exact, strict=True):
        assert torch.isfinite(our_grad).all(), name
        _assert_as_accurate_as_torch(our_grad, their_grad, exact_grad.double())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_tile_grouped_gemms(dtype, sm90_path):
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


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", K_TAILS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_k_tails(dtype, case, activation, sm90_path):
    tokens, hidden, ffn, widths = case
    args = _inputs(tokens, hidden, ffn, widths, activation, dtype, seed=13)
    gen = torch.Generator(device="cuda").manual_seed(14)
    choice = torch.randint(0, len(widths), (tokens,), device="cuda", generator=gen)
    _check_against_fp32((*args[:4], choice, widths, args[6]), activation)


@needs_cuda
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


@needs_cuda
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


@needs_cuda
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
