"""Per-token MLP widths: every token through its own nested weight prefix.

`routed_mlp` runs one layer's MLP with a width per token (one fused ops.routed_nested_mlp);
`ForcedSession` is a LayerSession (flextron.model.elastic_model) that runs given per-token
widths and per-layer head counts.  The dynamic router's sessions run the same kernel; the
headroom oracle forces its allocation through a ForcedSession, and elastic training's "token"
rule (flextron.train.sampling) trains the model on mixed widths through one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flextron import ops
from flextron.model.layers import ElasticAttention, ElasticMLP, KVCache


def routed_mlp(
    module: ElasticMLP,
    x: torch.Tensor,
    choice: torch.Tensor,
    widths: Sequence[int],
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (B, T, D), choice: (B*T,) int64 index into `widths` (widest first) -> (B, T, D), every
    token through its own width's weight prefix (one fused ops.routed_nested_mlp; int8 weights:
    each width's tokens through the nested int8 kernels)."""
    flat = x.reshape(-1, x.shape[-1])  # (B*T, D)
    if module.gate_proj.is_int8:
        return _int8_routed_mlp(module, flat, choice, widths, scale).view(x.shape)
    out = ops.routed_nested_mlp(
        flat,
        module.gate_proj.weight,
        module.up_proj.weight,
        module.down_proj.weight,
        choice,
        list(widths),
        scale,
    )
    return out.view(x.shape)


def _int8_routed_mlp(
    module: ElasticMLP,
    flat: torch.Tensor,
    choice: torch.Tensor,
    widths: Sequence[int],
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """routed_mlp on int8 weights, which have no routed kernel: the tokens of each chosen width
    together through the module's nested int8 path (a decode step's one token: one call).
    flat: (N, D), choice: (N,) -> (N, D)."""
    out = torch.empty_like(flat)
    for index in torch.unique(choice).tolist():
        rows = (choice == index).nonzero().squeeze(1)  # (n,) tokens at widths[index]
        part = module(flat[rows][None], widths[index])[0]  # (n, D)
        out[rows] = part if scale is None else part * scale[rows, None].to(part.dtype)
    return out


class FixedHeadsAttention:
    """The attention half of a LayerSession: every layer at a given head count."""

    def __init__(self, heads: Sequence[int]) -> None:
        self.heads = tuple(heads)  # (L,) query heads per layer

    def attention(
        self,
        layer: int,
        module: ElasticAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        return module(x, cos, sin, self.heads[layer], kv_cache, layer)


class ForcedSession(FixedHeadsAttention):
    """Given choices forced through the routed path (one batch): per-token MLP widths, per-layer
    head counts; the model's `session=` (a LayerSession)."""

    def __init__(
        self, layer_widths: Sequence[Sequence[int]], choice: torch.Tensor, heads: Sequence[int]
    ) -> None:
        if not len(layer_widths) == choice.shape[0] == len(heads):
            raise ValueError(
                f"forced choices for {choice.shape[0]} layers, widths for {len(layer_widths)}, "
                f"head counts for {len(heads)}: they must agree"
            )
        super().__init__(heads)
        self.layer_widths = [list(w) for w in layer_widths]  # per layer, widest first
        self.choice = choice  # (L, B*T) int64: each layer's and token's index into its widths

    @classmethod
    def shared(cls, widths: Sequence[int], choice: torch.Tensor, heads: Sequence[int]) -> ForcedSession:
        """The same width choices (widest first) in every layer; choice (L, B*T)."""
        return cls([widths] * choice.shape[0], choice, heads)

    def mlp(self, layer: int, module: ElasticMLP, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D) at the forced per-token widths."""
        return routed_mlp(module, x, self.choice[layer], self.layer_widths[layer])
