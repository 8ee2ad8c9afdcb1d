"""The headroom oracle: how much could per-token MLP widths gain over one configuration per budget?

Estimate: per token t, layer l and MLP width w, the first-order change of the loss when token t
runs layer l's MLP at width w instead of the full width,

    Δ(t, l, w) = g_tl · (out_w − out_full)_tl,

g_tl = ∂loss/∂out_full at that token (the summed next-token loss of the block), from one forward
and one backward pass at full MLP widths and the given head counts; out_w is the nested weight
prefix's output on the same MLP input.  (The issue writes it g·(out_full − out_w), the loss a
token saves by keeping the full width; here positive means narrowing costs loss.)

Allocation: one Lagrange multiplier λ for all tokens and layers: every (token, layer) takes
argmin_w Δ(t, l, w) + λ·cost(w), with cost the latency table's ms of one layer's MLP at width w,
and λ is bisected so that the mean per-token MLP cost meets a target (the static router's).

The oracle sees the loss of the tokens it routes: it bounds what a router choosing from the
hidden state could gain; it is not a router.  Its choices run through a ForcedSession
(flextron.model.mixed_widths), so they pay the routed MLP kernel's cost like the dynamic router.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flextron.model.elastic_model import FlextronModel
from flextron.model.layers import ElasticMLP
from flextron.model.mixed_widths import FixedHeadsAttention, ForcedSession
from flextron.model.objectives import next_token_cross_entropy


class _ProbeSession(FixedHeadsAttention):
    """Full MLP widths at the forced head counts, keeping each layer's MLP input and output."""

    def __init__(self, heads: Sequence[int]) -> None:
        super().__init__(heads)
        self.inputs: list[torch.Tensor] = []  # per layer (B, T, D), detached
        self.outputs: list[torch.Tensor] = []  # per layer (B, T, D), gradient retained

    def mlp(self, layer: int, module: ElasticMLP, x: torch.Tensor) -> torch.Tensor:
        out = module(x, module.gate_proj.weight.shape[0])
        out.retain_grad()
        self.inputs.append(x.detach())
        self.outputs.append(out)
        return out


def neuron_contributions(module: ElasticMLP, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """x, grad: (B, T, D) MLP input and ∂loss/∂output -> (B*T, F): hidden neuron j's share
    g · W_down[:, j] h_j of g · out_full, with h = silu(x W_gate^T) * (x W_up^T) (SwiGLU)."""
    flat, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (N, D) each
    weights = module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight  # (F, D) (F, D) (D, F)
    hidden = torch.nn.functional.silu(flat @ weights[0].T) * (flat @ weights[1].T)  # (N, F)
    return (g @ weights[2]) * hidden  # (N, F)


def mlp_loss_changes(
    model: FlextronModel, tokens: torch.Tensor, heads: Sequence[int], widths: Sequence[int]
) -> torch.Tensor:
    """tokens: (B, T) -> Δ (L, B*T, C): the first-order loss change of running each token's MLP
    at each of `widths` (widest first) instead of the full width, at head counts `heads`.

    A nested prefix of width w drops neurons w..F-1, so g · (out_w − out_full) is minus the sum of
    their contributions: one suffix sum per token gives every width at once."""
    if model.config.mlp_bias:
        raise ValueError("the oracle's per-neuron split assumes MLPs without bias")
    probe = _ProbeSession(heads)
    with torch.enable_grad():
        logits = model(tokens, session=probe)  # (B, T, V)
        next_token_cross_entropy(logits, tokens, reduction="sum").backward()
    changes = []
    with torch.no_grad():
        for layer, (x, out) in enumerate(zip(probe.inputs, probe.outputs, strict=True)):
            contributions = neuron_contributions(model.layers[layer].mlp, x, out.grad)  # (N, F)
            dropped = contributions.flip(-1).cumsum(-1).flip(-1)  # (N, F): column w sums neurons w..F-1
            dropped = torch.cat([dropped, dropped.new_zeros(dropped.shape[0], 1)], -1)  # (N, F+1)
            changes.append(-dropped[:, list(widths)])  # (N, C)
    model.zero_grad(set_to_none=True)
    return torch.stack(changes)


def allocate_widths(
    changes: torch.Tensor, costs: torch.Tensor, target: float, *, iterations: int = 60
) -> tuple[torch.Tensor, float]:
    """changes: Δ (L, N, C), costs: (C,) ms of one layer's MLP per choice, target: mean ms per
    token summed over layers -> (choices (L, N) int64, λ).

    Every (layer, token) takes argmin_c Δ + λ·cost(c); λ ≥ 0 is bisected to the smallest value whose
    mean cost Σ_l mean_t cost(choice) is within the target."""
    costs = costs.to(changes)

    def choose(multiplier: float) -> tuple[torch.Tensor, float]:
        choice = (changes + multiplier * costs).argmin(-1)  # (L, N)
        return choice, float(costs[choice].mean(1).sum())

    choice, spent = choose(0.0)
    if spent <= target:
        return choice, 0.0
    low, high = 0.0, 1.0
    while choose(high)[1] > target:
        high *= 2
        if high > 1e12:
            raise ValueError(f"target {target:.4g} ms is below the cheapest choices' cost")
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if choose(middle)[1] > target else (low, middle)
    return choose(high)[0], high


def oracle_sessions(
    choices: torch.Tensor, widths: Sequence[int], heads: Sequence[int], batch: int, length: int
) -> list[ForcedSession]:
    """choices: (L, N*length) over N blocks in order -> one ForcedSession per batch of `batch`
    blocks (as `blocks.split(batch)` cuts them)."""
    per_block = choices.view(choices.shape[0], -1, length)  # (L, N, length)
    return [
        ForcedSession.shared(widths, part.flatten(1), heads)  # (L, b*length)
        for part in per_block.split(batch, dim=1)
    ]
