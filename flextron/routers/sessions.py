"""Routing sessions: one router decision (static) or one generation's routing (dynamic).

A session is what the model's forward takes as `session=` (flextron.model.elastic_model.LayerSession): it
runs each layer's attention and MLP at the chosen head count and width.  Training sessions
sample with Gumbel-softmax and straight-through hard samples (the one-hot in value, the soft
gradient in backward; `ops.route(..., hard=True)`) at temperature tau; the chosen path's
output is multiplied by its probability (value 1, so the forward is unchanged), which
carries the gradient to the router.
"""

from __future__ import annotations

import torch

from flextron import ops
from flextron.model.config import ArchConfig
from flextron.model.layers import ElasticAttention, ElasticMLP, KVCache
from flextron.model.mixed_widths import routed_mlp
from flextron.routers.base import Router
from flextron.routers.sampling import Sampling, gumbel_noise, pick


class StaticSession:
    """One static router decision for every sequence: the model's `session=` (a LayerSession)."""

    def __init__(self, router: Router, mlp_pick: tuple, head_pick: tuple) -> None:
        self.mlp_choice, self.mlp_probs, self.mlp_scale = mlp_pick  # (L,), (L, Cm), (L,) | None
        self.head_choice, self.head_probs, self.head_scale = head_pick  # (L,), (L, Ch), (L,) | None
        self.arch = ArchConfig(
            tuple(router.mlp_choices[i] for i in self.mlp_choice.tolist()),
            tuple(router.head_choices[i] for i in self.head_choice.tolist()),
        )

    def attention(
        self,
        layer: int,
        module: ElasticAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        out = module(x, cos, sin, self.arch.heads[layer], kv_cache, layer)
        return out if self.head_scale is None else out * self.head_scale[layer]

    def mlp(self, layer: int, module: ElasticMLP, x: torch.Tensor) -> torch.Tensor:
        out = module(x, self.arch.mlp_widths[layer])
        return out if self.mlp_scale is None else out * self.mlp_scale[layer]

    def usage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Router outputs per sequence: (mlp probs (1, L, Cm), head probs (1, L, Ch))."""
        return self.mlp_probs[None], self.head_probs[None]


class DynamicSession:
    """One generation's (or batch's) dynamic routing: the model's `router` (a LayerSession).

    Head counts are chosen at the first call (prefill) and kept for later calls (decode,
    or a full recompute of the same sequences), so cached keys/values stay valid.
    """

    def __init__(
        self,
        router: Router,  # a DynamicRouter
        budget_weights: torch.Tensor,
        offsets: torch.Tensor,
        costs: tuple[torch.Tensor, torch.Tensor],
        sampling: Sampling,
    ) -> None:
        self.router, self.budget_weights, self.sampling = router, budget_weights, sampling
        self.offsets = offsets  # (B,) calibration offsets (DynamicRouter.set_calibration)
        # (Cm,), (Ch,) calibration costs, built once per session rather than per layer call.
        self.mlp_costs, self.head_costs = costs
        layers = router.num_layers
        self.heads: list[torch.Tensor | None] = [None] * layers  # (B,) int64 query heads per layer
        # The same on the CPU, and their maximum, read once at prefill: a decode step then reads
        # nothing back from the GPU (no synchronisation; CUDA-graph capturable).
        self.heads_on_host: list[tuple[torch.Tensor, int] | None] = [None] * layers
        self.head_probs: list[torch.Tensor | None] = [None] * layers  # (B, Ch)
        self.head_scale: list[torch.Tensor | None] = [None] * layers  # (B,)
        self.mlp_probs: list[torch.Tensor | None] = [None] * layers  # (B*T, Cm) of the latest call
        self.mlp_choice: list[torch.Tensor | None] = [None] * layers  # (B*T,)
        # Per layer, the routing terms that depend only on the budget, kept when no autograd graph
        # is recorded (inference: a decode step would rebuild them for one token otherwise).
        self.mlp_terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * layers

    def attention(
        self,
        layer: int,
        module: ElasticAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D) with per-sequence head counts fixed at prefill."""
        if self.heads[layer] is None:
            budget = self.budget_weights  # the router computes in its own dtype
            logits = self.router.head_logits(layer, x, budget, self.offsets, self.head_costs)
            choice, probs, scale = pick(logits, self.sampling)
            counts = torch.tensor(self.router.head_choices, device=x.device)
            self.heads[layer], self.head_probs[layer], self.head_scale[layer] = counts[choice], probs, scale
            on_host = self.heads[layer].cpu()
            self.heads_on_host[layer] = on_host, int(on_host.max())
        heads, most = self.heads_on_host[layer]
        out = module(x, cos, sin, heads, kv_cache, layer, max_heads=most)
        scale = self.head_scale[layer]
        return out if scale is None else out * scale[:, None, None].to(out.dtype)

    def mlp(self, layer: int, module: ElasticMLP, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D), every token at its own width (one fused routed MLP)."""
        router = self.router
        terms = self.mlp_terms[layer]
        if terms is None:
            budget = self.budget_weights  # the router computes in its own dtype
            terms = router.mlp_budget_terms(layer, budget, self.offsets, self.mlp_costs)
            if not torch.is_grad_enabled():
                self.mlp_terms[layer] = terms
        features, weight = router.mlp_token_features(layer, x, terms), terms[2]
        noise = None
        if self.sampling.noise:
            noise = gumbel_noise((features.shape[0], weight.shape[0]), self.sampling.generator, x.device)
        choice, probs, *_ = ops.route(features, weight, noise, self.sampling.tau, True)
        scale = probs.gather(1, choice[:, None]).squeeze(1) if self.sampling.scale else None
        self.mlp_probs[layer], self.mlp_choice[layer] = probs, choice
        return routed_mlp(module, x, choice, router.mlp_choices, scale)

    def usage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Router outputs per sequence, averaged over its tokens:
        (mlp probs (B, L, Cm), head probs (B, L, Ch))."""
        batch = self.budget_weights.shape[0]
        mlp = torch.stack([p.view(batch, -1, p.shape[-1]).mean(1) for p in self.mlp_probs], 1)
        heads = torch.stack(list(self.head_probs), 1)
        return mlp, heads

    def mean_widths(self) -> list[float]:
        """Mean MLP width per layer over the latest call's tokens."""
        widths = torch.tensor(self.router.mlp_choices, dtype=torch.float32)
        return [float(widths[c.cpu()].mean()) for c in self.mlp_choice]
