"""The static router: budget -> one configuration (per-layer MLP width and head count).

docs/design.md#routers: budget -> interpolated one-hot over the trained budgets -> Linear ->
LeakyReLU -> Linear -> per-layer logits over MLP widths and head counts.  Its choices are one
`ArchConfig` per budget, so it serves export as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flextron.model.config import ArchConfig, ModelConfig
from flextron.routers.base import Router
from flextron.routers.sampling import INFERENCE, Sampling, pick
from flextron.routers.sessions import StaticSession


class StaticRouter(Router):
    """Budget -> per-layer MLP width and head count (one configuration per budget)."""

    kind = "static"

    def __init__(
        self,
        config: ModelConfig,
        budgets: Sequence[float],
        mlp_choices: Sequence[int] | None = None,
        head_choices: Sequence[int] | None = None,
        hidden_size: int = 128,
    ) -> None:
        super().__init__(config, budgets, mlp_choices, head_choices, hidden_size)
        outputs = self.num_layers * (len(self.mlp_choices) + len(self.head_choices))
        self.net = nn.Sequential(
            nn.Linear(len(self.encoder.budgets), hidden_size), nn.LeakyReLU(), nn.Linear(hidden_size, outputs)
        )

    def forward(self, budget: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """budget: a number -> (mlp logits (L, Cm), head logits (L, Ch))."""
        out = self.net(self.encoder(budget))[0]
        split = self.num_layers * len(self.mlp_choices)
        return out[:split].view(self.num_layers, -1), out[split:].view(self.num_layers, -1)

    def _init_to_indices(self, indices: list[tuple[list[int], list[int]]], margin: float) -> None:
        """Solve the last linear layer (least squares, minimum norm) so that at trained budget k
        the logits are `margin` at the configuration's choice and 0 elsewhere; the first layer
        keeps its random initialisation.  The argmax is then exactly that configuration, and
        Gumbel sampling at temperature tau explores around it."""
        first, last = self.net[0], self.net[2]
        hidden = self.net[1](first(torch.eye(len(indices), device=first.weight.device)))  # (K, H)
        targets = torch.zeros(len(indices), last.out_features, device=hidden.device)
        cm, ch, layers = len(self.mlp_choices), len(self.head_choices), self.num_layers
        for k, (mlp, heads) in enumerate(indices):
            for layer in range(layers):
                targets[k, layer * cm + mlp[layer]] = margin
                targets[k, layers * cm + layer * ch + heads[layer]] = margin
        last.bias.zero_()
        last.weight.copy_((torch.linalg.pinv(hidden) @ targets).T)

    def session(
        self, budget: float | torch.Tensor, batch_size: int = 1, sampling: Sampling = INFERENCE
    ) -> StaticSession:
        """A routing session for one budget, sampled once: every layer gets one choice, shared by
        all `batch_size` sequences."""
        mlp_logits, head_logits = self(budget)
        return StaticSession(self, pick(mlp_logits, sampling), pick(head_logits, sampling))

    @torch.no_grad()
    def arch(self, budget: float) -> ArchConfig:
        """The configuration for `budget` (argmax per layer)."""
        mlp_logits, head_logits = self(budget)
        return ArchConfig(
            tuple(self.mlp_choices[i] for i in mlp_logits.argmax(-1).tolist()),
            tuple(self.head_choices[i] for i in head_logits.argmax(-1).tolist()),
        )
