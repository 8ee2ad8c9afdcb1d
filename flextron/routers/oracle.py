"""The headroom oracle: how much could per-token MLP widths gain over one configuration per budget?

Estimate: per token t, layer l and MLP width w, the first-order change of the loss when token t
runs layer l's MLP at width w instead of an anchor width a_l,

    Δ(t, l, w) = g_tl · (out_w − out_a)_tl,

g_tl = ∂loss/∂out_a at that token (the summed next-token loss of the block), from one forward
and one backward pass at the anchor widths and the given head counts; out_w is the nested weight
prefix's output on the same MLP input.  The anchor is the full width by default (the issue's
g·(out_full − out_w), with the sign flipped: positive means the change costs loss).  A first-order
estimate only holds near where it is taken, so the bench anchors it at the static router's
configuration and lets each token move a few widths either side of it (`restrict_to_window`).

Which loss: the next-token loss (the scored tokens' own) leaks the answer, since a token's widths
can be chosen for the token that follows it (the oracle then beats the full model); the KL
divergence from the full model's predictions (`teacher_logits`) bounds what a router could gain
from the input alone, anything the full model can compute from it included.

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
from flextron.model.objectives import kd_loss, next_token_cross_entropy


class _ProbeSession(FixedHeadsAttention):
    """The anchor MLP widths at the forced head counts, keeping each layer's MLP input and output."""

    def __init__(self, heads: Sequence[int], anchor: Sequence[int]) -> None:
        super().__init__(heads)
        self.anchor = anchor
        self.inputs: list[torch.Tensor] = []  # per layer (B, T, D), detached
        self.outputs: list[torch.Tensor] = []  # per layer (B, T, D), gradient retained

    def mlp(self, layer: int, module: ElasticMLP, x: torch.Tensor) -> torch.Tensor:
        out = module(x, self.anchor[layer])
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
    model: FlextronModel,
    tokens: torch.Tensor,
    heads: Sequence[int],
    widths: Sequence[int],
    anchor: Sequence[int] | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """tokens: (B, T) -> Δ (L, B*T, C): the first-order loss change of running each token's MLP
    at each of `widths` (widest first) instead of its layer's `anchor` width (default: full), at
    head counts `heads`.  The loss: the summed next-token loss of the block, or with
    `teacher_logits` (B, T, V) the summed KL divergence from the teacher's predictions, which
    says nothing about the tokens that follow beyond what the teacher predicts.

    A nested prefix of width w keeps neurons 0..w-1, so g · (out_w − out_a) is the difference of
    two prefix sums of per-neuron contributions: one cumulative sum per token gives every width."""
    if model.config.mlp_bias:
        raise ValueError("the oracle's per-neuron split assumes MLPs without bias")
    full = model.config.intermediate_size
    anchor = [full] * model.config.num_layers if anchor is None else list(anchor)
    probe = _ProbeSession(heads, anchor)
    with torch.enable_grad():
        logits = model(tokens, session=probe)  # (B, T, V)
        if teacher_logits is None:
            next_token_cross_entropy(logits, tokens, reduction="sum").backward()
        else:
            (kd_loss(logits, teacher_logits) * tokens.numel()).backward()
    changes = []
    with torch.no_grad():
        for layer, (x, out) in enumerate(zip(probe.inputs, probe.outputs, strict=True)):
            contributions = neuron_contributions(model.layers[layer].mlp, x, out.grad)  # (N, F)
            kept = torch.cat(
                [contributions.new_zeros(contributions.shape[0], 1), contributions.cumsum(-1)], -1
            )
            # kept (N, F+1): column w sums neurons 0..w-1
            changes.append(kept[:, list(widths)] - kept[:, anchor[layer], None])  # (N, C)
    model.zero_grad(set_to_none=True)
    return torch.stack(changes)


def restrict_to_window(changes: torch.Tensor, anchor_choice: Sequence[int], window: int) -> torch.Tensor:
    """changes: Δ (L, N, C), anchor_choice: per layer the index of its anchor width among the C
    choices -> Δ with every choice more than `window` indices from the anchor's set to +inf, so
    that the allocation moves no token beyond where the first-order estimate holds."""
    index = torch.arange(changes.shape[-1])  # (C,)
    far = (index[None, :] - torch.tensor(list(anchor_choice))[:, None]).abs() > window  # (L, C)
    return changes.masked_fill(far[:, None, :].to(changes.device), float("inf"))


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
