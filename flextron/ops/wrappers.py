"""Typed Python wrappers for torch.ops.flextron, with fake impls and autograd.

The kernels live in the compiled extension flextron._C (schemas in
csrc/registration.cpp); the exact semantics are flextron.ops.reference. Argument
validation happens in the kernels, so direct torch.ops.flextron.* calls get the
same clear errors as these wrappers.
"""

from __future__ import annotations

import functools

import torch

from flextron.ops import reference
from flextron.ops.extension import _C  # noqa: F401  (importing registers the ops)

OP_NAMES = (
    "decoder_layer",
    "nested_linear",
    "nested_linear_int8",
    "nested_mlp",
    "route",
    "routed_nested_mlp",
    "varhead_attention",
)
__all__ = [*OP_NAMES, "OP_NAMES", "backends"]  # every op has a wrapper of its name


def backends(op_name: str) -> list[str]:
    """The dispatch keys (CPU, CUDA) that have a compiled kernel for `op_name`."""
    return list(_kernel_keys(op_name))


# Ops composed of other flextron ops (CompositeImplicitAutograd): a device has them where it has
# every part.
COMPOSITE_PARTS = {
    "decoder_layer": ("nested_linear", "nested_linear_int8", "nested_mlp", "varhead_attention")
}


@functools.cache  # the kernels are registered once, when flextron._C is imported
def _kernel_keys(op_name: str) -> tuple[str, ...]:
    parts = COMPOSITE_PARTS.get(op_name)
    if parts is not None:
        return tuple(key for key in ("CPU", "CUDA") if all(key in _kernel_keys(part) for part in parts))
    return tuple(
        key
        for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"flextron::{op_name}", key)
    )


def _require_kernel(op_name: str, *tensors: torch.Tensor | None) -> None:
    # Never fall back to the CPU silently: a CUDA tensor needs a CUDA kernel.
    for tensor in tensors:
        if tensor is not None and tensor.device.type not in ("cpu", "meta"):
            key = tensor.device.type.upper()
            if key not in backends(op_name):
                raise NotImplementedError(
                    f"flextron.{op_name}: not built for {key} yet "
                    f"(this build has {op_name} kernels for {backends(op_name)}; "
                    "see python -m flextron.ops.info)"
                )
            return


# ---- nested_linear -------------------------------------------------------------


def nested_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_features: int | None = None,
    in_features: int | None = None,
) -> torch.Tensor:
    """x[..., :in] @ weight[:out, :in]^T (+ bias[:out]), reading the weight prefix in place.

    x: (..., X) with X >= in_features; weight: (O, I); bias: (O,) or None.
    out_features/in_features default to the full weight.  Returns (..., out_features).
    """
    out_features = weight.shape[0] if out_features is None else out_features
    in_features = weight.shape[1] if in_features is None else in_features
    _require_kernel("nested_linear", x)
    return torch.ops.flextron.nested_linear.default(x, weight, bias, out_features, in_features)


@torch.library.register_fake("flextron::nested_linear")
def _nested_linear_fake(x, weight, bias, out_features, in_features):
    torch._check(x.dim() >= 1, lambda: "nested_linear: x must have at least one dimension")
    torch._check(weight.dim() == 2, lambda: "nested_linear: weight must be 2-D (out, in)")
    return x.new_empty((*x.shape[:-1], out_features))


def _prefix_product(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a @ b in the leading (rows, cols) block of a tensor shaped like `like` (its leading
    dims flattened), zeros elsewhere.  A full block is the product itself; a partial one is
    accumulated in place into zeros, with no full-size temporary and copy."""
    rows, cols = like.numel() // like.shape[-1], like.shape[-1]
    if (a.shape[0], b.shape[1]) == (rows, cols):
        return (a @ b).view(like.shape)
    out = like.new_zeros(like.shape)
    out.view(rows, cols)[: a.shape[0], : b.shape[1]].addmm_(a, b)
    return out


def _nested_linear_setup(ctx, inputs, output):
    x, weight, bias, out_features, in_features = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.out_features, ctx.in_features = out_features, in_features


def _nested_linear_backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    out_f, in_f = ctx.out_features, ctx.in_features
    grad_y2 = grad_y.reshape(-1, out_f)  # (N, out)
    x2 = x.reshape(-1, x.shape[-1])[:, :in_f]  # (N, in)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _prefix_product(grad_y2, weight[:out_f, :in_f], x)
    if ctx.needs_input_grad[1]:
        # The inactive part of the weight gets an exactly-zero gradient.
        grad_w = _prefix_product(grad_y2.T, x2, weight)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = weight.new_zeros(weight.shape[0])
        grad_b[:out_f] = grad_y2.sum(0)
    return grad_x, grad_w, grad_b, None, None


torch.library.register_autograd(
    "flextron::nested_linear", _nested_linear_backward, setup_context=_nested_linear_setup
)


# ---- nested_linear_int8 --------------------------------------------------------


def nested_linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_features: int | None = None,
    in_features: int | None = None,
) -> torch.Tensor:
    """(x[..., :in] @ qweight[:out, :in]^T) * scale[:out] (+ bias[:out]), int8 weights read in place.

    x: (..., X) float with X >= in_features; qweight: (O, I) int8; scale: (O,) float32, one per
    output row (so every prefix is a valid sub-network); bias: (O,) like x, or None.
    Returns (..., out_features) in x's dtype.  Differentiable in x, scale and bias.
    """
    out_features = qweight.shape[0] if out_features is None else out_features
    in_features = qweight.shape[1] if in_features is None else in_features
    _require_kernel("nested_linear_int8", x)
    return torch.ops.flextron.nested_linear_int8.default(x, qweight, scale, bias, out_features, in_features)


@torch.library.register_fake("flextron::nested_linear_int8")
def _nested_linear_int8_fake(x, qweight, scale, bias, out_features, in_features):
    torch._check(x.dim() >= 1, lambda: "nested_linear_int8: x must have at least one dimension")
    torch._check(qweight.dim() == 2, lambda: "nested_linear_int8: qweight must be 2-D (out, in)")
    return x.new_empty((*x.shape[:-1], out_features))


def _nested_linear_int8_setup(ctx, inputs, output):
    x, qweight, scale, bias, out_features, in_features = inputs
    ctx.save_for_backward(x, qweight, scale)
    ctx.has_bias = bias is not None
    ctx.out_features, ctx.in_features = out_features, in_features


def _nested_linear_int8_backward(ctx, grad_y):
    x, qweight, scale = ctx.saved_tensors
    out_f, in_f = ctx.out_features, ctx.in_features
    grad_y2 = grad_y.reshape(-1, out_f).float()  # (N, out)
    q = qweight[:out_f, :in_f].float()  # (out, in)
    grad_x = grad_scale = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _prefix_product(grad_y2 * scale[:out_f], q, x.float()).to(x.dtype)
    if ctx.needs_input_grad[2]:
        # d y[., n] / d scale[n] = the unscaled product; rows past out_features get zeros.
        x2 = x.reshape(-1, x.shape[-1])[:, :in_f].float()  # (N, in)
        grad_scale = scale.new_zeros(scale.shape)
        grad_scale[:out_f] = (grad_y2 * (x2 @ q.T)).sum(0)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad_y.new_zeros(qweight.shape[0])
        grad_b[:out_f] = grad_y2.sum(0).to(grad_b.dtype)
    return grad_x, None, grad_scale, grad_b, None, None


torch.library.register_autograd(
    "flextron::nested_linear_int8", _nested_linear_int8_backward, setup_context=_nested_linear_int8_setup
)


# ---- nested_mlp ----------------------------------------------------------------


def nested_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    width: int,
    activation: str = "swiglu",
) -> torch.Tensor:
    """The MLP on its first `width` neurons, fused.

    x: (..., D); w_gate, w_up: (F, D) (w_gate None for gelu/gelu_tanh/relu);
    w_down: (D, F); 0 < width <= F.  Returns (..., D).
    """
    _require_kernel("nested_mlp", x)
    return torch.ops.flextron.nested_mlp.default(x, w_gate, w_up, w_down, width, activation)


@torch.library.register_fake("flextron::nested_mlp")
def _nested_mlp_fake(x, w_gate, w_up, w_down, width, activation):
    torch._check(w_down.dim() == 2, lambda: "nested_mlp: w_down must be 2-D (D, F)")
    return x.new_empty(x.shape)


def _nested_mlp_setup(ctx, inputs, output):
    x, w_gate, w_up, w_down, width, activation = inputs
    ctx.save_for_backward(x, w_gate, w_up, w_down)
    ctx.width, ctx.activation = width, activation


def _nested_mlp_backward(ctx, grad_y):
    # Recompute the (narrow) hidden activations instead of keeping them alive.
    x, w_gate, w_up, w_down = ctx.saved_tensors
    width, activation = ctx.width, ctx.activation
    x2 = x.reshape(-1, x.shape[-1])  # (N, D)
    grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])  # (N, D)
    with torch.enable_grad():
        gate = None if w_gate is None else (x2 @ w_gate[:width].T).detach().requires_grad_()
        up = (x2 @ w_up[:width].T).detach().requires_grad_()
        hidden = reference.activate(gate, up, activation)  # (N, width)
        grad_hidden = grad_y2 @ w_down[:, :width]  # (N, width)
        pre = [t for t in (gate, up) if t is not None]
        grads_pre = torch.autograd.grad(hidden, pre, grad_hidden)
    grad_gate, grad_up = (None, grads_pre[0]) if gate is None else grads_pre
    grad_x = grad_up @ w_up[:width]
    if grad_gate is not None:
        grad_x = grad_x + grad_gate @ w_gate[:width]
    grad_w_gate = None
    if w_gate is not None:
        grad_w_gate = w_gate.new_zeros(w_gate.shape)
        grad_w_gate[:width] = grad_gate.T @ x2
    grad_w_up = w_up.new_zeros(w_up.shape)
    grad_w_up[:width] = grad_up.T @ x2
    grad_w_down = w_down.new_zeros(w_down.shape)
    grad_w_down[:, :width] = grad_y2.T @ hidden.detach()
    return grad_x.reshape(x.shape), grad_w_gate, grad_w_up, grad_w_down, None, None


torch.library.register_autograd("flextron::nested_mlp", _nested_mlp_backward, setup_context=_nested_mlp_setup)


# ---- route ---------------------------------------------------------------------


def route(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    tau: float = 1.0,
    hard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens to width choices.

    input: (T, C) logits, or (T, D) hidden states with weight (C, D) (the router's
    last linear layer, fused).  noise: (T, C) (e.g. Gumbel) or None; tau > 0.
    Returns (choice (T,), probs (T, C), perm (T,), inv_perm (T,), offsets (C+1,));
    see flextron.ops.reference.route.  Only probs is differentiable.
    """
    _require_kernel("route", input)
    return torch.ops.flextron.route.default(input, weight, noise, tau, hard)


@torch.library.register_fake("flextron::route")
def _route_fake(input, weight, noise, tau, hard):
    torch._check(input.dim() == 2, lambda: "route: input must be 2-D")
    tokens = input.shape[0]
    choices = input.shape[1] if weight is None else weight.shape[0]
    index = dict(dtype=torch.int64, device=input.device)
    return (
        input.new_empty(tokens, dtype=torch.int64),
        input.new_empty(tokens, choices),
        torch.empty(tokens, **index),
        torch.empty(tokens, **index),
        torch.empty(choices + 1, **index),
    )


def _route_setup(ctx, inputs, output):
    input, weight, noise, tau, hard = inputs
    ctx.save_for_backward(input, weight, noise)
    ctx.tau = tau
    ctx.mark_non_differentiable(output[0], output[2], output[3], output[4])


def _route_backward(ctx, grad_choice, grad_probs, grad_perm, grad_inv, grad_offsets):
    # probs = softmax(z / tau) in value or (hard) in gradient: the straight-through estimator.
    input, weight, noise = ctx.saved_tensors
    logits = input if weight is None else input @ weight.T  # (T, C)
    z = logits.float() if noise is None else logits.float() + noise.float()
    soft = torch.softmax(z / ctx.tau, dim=-1)
    g = grad_probs.float()
    grad_logits = (soft * (g - (g * soft).sum(-1, keepdim=True)) / ctx.tau).to(logits.dtype)
    if weight is None:
        return grad_logits, None, None, None, None
    grad_input = grad_logits @ weight if ctx.needs_input_grad[0] else None
    grad_weight = grad_logits.T @ input if ctx.needs_input_grad[1] else None
    return grad_input, grad_weight, None, None, None


torch.library.register_autograd("flextron::route", _route_backward, setup_context=_route_setup)


# ---- routed_nested_mlp ---------------------------------------------------------


def routed_nested_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    choice: torch.Tensor,
    widths: list[int],
    scale: torch.Tensor | None = None,
    activation: str = "swiglu",
) -> torch.Tensor:
    """Token t runs the MLP at width widths[choice[t]], times scale[t].

    x: (T, D); w_gate, w_up: (F, D); w_down: (D, F); choice: (T,) int64 in [0, C);
    widths: C strictly descending widths in (0, F]; scale: (T,) or None.  Returns (T, D).
    """
    _require_kernel("routed_nested_mlp", x)
    return torch.ops.flextron.routed_nested_mlp.default(
        x, w_gate, w_up, w_down, choice, list(widths), scale, activation
    )


@torch.library.register_fake("flextron::routed_nested_mlp")
def _routed_nested_mlp_fake(x, w_gate, w_up, w_down, choice, widths, scale, activation):
    torch._check(x.dim() == 2, lambda: "routed_nested_mlp: x must be 2-D (tokens, hidden)")
    return x.new_empty(x.shape)


@torch.library.register_fake("flextron::routed_nested_mlp_backward")
def _routed_nested_mlp_backward_fake(grad_out, x, w_gate, w_up, w_down, choice, widths, scale, activation):
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape),
        empty if w_gate is None else w_gate.new_empty(w_gate.shape),
        w_up.new_empty(w_up.shape),
        w_down.new_empty(w_down.shape),
        empty if scale is None else scale.new_empty(scale.shape),
    )


def _routed_nested_mlp_setup(ctx, inputs, output):
    x, w_gate, w_up, w_down, choice, widths, scale, activation = inputs
    ctx.save_for_backward(x, w_gate, w_up, w_down, choice, scale)
    ctx.widths, ctx.activation = widths, activation


def _routed_nested_mlp_backward(ctx, grad_y):
    x, w_gate, w_up, w_down, choice, scale = ctx.saved_tensors
    grad_x, grad_gate, grad_up, grad_down, grad_scale = torch.ops.flextron.routed_nested_mlp_backward.default(
        grad_y, x, w_gate, w_up, w_down, choice, ctx.widths, scale, ctx.activation
    )
    return (
        grad_x,
        None if w_gate is None else grad_gate,
        grad_up,
        grad_down,
        None,
        None,
        None if scale is None else grad_scale,
        None,
    )


torch.library.register_autograd(
    "flextron::routed_nested_mlp", _routed_nested_mlp_backward, setup_context=_routed_nested_mlp_setup
)


# ---- varhead_attention ---------------------------------------------------------


def varhead_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention in which sequence b uses only its first heads[b] query heads (GQA kept).

    q: (B, Hq, Sq, Dh); k, v: (B, Hkv, Sk, Dh); heads: (B,) int64 in [1, Hq], on the CPU
    or (CUDA q) on q's device, where the CUDA kernel reads it with a synchronisation.
    Inactive heads output zeros.  Returns (B, Hq, Sq, Dh).
    """
    _require_kernel("varhead_attention", q)
    return torch.ops.flextron.varhead_attention.default(q, k, v, heads, causal, scale)


@torch.library.register_fake("flextron::varhead_attention")
def _varhead_attention_fake(q, k, v, heads, causal, scale=None):
    torch._check(q.dim() == 4, lambda: "varhead_attention: q must be 4-D (B, Hq, Sq, Dh)")
    return q.new_empty(q.shape)


@torch.library.register_fake("flextron::varhead_attention_backward")
def _varhead_attention_backward_fake(grad_out, q, k, v, heads, causal, scale=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varhead_attention_setup(ctx, inputs, output):
    q, k, v, heads, causal, scale = inputs
    ctx.save_for_backward(q, k, v, heads)
    ctx.causal, ctx.scale = causal, scale


def _varhead_attention_backward(ctx, grad_out):
    q, k, v, heads = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.flextron.varhead_attention_backward.default(
        grad_out, q, k, v, heads, ctx.causal, ctx.scale
    )
    return grad_q, grad_k, grad_v, None, None, None


torch.library.register_autograd(
    "flextron::varhead_attention", _varhead_attention_backward, setup_context=_varhead_attention_setup
)


# ---- decoder_layer ----------------------------------------------------------------


def decoder_layer(
    x: torch.Tensor,
    input_norm: torch.Tensor,
    post_norm: torch.Tensor,
    weights: list[torch.Tensor],
    scales: list[torch.Tensor | None],
    biases: list[torch.Tensor | None],
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: int,
    heads: int,
    width: int,
    eps: float,
) -> torch.Tensor:
    """One pre-norm decoder layer on a KV cache, on the first `heads` query heads and `width` MLP
    neurons; writes the new keys and values into k_cache, v_cache at [length, length + T).

    x: (B, T, D); weights, scales, biases: the 7 projections q, k, v, o, gate, up, down (scales
    for int8 rows, else None); cos, sin: (T, hd); caches: (B, Hkv, max_len, hd).  Returns
    (B, T, D).  Composed of the other ops in C++ (their kernels, autograd and fakes), without
    the per-operation Python cost that dominates a decode step; semantics:
    flextron.ops.reference.decoder_layer.
    """
    _require_kernel("decoder_layer", x)
    return torch.ops.flextron.decoder_layer.default(
        x,
        input_norm,
        post_norm,
        weights,
        scales,
        biases,
        cos,
        sin,
        k_cache,
        v_cache,
        length,
        heads,
        width,
        eps,
    )


# ---- autocast ------------------------------------------------------------------

# Under torch.autocast the GEMM-heavy ops run in bfloat16, as F.linear does: their floating
# inputs (activations and weights) are cast, and autograd casts the gradients back to the
# fp32 parameters.  Without this, mixed bf16/fp32 inputs reach the kernels.
for _op_name in ("nested_linear", "nested_mlp", "routed_nested_mlp", "varhead_attention"):
    for _device_type in ("cpu", "cuda"):
        torch.library.register_autocast(f"flextron::{_op_name}", _device_type, torch.bfloat16)
