"""How routers draw their choices: Gumbel-softmax sampling settings, the straight-through pick,
and the protocol that both kinds of routing session follow.

Training samples with Gumbel noise and straight-through hard samples (the one-hot in value, the
soft gradient in backward; `ops.route(..., hard=True)`) at temperature tau; inference takes the
argmax (INFERENCE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from flextron import ops


def gumbel_noise(
    shape: Sequence[int], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard Gumbel samples -log(-log(U)), U ~ Uniform(0, 1)."""
    uniform = torch.rand(tuple(shape), generator=generator).clamp_(1e-10, 1 - 1e-7)
    return (-torch.log(-torch.log(uniform))).to(device)


@dataclass
class Sampling:
    """How a routing session draws its choices."""

    tau: float = 1.0  # Gumbel-softmax temperature
    noise: bool = False  # add Gumbel noise (training) or take the argmax (inference)
    scale: bool = False  # multiply each chosen path by its probability (training)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


INFERENCE = Sampling()


def pick(logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits (N, C) -> (choice (N,), probs (N, C) straight-through, scale (N,) or None)."""
    noise = gumbel_noise(logits.shape, sampling.generator, logits.device) if sampling.noise else None
    choice, probs, *_ = ops.route(logits, None, noise, sampling.tau, True)
    scale = probs.gather(1, choice[:, None]).squeeze(1) if sampling.scale else None
    return choice, probs, scale


class RoutingSession(Protocol):
    """What both kinds of session offer beyond the model's LayerSession calls."""

    def usage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Router outputs per sequence: (mlp probs (B, L, Cm), head probs (B, L, Ch))."""
        ...
