"""decoder_layer against flextron.ops.reference: forward (output and the caches it writes) and
backward on every device, float and int8 weights, with and without biases, at prefill and
decode; opcheck; bad input; and the model's cached forward, which runs it."""

from __future__ import annotations

import pytest
import torch

from flextron import ops
from flextron.model.quantization import quantize_int8_
from flextron.ops import reference

B, D, H, HKV, HD, F = 2, 32, 4, 2, 8, 48  # GQA: 2 query heads per KV head
MAX_LEN = 16
EPS = 1e-5
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_layer(dtype, device="cpu", *, bias=False, int8=False, seed=0):
    """(input_norm, post_norm, weights, scales, biases) of one layer: random, O(1) outputs."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(H * HD, D), (HKV * HD, D), (HKV * HD, D), (D, H * HD), (F, D), (F, D), (D, F)]
    weights = [torch.randn(shape, generator=g) / shape[1] ** 0.5 for shape in shapes]
    scales = [None] * 7
    if int8:
        scales = [w.abs().amax(1).clamp_min(1e-8) / 127 for w in weights]
        weights = [torch.round(w / s[:, None]).to(torch.int8) for w, s in zip(weights, scales, strict=True)]
        scales = [s.to(device) for s in scales]
    weights = [w.to(device) if int8 else w.to(device, dtype) for w in weights]
    biases = [
        torch.randn(shape[0], generator=g).to(device, dtype) * 0.1 if bias else None for shape in shapes
    ]
    norms = [(1 + 0.1 * torch.randn(D, generator=g)).to(device, dtype) for _ in range(2)]
    return norms[0], norms[1], weights, scales, biases


def make_step(dtype, device, length, tokens, seed=1):
    """x (B, T, D), cos, sin (T, HD) for positions [length, length + T), and caches whose first
    `length` positions hold earlier keys and values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, tokens, D, generator=g).to(device, dtype)
    angles = torch.arange(length, length + tokens)[:, None] / 10.0 ** torch.arange(HD // 2)[None, :]
    angles = torch.cat((angles, angles), dim=-1)  # (T, HD)
    caches = [torch.zeros(B, HKV, MAX_LEN, HD) for _ in range(2)]
    for cache in caches:
        cache[:, :, :length] = torch.randn(B, HKV, length, HD, generator=g)
    return (
        x,
        angles.cos().to(device, dtype),
        angles.sin().to(device, dtype),
        [c.to(device, dtype) for c in caches],
    )


CASES = [  # (length, tokens, heads, width): prefill, decode, narrowed heads (part of a group), widths
    (0, 5, H, F),
    (4, 1, H, F),
    (6, 1, 3, 29),
    (3, 2, 1, 5),
    (9, 1, 2, 48),
    (12, 2, H, F),  # 13 and 14 keys: the decode path's 8-wide and 4-wide loops and their tails
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["float", "bias", "int8"])
def test_forward_and_caches_match_reference(monkeypatch, device, dtype, case, variant):
    length, tokens, heads, width = case
    monkeypatch.setenv("FLEXTRON_INT8_DOT", "portable")  # int8 on float x, as the reference
    layer = make_layer(dtype, device, bias=variant == "bias", int8=variant == "int8")
    x, cos, sin, caches = make_step(dtype, device, length, tokens)
    ours_caches = [c.clone() for c in caches]
    y = ops.decoder_layer(x, *layer, cos, sin, *ours_caches, length, heads, width, EPS)
    expected = reference.decoder_layer(x, *layer, cos, sin, *caches, length, heads, width, EPS)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])
    for ours, theirs in zip(ours_caches, caches, strict=True):
        torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])
        assert ours[:, :, length + tokens :].eq(0).all()  # nothing written past the new positions


@pytest.mark.parametrize("case", CASES[:3])
def test_backward_matches_reference(device, case):
    """Gradients of x, the norms, the projections and the biases (fp32)."""
    length, tokens, heads, width = case
    input_norm, post_norm, weights, _, biases = make_layer(torch.float32, device, bias=True)
    x, cos, sin, caches = make_step(torch.float32, device, length, tokens)
    leaves = [x, input_norm, post_norm, *weights, *biases]

    def run(fn):
        params = [t.detach().clone().requires_grad_() for t in leaves]
        y = fn(
            *params[:3],
            params[3:10],
            [None] * 7,
            params[10:],
            cos,
            sin,
            *[c.clone() for c in caches],
            length,
            heads,
            width,
            EPS,
        )
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
        return torch.autograd.grad(y, params, grad_y, allow_unused=True)

    for ours, theirs in zip(run(ops.decoder_layer), run(reference.decoder_layer), strict=True):
        if theirs is None:
            assert ours is None or ours.eq(0).all()
            continue
        torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("variant", ["float", "int8"])
def test_opcheck(device, variant):
    """Schema (the caches are declared mutated), fakes and autograd, through its parts."""
    layer = make_layer(torch.float32, device, int8=variant == "int8")
    for length, tokens, heads, width in CASES[:3]:
        x, cos, sin, caches = make_step(torch.float32, device, length, tokens)
        for requires_grad in (False, True):
            x_ = x.detach().clone().requires_grad_(requires_grad)
            torch.library.opcheck(
                torch.ops.flextron.decoder_layer.default,
                (x_, *layer, cos, sin, *caches, length, heads, width, EPS),
            )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(heads=5), r"heads must be in \[1, 4\], got 5"),
        (dict(width=49), r"width must be in \[1, 48\], got 49"),
        (dict(length=MAX_LEN), r"positions \[16, 17\) do not fit a cache of 16"),
        (dict(drop_weight=True), "must list 7 projections"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    input_norm, post_norm, weights, scales, biases = make_layer(torch.float32)
    x, cos, sin, caches = make_step(torch.float32, "cpu", 0, 1)
    settings = dict(length=0, heads=H, width=F) | {k: v for k, v in change.items() if k != "drop_weight"}
    if change.get("drop_weight"):
        weights = weights[:6]
    with pytest.raises(RuntimeError, match=message):
        ops.decoder_layer(
            x,
            input_norm,
            post_norm,
            weights,
            scales,
            biases,
            cos,
            sin,
            *caches,
            settings["length"],
            settings["heads"],
            settings["width"],
            EPS,
        )


@pytest.mark.parametrize("int8", [False, True])
def test_model_cached_forward_runs_it_and_matches_the_uncached_model(tiny_flextron, monkeypatch, int8):
    """Prefill then decode on a KV cache (the op, once a layer a step, from the model's
    DecodePlan) gives the logits of one uncached forward (the per-operation layers), at a
    narrowed configuration."""
    model = tiny_flextron(seed=1).eval()
    if int8:
        quantize_int8_(model)
        monkeypatch.setenv("FLEXTRON_INT8_DOT", "portable")  # decode's int8 on float x, as prefill
    config = model.config
    arch = type(model.full_arch())(
        (config.intermediate_size // 2,) * config.num_layers, (2,) * config.num_layers
    )
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        whole = model(ids, arch)
        cache = model.new_kv_cache(2, 16)
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
        ) as prof:
            steps = [
                model(ids[:, :6], arch, cache),
                *(model(ids[:, t : t + 1], arch, cache) for t in range(6, 9)),
            ]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-4, rtol=1e-4)
    # Each call's (heads, width): the op's last arguments are (length, heads, width, eps).
    calls = [tuple(e.concrete_inputs[-3:-1]) for e in prof.events() if e.name == "flextron::decoder_layer"]
    assert len(calls) == 4 * config.num_layers and set(calls) == {(2, config.intermediate_size // 2)}


def cpu_operator_names(fn) -> set[str]:
    """Names of the operators that `fn()` calls on the CPU, from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["float", "bias", "int8"])
def test_cpu_decode_path_matches_the_composite(monkeypatch, dtype, case, variant):
    """On the CPU, a few rows that need no gradient take the decode path (loops between the
    kernels, no attention op); with a gradient to record, the composite runs. Same output and
    caches, to the rounding of x's dtype. Prefill (10 rows) is the composite either way."""
    length, tokens, heads, width = case
    monkeypatch.setenv("FLEXTRON_INT8_DOT", "portable")
    layer = make_layer(dtype, bias=variant == "bias", int8=variant == "int8")
    x, cos, sin, caches = make_step(dtype, "cpu", length, tokens)
    decode_caches, composite_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    settings = (length, heads, width, EPS)
    results = []
    names = cpu_operator_names(
        lambda: results.append(ops.decoder_layer(x, *layer, cos, sin, *decode_caches, *settings))
    )
    composite = ops.decoder_layer(x.requires_grad_(), *layer, cos, sin, *composite_caches, *settings)
    decoded = B * tokens <= 4
    assert ("flextron::varhead_attention" not in names) == decoded
    assert [c._version for c in decode_caches] == [c._version for c in composite_caches]  # both written
    torch.testing.assert_close(results[0], composite.detach(), **TOLERANCE[dtype])
    for ours, theirs in zip(decode_caches, composite_caches, strict=True):
        torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])
