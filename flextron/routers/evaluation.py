"""Evaluating selections: per-block loss, perplexity and active parameters of each budget's sub-network.

No peeking: a dynamic router chooses each sequence's head counts at its first call, from the
mean of the attention input (flextron.routers.sessions.DynamicSession).  Generation makes that
choice at the prompt, before any token it will be judged on exists; so evaluation makes it on an
unscored prefix of each block (the first `prefix` tokens), then scores only the tokens after it.
Every selection of one comparison is scored on the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel, LayerSession
from flextron.model.objectives import next_token_cross_entropy
from flextron.routers.selection import Selection
from flextron.routers.sequence import SequenceSession
from flextron.routers.sessions import DynamicSession

PREFIX = 32  # default unscored prefix (tokens) from which per-sequence choices are made


def prefix_session(
    model: FlextronModel, selection: Selection, prompt: torch.Tensor
) -> DynamicSession | SequenceSession:
    """A routed selection's session for prompt (B, P), its per-sequence choices (head counts, or
    the sequence router's configurations) made from the prompt alone (one forward over it), as
    generation makes them at prefill."""
    session = selection.session(prompt.shape[0])
    if session is None:
        raise ValueError("prefix_session needs a dynamic or sequence selection")
    model(prompt, session=session, last_only=True)
    return session


@torch.no_grad()
def block_losses(
    model: FlextronModel,
    blocks: torch.Tensor,
    *,
    prefix: int = PREFIX,
    arch: ArchConfig | None = None,
    sessions: Sequence[LayerSession] | Callable[[torch.Tensor], LayerSession] | None = None,
    batch_size: int = 4,
) -> torch.Tensor:
    """blocks: (N, S) token ids -> (N,) mean next-token loss per block over its tokens after the
    first `prefix` (positions prefix..S-1), in nats.

    sessions: one routing session per batch of `batch_size` blocks, or a function of the batch
    (B, S) that returns one (e.g. `prefix_session`, which sees only batch[:, :prefix]); None runs
    `arch` (default: the full model)."""
    if not 0 < prefix < blocks.shape[1]:
        raise ValueError(f"prefix must be in [1, {blocks.shape[1] - 1}], got {prefix}")
    device, losses = model.embed_tokens.weight.device, []
    for index, batch in enumerate(blocks.split(batch_size)):
        batch = batch.to(device)
        if sessions is None:
            session = None
        elif callable(sessions):
            session = sessions(batch[:, :prefix])
        else:
            session = sessions[index]
        logits = model(batch, arch, session=session)  # (B, S, V)
        nll = next_token_cross_entropy(logits, batch, reduction="none").view(batch.shape[0], -1)  # (B, S-1)
        losses.append(nll[:, prefix - 1 :].mean(1).cpu())  # targets prefix..S-1
    return torch.cat(losses)


@torch.no_grad()
def dynamic_perplexity(
    model: FlextronModel,
    blocks: torch.Tensor,
    selection: Selection,
    batch_size: int = 4,
    prefix: int = PREFIX,
) -> tuple[float, int]:
    """(perplexity after the unscored prefix, mean active parameters per token) under dynamic or
    sequence routing.

    blocks: (N, S) token ids; every batch gets a fresh session, its choices made from the
    batch's prefix.  Dynamic: active parameters count each layer at its mean MLP width and mean
    head count; sequence: the mean over sequences of their configurations' parameters.
    """
    config = model.config
    widths, heads = torch.zeros(config.num_layers), torch.zeros(config.num_layers)
    used: list[DynamicSession | SequenceSession] = []

    def session_of(prompt: torch.Tensor) -> DynamicSession | SequenceSession:
        used.append(prefix_session(model, selection, prompt))
        return used[-1]

    losses = block_losses(model, blocks, prefix=prefix, sessions=session_of, batch_size=batch_size)
    if selection.method == "sequence":
        chosen = [arch for session in used for arch in session.configurations()]
        return float(losses.mean().exp()), round(sum(map(model.num_parameters, chosen)) / len(chosen))
    for session in used:
        widths += torch.tensor(session.mean_widths()) / len(used)
        heads += torch.stack([h.float().mean().cpu() for h in session.heads]) / len(used)
    mean_arch = ArchConfig(tuple(round(float(w)) for w in widths), tuple(round(float(h)) for h in heads))
    return float(losses.mean().exp()), model.num_parameters(mean_arch)


def evaluate_selections(
    model: FlextronModel, blocks: torch.Tensor, selections: list[Selection], batch_size: int = 4
) -> list[dict]:
    """flextron.eval.perplexity-style result rows for selections, every one scored on the tokens
    after the same unscored prefix (PREFIX tokens, at most a quarter of a block)."""
    prefix, rows = max(1, min(PREFIX, blocks.shape[1] // 4)), []
    for selection in selections:
        start = time.perf_counter()
        if selection.arch is not None:
            losses = block_losses(model, blocks, prefix=prefix, arch=selection.arch, batch_size=batch_size)
            perplexity, active = float(losses.mean().exp()), model.num_parameters(selection.arch)
        else:
            perplexity, active = dynamic_perplexity(model, blocks, selection, batch_size, prefix)
        rows.append(
            {
                "name": f"{selection.method} {selection.budget:.2f}",
                "budget": selection.budget,
                "arch": None if selection.arch is None else selection.arch.to_dict(),
                "parameters": active,
                "tokens_per_s": blocks.numel() / (time.perf_counter() - start),
                "perplexity": perplexity,
                "predicted_ms": selection.predicted_ms,
            }
        )
    return rows
