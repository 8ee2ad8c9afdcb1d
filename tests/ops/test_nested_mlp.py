"""nested_mlp against flextron.ops.reference: forward and backward in every dtype, odd sizes,
strided views, opcheck, torch.compile and bad input on every device; on CUDA also the CUTLASS
prefix GEMMs, their cuBLAS fallback, the fused activation pass and uninitialised memory.

Tolerances (tests/ops/conftest.py): fp32 close to a float64 reference; bf16/fp16 error at most twice
PyTorch's own at that precision. The CPU-only checks compare fp32 with the fp32 reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import ops
from flextron.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = reference.ACTIVATIONS
# (lead, hidden, d_ff, width): multiples of 8 take the CUTLASS GEMMs for every dtype; odd
# sizes take the cuBLAS fallback for 16-bit types (fp32 always takes CUTLASS's SIMT GEMM).
SHAPES = [
    ((64,), 128, 256, 192),
    ((2, 5), 64, 128, 128),
    ((1,), 256, 512, 64),
    ((83,), 24, 96, 40),
    ((7,), 83, 769, 83),
    ((300,), 40, 65, 1),
]


def make_inputs(
    lead: tuple[int, ...],
    hidden: int,
    d_ff: int,
    activation: str = "swiglu",
    *,
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


def check_fp32_against_reference(inputs, width, activation):
    """fp32 output and gradients against the fp32 reference (they differ in summation order only)."""
    y, grads, grad_out = forward_and_grads(ops.nested_mlp, inputs, width, activation)
    y_ref, grads_ref, _ = forward_and_grads(reference.nested_mlp, inputs, width, activation, grad_out)
    assert_close_fp32(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_close_fp32(grad, grad_ref)


@pytest.fixture(scope="session")
def check_against_reference(assert_matches_reference):
    """Handed to the tests as a fixture: it needs assert_matches_reference."""

    def check_against_reference(inputs, width: int, activation: str) -> None:
        """Output and gradients: ours, PyTorch's at the same precision, and float64."""
        double = tuple(None if t is None else t.double() for t in inputs)
        y, grads, grad_out = forward_and_grads(ops.nested_mlp, inputs, width, activation)
        y_low, grads_low, _ = forward_and_grads(reference.nested_mlp, inputs, width, activation, grad_out)
        y64, grads64, _ = forward_and_grads(
            reference.nested_mlp, double, width, activation, grad_out.double()
        )
        for ours, theirs, exact in zip((y, *grads), (y_low, *grads_low), (y64, *grads64), strict=True):
            assert_matches_reference(ours, theirs, exact)

    return check_against_reference


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead", [(1,), (7,), (83,), (2, 5)])
@pytest.mark.parametrize("hidden,d_ff,width", [(8, 64, 64), (24, 96, 40), (24, 96, 1)])
def test_matches_reference_fp32(activation, lead, hidden, d_ff, width):
    check_fp32_against_reference(make_inputs(lead, hidden, d_ff, activation, seed=d_ff), width, activation)


@pytest.mark.parametrize(
    "dtype,bf16_dot",
    [(torch.bfloat16, "auto"), (torch.bfloat16, "portable"), (torch.float16, "auto")],
    ids=["bf16", "bf16-portable", "fp16"],
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows", [83, 1, 3])  # 1 and 3: decode's few-rows kernels (skinny_gemm.h)
def test_low_precision_error_within_twice_pytorch(monkeypatch, dtype, bf16_dot, activation, rows):
    # Our error and PyTorch's own error at this precision, both against a float64 reference.
    # Width 64 of 96: the down projection reads a prefix of each weight row.
    monkeypatch.setenv("FLEXTRON_BF16_DOT", bf16_dot)
    inputs = make_inputs((rows,), 32, 96, activation, dtype=dtype, seed=3)
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
    check_fp32_against_reference(make_inputs((tokens,), hidden, d_ff, activation), width, activation)


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


# ---- every device ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(check_against_reference, device, dtype, activation, shape):
    lead, hidden, d_ff, width = shape
    inputs = make_inputs(lead, hidden, d_ff, activation, dtype=dtype, seed=d_ff, device=device)
    check_against_reference(inputs, width, activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("hidden,d_ff,width", [(24, 64, 40), (64, 128, 64)])
def test_non_contiguous_inputs(check_against_reference, device, dtype, activation, hidden, d_ff, width):
    # Transposed views of padded buffers: x rows and the weights have non-unit inner strides.
    inputs = make_inputs((83,), hidden, d_ff, activation, dtype=dtype, contiguous=False, device=device)
    assert not inputs[0].is_contiguous() and not inputs[2].is_contiguous()
    check_against_reference(inputs, width, activation)


@pytest.mark.parametrize("dtype", DTYPES)
def test_x_column_slice_and_batched_view(check_against_reference, device, dtype):
    # x as a column slice of a wider tensor (rows keep a wide stride) and as a transposed batch.
    _, w_gate, w_up, w_down = make_inputs((1,), 128, 256, dtype=dtype, device=device)
    base = torch.randn(3, 5, 136, device=device).to(dtype)
    for x in (base[..., :128], base.transpose(0, 1)[..., 8:]):
        assert ops.nested_mlp(x, w_gate, w_up, w_down, 192, "swiglu").shape == x.shape
        check_against_reference((x, w_gate, w_up, w_down), 192, "swiglu")


@pytest.mark.parametrize("hidden,d_ff,width", [(8, 64, 24), (64, 256, 128)])
def test_weight_grads_exactly_zero_outside_prefix(device, hidden, d_ff, width):
    inputs = make_inputs((9,), hidden, d_ff, device=device)
    _, (_, grad_gate, grad_up, grad_down), _ = forward_and_grads(ops.nested_mlp, inputs, width, "swiglu")
    assert grad_gate.shape == (d_ff, hidden) and grad_down.shape == (hidden, d_ff)
    assert torch.count_nonzero(grad_gate[width:]) == 0 and torch.count_nonzero(grad_up[width:]) == 0
    assert torch.count_nonzero(grad_down[:, width:]) == 0 and torch.count_nonzero(grad_up[:width]) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_input(device, dtype):
    x = torch.empty(0, 4, 64, device=device, dtype=dtype)
    _, w_gate, w_up, w_down = make_inputs((1,), 64, 128, dtype=dtype, device=device)
    assert ops.nested_mlp(x, w_gate, w_up, w_down, 64, "swiglu").shape == (0, 4, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, dtype, activation, requires_grad):
    inputs = make_inputs((3, 5), 64, 128, activation, dtype=dtype, device=device)
    args = tuple(None if t is None else t.requires_grad_(requires_grad) for t in inputs)
    torch.library.opcheck(torch.ops.flextron.nested_mlp.default, (*args, 72, activation))


# ---- CUDA only ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,width", [(128, 192), (83, 83)])
def test_no_uninitialised_memory_leaks_out(check_against_reference, poison_cuda_cache, dtype, hidden, width):
    # A buffer the op reads before it writes (a hidden column, an output row) shows up as NaN.
    inputs = make_inputs((37,), hidden, 256, "swiglu", dtype=dtype, device="cuda")
    poison_cuda_cache(dtype)
    y = ops.nested_mlp(*inputs, width, "swiglu")
    assert torch.isfinite(y).all()
    check_against_reference(inputs, width, "swiglu")


@pytest.mark.cuda
def test_weight_prefix_is_read_in_place():
    # A copy of one weight prefix would be 16 MiB; the op's buffers are 64 KiB each.
    x, w_gate, w_up, w_down = make_inputs((8,), 4096, 4096, dtype=torch.bfloat16, device="cuda")
    ops.nested_mlp(x, w_gate, w_up, w_down, 2048, "swiglu")  # warm-up (CUTLASS/cuBLAS set-up)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ops.nested_mlp(x, w_gate, w_up, w_down, 2048, "swiglu")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 1 << 20


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_shapes_run_cutlass_and_one_activation_pass(cuda_kernel_names, dtype, monkeypatch):
    monkeypatch.setenv("FLEXTRON_PREFIX_GEMM", "cutlass")  # auto takes cuBLAS on Hopper
    x, w_gate, w_up, w_down = make_inputs((64,), 256, 512, dtype=dtype, device="cuda")
    names = cuda_kernel_names(lambda: ops.nested_mlp(x, w_gate, w_up, w_down, 192, "swiglu"))
    assert sum("cutlass::gemm::kernel::Gemm<" in name for name in names) == 3, names
    assert sum("activate_in_place" in name for name in names) == 1, names


@pytest.mark.cuda
def test_torch_compile_inductor():
    inputs = make_inputs((4, 16), 128, 256, dtype=torch.bfloat16, device="cuda")

    def layer(x, w_gate, w_up, w_down):
        return ops.nested_mlp(x, w_gate, w_up, w_down, 192, "swiglu") + x

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), layer(*inputs))


@pytest.mark.cuda
def test_bad_input_on_cuda_names_the_argument():
    x, w_gate, w_up, w_down = make_inputs((6,), 64, 128, device="cuda")
    with pytest.raises(RuntimeError, match="w_up is on"):
        ops.nested_mlp(x, w_gate, w_up.cpu(), w_down, 64, "swiglu")
    with pytest.raises(RuntimeError, match="w_gate has dtype"):
        ops.nested_mlp(x, w_gate.half(), w_up, w_down, 64, "swiglu")
    with pytest.raises(RuntimeError, match=r"width must be in \[1, 128\]"):
        ops.nested_mlp(x, w_gate, w_up, w_down, 129, "swiglu")
    with pytest.raises(RuntimeError, match="w_down must be"):
        ops.nested_mlp(x, w_gate, w_up, w_down[:, :100], 64, "swiglu")
    with pytest.raises(RuntimeError, match="needs w_gate"):
        ops.nested_mlp(x, None, w_up, w_down, 64, "swiglu")
    with pytest.raises(RuntimeError, match="activation must be"):
        ops.nested_mlp(x, None, w_up, w_down, 64, "silu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["cutlass", "cublas"])
@pytest.mark.parametrize("lead", [(2048,), (3,)])
def test_each_gemm_path_with_k_tails(check_against_reference, dtype, path, lead, monkeypatch):
    """Each forced GEMM (FLEXTRON_PREFIX_GEMM) on many tiles and on decode-sized M, with K
    tails: K = D = 264 in the up/gate GEMMs, K = width = 712 in the down GEMM."""
    monkeypatch.setenv("FLEXTRON_PREFIX_GEMM", path)
    inputs = make_inputs(lead, 264, 1024, "swiglu", dtype=dtype, seed=5, device="cuda")
    check_against_reference(inputs, 712, "swiglu")
