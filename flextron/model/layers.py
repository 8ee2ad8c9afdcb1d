"""Elastic (nested-width) layers: a linear, the SwiGLU MLP and GQA attention.

Each layer holds the full weights, sorted by importance (flextron.conversion.ranking), and runs on a
prefix of them chosen per call: the MLP on its first `width` neurons, attention on its
first `heads` query heads (whole KV groups).  Smaller choices slice, never mask, so they
really cost less.  Parameter names match Hugging Face Llama (q_proj, gate_proj, ...), so
checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flextron import ops
from flextron.model.rope import apply_rotary
from flextron.model.weight_block import huge_page_empty

MAX_COLUMN_PREFIXES = 4  # widths per layer whose contiguous copies are kept (column_prefix_operands)


class ElasticLinear(nn.Module):
    """A linear layer that can run on a prefix of its outputs and inputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        # in_features -> ((data pointer, version) of the weight it was copied from, the copy)
        self._column_prefixes: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}

    @property
    def is_int8(self) -> bool:
        """Whether the weight is int8 rows with per-row scales (flextron.model.quantization)."""
        return self.weight is None

    def operands(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weight, scale, bias) as the ops take them: the int8 rows and their scales, or the
        float weight and None."""
        # Straight from the module's dicts: a decode step asks for 7 per layer, and each
        # nn.Module.__getattr__ lookup costs about a microsecond (half of this call's cost).
        weight, bias = self._parameters["weight"], self._parameters.get("bias")
        if weight is None:
            return self._buffers["qweight"], self._buffers["weight_scale"], bias
        return weight, None, bias

    def row_prefix_operands(
        self, out_features: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """operands() cut to the first `out_features` outputs: views of the contiguous leading
        rows (and their scales and biases), no copy."""
        return tuple(None if t is None else t[:out_features] for t in self.operands())

    def column_prefix_operands(
        self, in_features: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """operands() with the weight cut to its first `in_features` columns, as a contiguous copy
        on the CPU (on 2 MiB pages: flextron.model.weight_block), kept until the weight changes
        (MAX_COLUMN_PREFIXES widths at most).

        Why: a sub-network reads only a prefix of each row of the layers whose inputs narrow (the
        o and down projections). At decode those short rows with gaps between them stream from
        memory at about half the rate of one contiguous block on this project's CPU
        (docs/benchmarks.md), where the weights are the whole cost. Elsewhere (a GPU, the whole
        width, or a weight that records gradients) the weight itself is returned."""
        weight, scale, bias = self.operands()
        if (
            weight.device.type != "cpu"
            or in_features >= weight.shape[1]
            or (weight.requires_grad and torch.is_grad_enabled())
        ):
            return weight, scale, bias
        source = (weight.data_ptr(), weight._version)
        cached = self._column_prefixes.get(in_features)
        if cached is None or cached[0] != source:
            if len(self._column_prefixes) >= MAX_COLUMN_PREFIXES:
                self._column_prefixes.clear()
            prefix = huge_page_empty((weight.shape[0], in_features), weight.dtype)  # (out, in_features)
            cached = self._column_prefixes[in_features] = (source, prefix.copy_(weight[:, :in_features]))
        return cached[1], scale, bias

    def forward(
        self, x: torch.Tensor, out_features: int | None = None, in_features: int | None = None
    ) -> torch.Tensor:
        """x: (..., >= in_features) -> (..., out_features); defaults: the full layer."""
        if self.is_int8:
            return ops.nested_linear_int8(
                x, self.qweight, self.weight_scale, self.bias, out_features, in_features
            )
        return ops.nested_linear(x, self.weight, self.bias, out_features, in_features)


class ElasticMLP(nn.Module):
    """SwiGLU MLP `down(silu(gate(x)) * up(x))` on a prefix of its d_ff neurons."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = ElasticLinear(hidden_size, intermediate_size, bias)
        self.up_proj = ElasticLinear(hidden_size, intermediate_size, bias)
        self.down_proj = ElasticLinear(intermediate_size, hidden_size, bias)

    def projections(self) -> tuple[ElasticLinear, ...]:
        return self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D) through the first `width` neurons."""
        if self.gate_proj.bias is None and not self.gate_proj.is_int8 and not torch.is_grad_enabled():
            # Fused: the (B, T, width) hidden activations never reach memory as a whole.
            return ops.nested_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, width)
        # With autograd, the unfused form keeps its activations for the backward, where the
        # fused op would recompute two of its three GEMMs to save memory.
        hidden = nn.functional.silu(self.gate_proj(x, width)) * self.up_proj(x, width)  # (B, T, width)
        return self.down_proj(hidden, in_features=width)


class KVCache:
    """Keys and values of every layer for generation: (B, Hkv, max_len, hd) per layer.

    The head choice is fixed at prefill: a layer that cached k KV heads can be asked for
    at most k of them later.  `length` is the number of cached positions; the model
    advances it after each forward.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.kv_heads: list[int | None] = [None] * num_layers  # cached KV heads per layer
        # (the model, its configuration, the DecodePlan that runs its layers on this cache), made at
        # prefill (FlextronModel._layers_on_cache): the weights are fixed for one generation, and
        # gathering them from the modules each step cost ~13 us a layer.
        self.plan: tuple[object, object, object] | None = None
        self.max_length = max_length
        self.length = 0

    def check_room(self, t: int) -> int:
        """Check that t more positions fit; returns length + t."""
        end = self.length + t
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_length} allocated")
        return end

    def reserve(self, layer: int, h: int, t: int) -> int:
        """Check that layer `layer` may store h KV heads at positions [length, length + t) and
        record the head count; returns length + t."""
        end = self.check_room(t)
        cached = self.kv_heads[layer]
        if self.length == 0 or cached is None:
            self.kv_heads[layer] = h
        elif h > cached:
            raise ValueError(
                f"layer {layer}: {h} KV heads requested but the cache was filled with {cached}; "
                "the head choice is fixed at prefill"
            )
        return end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, h, T, hd) at positions [length, length + T); return all (B, h, S, hd)."""
        h = k.shape[1]
        end = self.reserve(layer, h, k.shape[2])
        self.keys[layer][:, :h, self.length : end] = k
        self.values[layer][:, :h, self.length : end] = v
        return self.keys[layer][:, :h, :end], self.values[layer][:, :h, :end]


class ElasticAttention(nn.Module):
    """Causal GQA self-attention with RoPE on a prefix of its query heads."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group_size = num_heads // num_kv_heads
        self.q_proj = ElasticLinear(hidden_size, num_heads * head_dim, qkv_bias)
        self.k_proj = ElasticLinear(hidden_size, num_kv_heads * head_dim, qkv_bias)
        self.v_proj = ElasticLinear(hidden_size, num_kv_heads * head_dim, qkv_bias)
        self.o_proj = ElasticLinear(num_heads * head_dim, hidden_size, o_bias)

    def kv_heads_for(self, heads: int) -> int:
        """The KV heads that `heads` query heads need: the op computes whole KV groups."""
        return math.ceil(heads / self.group_size)

    def projections(self) -> tuple[ElasticLinear, ...]:
        return self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        heads: int | torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        *,
        key_mask: torch.Tensor | None = None,
        max_heads: int | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D).

        heads: the number of query heads, one int for the batch or (B,) int64 per sequence
        (inactive heads contribute nothing).  cos, sin: (T, hd) for the new positions, or
        (B, 1, T, hd) per sequence.  key_mask: (B, S) bool, False at padding keys (S: cached
        + new positions); None: no padding.  max_heads: max(heads) when the caller knows it, so that
        a decode step reads nothing back from the device (CUDA-graph capturable); per-sequence
        counts on the CPU reach the op there, which then reads them without a synchronisation.
        """
        B, T, _ = x.shape
        if isinstance(heads, torch.Tensor):
            per_sequence = heads.to(torch.int64)
            most = int(per_sequence.max()) if max_heads is None else max_heads
        else:
            per_sequence, most = None, heads
        kv_heads = self.kv_heads_for(most)
        q_heads, hd = kv_heads * self.group_size, self.head_dim
        q = self.q_proj(x, q_heads * hd).view(B, T, q_heads, hd).transpose(1, 2)  # (B, qh, T, hd)
        k = self.k_proj(x, kv_heads * hd).view(B, T, kv_heads, hd).transpose(1, 2)  # (B, kvh, T, hd)
        v = self.v_proj(x, kv_heads * hd).view(B, T, kv_heads, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, kvh, S, hd)
        if per_sequence is None:
            per_sequence = torch.full((B,), most, dtype=torch.int64, device=x.device)
        if key_mask is None:
            y = ops.varhead_attention(q, k, v, per_sequence, causal=True)  # (B, qh, T, hd)
        else:
            y = _padded_attention(q, k, v, per_sequence, key_mask)
        y = y.transpose(1, 2).reshape(B, T, q_heads * hd)
        return self.o_proj(y, in_features=q_heads * hd)


def _padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor:
    """Causal GQA attention that skips padding keys: q (B, qh, T, hd), k, v (B, kvh, S, hd),
    heads (B,), key_mask (B, S) bool -> (B, qh, T, hd), inactive heads zero.

    The kernels take no mask, so padded batches run PyTorch's SDPA.  The T queries are the
    last T of the S positions; a padding query also sees itself, so that no row is empty.
    """
    T, S = q.shape[2], k.shape[2]
    query_at = torch.arange(S - T, S, device=q.device)[:, None]  # (T, 1)
    key_at = torch.arange(S, device=q.device)[None, :]  # (1, S)
    allowed = (key_at <= query_at) & key_mask.to(q.device, torch.bool)[:, None, :]  # (B, T, S)
    allowed = allowed | (key_at == query_at)
    y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)
    active = torch.arange(q.shape[1], device=q.device)[None, :] < heads.to(q.device)[:, None]  # (B, qh)
    return y * active[:, :, None, None].to(y.dtype)
