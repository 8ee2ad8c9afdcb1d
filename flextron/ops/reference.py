"""Pure-PyTorch semantics of every torch.ops.flextron op.

These functions are the test oracle for the C++/CUDA kernels: simple, obviously
correct, differentiable by autograd, and never fast. Shapes follow docs/ops.md:
T tokens, D hidden size, F MLP width (d_ff), C routing choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh", "relu")


def activate(gate: torch.Tensor | None, up: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP's hidden activation; `gate` is None for the ungated activations."""
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(up)
    if activation == "gelu_tanh":
        return F.gelu(up, approximate="tanh")
    if activation == "relu":
        return F.relu(up)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def nested_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int
) -> torch.Tensor:
    """x[..., :in] @ weight[:out, :in]^T (+ bias[:out]).  x: (..., >=in) -> (..., out)."""
    y = x[..., :in_features] @ weight[:out_features, :in_features].T
    return y if bias is None else y + bias[:out_features]


def nested_linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """(x[..., :in] @ qweight[:out, :in]^T) * scale[:out] (+ bias[:out]), in x's dtype.
    qweight: (O, I) int8; scale: (O,) float32, one per output row."""
    product = x[..., :in_features].float() @ qweight[:out_features, :in_features].float().T  # (..., out)
    y = product * scale[:out_features]
    return (y if bias is None else y + bias[:out_features].float()).to(x.dtype)


def nested_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    width: int,
    activation: str,
) -> torch.Tensor:
    """The MLP on its first `width` neurons.  x: (..., D); w_gate, w_up: (F, D); w_down: (D, F)."""
    gate = None if w_gate is None else x @ w_gate[:width].T  # (..., width)
    up = x @ w_up[:width].T  # (..., width)
    return activate(gate, up, activation) @ w_down[:, :width].T  # (..., D)


def route(
    input: torch.Tensor, weight: torch.Tensor | None, noise: torch.Tensor | None, tau: float, hard: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token routing decision.

    input: (T, C) logits, or (T, D) hidden states when weight (C, D) is given.
    Returns choice (T,) int64 = argmax(logits + noise) with ties to the lowest index;
    probs (T, C) = softmax((logits + noise) / tau), or with hard=True the one-hot of
    choice carrying the soft gradient (straight-through); perm (T,) int64 = the
    stable sort of tokens by choice; inv_perm (T,) with inv_perm[perm[i]] = i;
    offsets (C + 1,) int64, tokens of choice c are perm[offsets[c]:offsets[c + 1]].
    """
    logits = input if weight is None else input @ weight.T  # (T, C)
    z = logits.float() if noise is None else logits.float() + noise.float()
    num_choices = z.shape[-1]
    choice = torch.argmax(z, dim=-1)  # first maximum: ties go to the lowest index
    soft = torch.softmax(z / tau, dim=-1)
    if hard:
        one_hot = F.one_hot(choice, num_choices).to(soft.dtype)
        probs = one_hot - soft.detach() + soft
    else:
        probs = soft
    perm = torch.sort(choice, stable=True).indices
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(choice, minlength=num_choices)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return choice, probs.to(logits.dtype), perm, inv_perm, offsets


def routed_nested_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    choice: torch.Tensor,
    widths: list[int],
    scale: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """Token t runs the MLP at width widths[choice[t]] (widths strictly descending).

    x: (T, D); choice: (T,) int64; scale: (T,) or None.  Returns (T, D).
    """
    y = torch.zeros_like(x)
    for c, width in enumerate(widths):
        rows = (choice == c).nonzero().flatten()
        if rows.numel():
            y = y.index_add(0, rows, nested_mlp(x[rows], w_gate, w_up, w_down, width, activation))
    return y if scale is None else y * scale[:, None].to(y.dtype)


def varhead_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: torch.Tensor,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention where sequence b uses its first heads[b] query heads.

    q: (B, Hq, Sq, Dh); k, v: (B, Hkv, Sk, Dh), Hq a multiple of Hkv; query head h
    reads KV head h // (Hq / Hkv). heads: (B,) int64 in [1, Hq]. causal aligns the
    last query with the last key (query i sees keys j <= i + Sk - Sq). Inactive
    heads output zeros.  Returns (B, Hq, Sq, Dh).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, Sk, Dh)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()  # (B, Hq, Sq, Dh)
    active = torch.arange(q.shape[1], device=q.device)[None, :] < heads[:, None].to(q.device)  # (B, Hq)
    return (out * active[:, :, None, None]).to(q.dtype)


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
    """One pre-norm Llama decoder layer on a KV cache: x + attention(norm(x)), then + MLP(norm(.)).

    x: (B, T, D); weights: the 7 projections q, k, v, o, gate, up, down (float, or int8 rows
    where scales[i] holds their per-row scales); biases: per projection or None; cos, sin:
    (T, hd) for positions [length, length + T); k_cache, v_cache: (B, Hkv, max_len, hd), the
    new keys and values written at those positions.  Attention runs whole KV groups on the
    first `heads` query heads (the rest of the last group output zeros), the SwiGLU MLP its
    first `width` neurons.  RMSNorm in fp32, cast back before its weight.  Returns (B, T, D).
    """

    def norm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h32 = h.float()
        return weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)

    def rotate(t: torch.Tensor) -> torch.Tensor:  # (B, h, T, hd), rotate-half convention
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

    def project(index: int, h: torch.Tensor, out: int, inp: int) -> torch.Tensor:
        if scales[index] is None:
            return nested_linear(h, weights[index], biases[index], out, inp)
        return nested_linear_int8(h, weights[index], scales[index], biases[index], out, inp)

    B, T, D = x.shape
    hd = k_cache.shape[3]
    group = weights[0].shape[0] // hd // k_cache.shape[1]
    kv_heads = -(-heads // group)
    q_heads = kv_heads * group
    h = norm(x, input_norm)  # (B, T, D)
    q = rotate(project(0, h, q_heads * hd, D).view(B, T, q_heads, hd).transpose(1, 2))  # (B, qh, T, hd)
    k = rotate(project(1, h, kv_heads * hd, D).view(B, T, kv_heads, hd).transpose(1, 2))  # (B, kvh, T, hd)
    v = project(2, h, kv_heads * hd, D).view(B, T, kv_heads, hd).transpose(1, 2)
    end = length + T
    k_cache[:, :kv_heads, length:end] = k
    v_cache[:, :kv_heads, length:end] = v
    per_sequence = torch.full((B,), heads, dtype=torch.int64, device=x.device)
    y = varhead_attention(q, k_cache[:, :kv_heads, :end], v_cache[:, :kv_heads, :end], per_sequence, True)
    x = x + project(3, y.transpose(1, 2).reshape(B, T, q_heads * hd), D, q_heads * hd)
    m = norm(x, post_norm)
    hidden = F.silu(project(4, m, width, D)) * project(5, m, width, D)  # (B, T, width)
    return x + project(6, hidden, D, width)
