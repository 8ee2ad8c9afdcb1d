"""Fitting the sequence router (flextron.routers.sequence) on a model's own losses.

The candidates (the trained configurations, and the static router's) are measured on validation
text; those on the lower convex hull of (latency fraction at the fitting shape, validation loss)
are kept, since a mix of two hull neighbours beats any candidate above the segment between them.
Per training block, the loss of every configuration kept after an unscored prefix; per pair of
configurations (any two: which are neighbours depends on the shape), a ridge regression from the
prefix's features (the mean of the first layer's normalised input) to the loss the second saves
over the first.  The penalty is chosen on validation text, by the loss of the mixes it gives (the
predicted-best share of sequences at the second, at several shares).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel
from flextron.routers.evaluation import block_losses
from flextron.routers.sequence import SequenceRouter, lower_hull

PENALTIES = (
    1e-3,
    1e-2,
    1e-1,
    1.0,
    10.0,
    100.0,
)  # ridge penalties tried (per block, on standardised features)
SHARES = (0.25, 0.5, 0.75)  # shares of wider sequences at which penalties are compared


def first_layer_input(model: FlextronModel, ids: torch.Tensor) -> torch.Tensor:
    """ids: (B, T) -> (B, T, D) the first layer's normalised input, as a routing session sees it."""
    return model.layers[0].input_layernorm(model.embed_tokens(ids))


@torch.no_grad()
def prefix_features(
    model: FlextronModel, blocks: torch.Tensor, prefix: int, batch_size: int = 16
) -> torch.Tensor:
    """blocks: (N, S) -> (N, D) mean first-layer input over each block's first `prefix` tokens."""
    device = model.embed_tokens.weight.device
    return torch.cat(
        [
            first_layer_input(model, b[:, :prefix].to(device)).float().mean(1).cpu()
            for b in blocks.split(batch_size)
        ]
    )


@torch.no_grad()
def configuration_losses(
    model: FlextronModel, configurations: Sequence[ArchConfig], blocks: torch.Tensor, prefix: int
) -> torch.Tensor:
    """(N, K) per-block mean loss after the prefix, per configuration."""
    return torch.stack([block_losses(model, blocks, prefix=prefix, arch=arch) for arch in configurations], 1)


def ridge(features: torch.Tensor, targets: torch.Tensor, penalty: float) -> tuple[torch.Tensor, float]:
    """features: (N, D) standardised, targets: (N,) -> (weight (D,), bias) of a ridge regression
    (penalty × N on the squared weights)."""
    x, y = features.double(), targets.double()
    mean_x, mean_y = x.mean(0), y.mean()
    centred = x - mean_x
    gram = centred.T @ centred + penalty * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, centred.T @ (y - mean_y))
    return weight.float(), float(mean_y - mean_x @ weight)


def mix_loss(predicted: torch.Tensor, narrow: torch.Tensor, wide: torch.Tensor, share: float) -> float:
    """Mean loss when the round(share × N) sequences of highest predicted gain run the wider
    configuration; predicted, narrow, wide: (N,)."""
    chosen = torch.zeros_like(narrow, dtype=torch.bool)
    chosen[predicted.argsort(descending=True)[: round(share * narrow.numel())]] = True
    return float(torch.where(chosen, wide, narrow).mean())


def fit_sequence_router(
    model: FlextronModel,
    candidates: Sequence[ArchConfig],
    fractions: Sequence[float],
    train_blocks: torch.Tensor,
    validation_blocks: torch.Tensor,
    *,
    prefix: int,
    report: Callable[[str], None] = lambda _: None,
) -> tuple[SequenceRouter, list[dict]]:
    """The fitted router (candidates: configurations, fractions: their latency fractions at the
    router's shape, where candidates above the hull are dropped) and, per pair of the
    configurations kept, what validation says: the penalty chosen,
    and at each share the loss of the fixed mix (its expectation), the router's mix, and the
    oracle's (sequences ranked by their true gain)."""
    report(f"losses of {len(candidates)} candidates on {validation_blocks.shape[0]} validation blocks")
    candidate_losses = configuration_losses(model, candidates, validation_blocks, prefix)  # (M, C)
    kept = lower_hull(list(fractions), candidate_losses.mean(0).tolist())
    for index, arch in enumerate(candidates):
        report(
            f"candidate at {fractions[index]:.3f} of full latency, {model.num_parameters(arch) / 1e6:.1f}M "
            f"parameters: validation loss {float(candidate_losses[:, index].mean()):.4f}"
            + ("" if index in kept else " (dropped: above the hull)")
        )
    archs = [candidates[i] for i in kept]
    router = SequenceRouter(model.config, archs)
    validation_losses = candidate_losses[:, kept]  # (M, K)
    router.validation_loss.copy_(validation_losses.mean(0))
    report(f"losses of {len(archs)} configurations on {train_blocks.shape[0]} training blocks")
    train_losses = configuration_losses(model, archs, train_blocks, prefix)  # (N, K)
    train_raw = prefix_features(model, train_blocks, prefix)
    router.center.copy_(train_raw.mean(0))
    router.scale.copy_(train_raw.std(0).clamp_min(1e-6))
    train_x = (train_raw - router.center) / router.scale
    validation_x = (prefix_features(model, validation_blocks, prefix) - router.center) / router.scale
    summary = []
    for pair, (first, second) in enumerate(router.pairs):
        gains = train_losses[:, first] - train_losses[:, second]  # (N,) loss the second one saves
        narrow, wide = validation_losses[:, first], validation_losses[:, second]

        def mixes(predicted: torch.Tensor, narrow=narrow, wide=wide) -> list[float]:
            return [mix_loss(predicted, narrow, wide, share) for share in SHARES]

        fits = {penalty: ridge(train_x, gains, penalty) for penalty in PENALTIES}
        scores = {p: sum(mixes(validation_x @ w + b)) for p, (w, b) in fits.items()}
        penalty = min(scores, key=scores.get)
        weight, bias = fits[penalty]
        router.weight[pair], router.bias[pair] = weight, bias
        predicted = validation_x @ weight + bias  # (M,)
        fixed = [float(((1 - s) * narrow + s * wide).mean()) for s in SHARES]
        row = {
            "pair": [archs[first].to_dict(), archs[second].to_dict()],
            "fractions": [fractions[kept[first]], fractions[kept[second]]],
            "penalty": penalty,
            "shares": list(SHARES),
            "fixed_mix_loss": fixed,
            "router_mix_loss": mixes(predicted),
            "oracle_mix_loss": mixes(narrow - wide),
            "rank_correlation": _rank_correlation(predicted, narrow - wide),
        }
        summary.append(row)
        report(
            f"pair {first}-{second}: penalty {penalty:g}, rank correlation "
            f"{row['rank_correlation']:.2f}; validation loss at shares "
            + ", ".join(
                f"{s:g}: fixed {f:.4f} router {r:.4f} oracle {o:.4f}"
                for s, f, r, o in zip(
                    SHARES, fixed, row["router_mix_loss"], row["oracle_mix_loss"], strict=True
                )
            )
        )
    return router, summary


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two (N,) tensors (no ties expected)."""
    ranks_a, ranks_b = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ranks_a, ranks_b]))[0, 1])
