"""Conversion: rank MLP neurons and attention heads on calibration text, then permute the
weights so the most important come first (the permuted full model computes the same
function; every sub-network is then a prefix).

Importance (docs/design.md#conversion, Minitron-style, forward only, full model):
  MLP neuron i: a = the input of down_proj (B, S, d_ff);
      s_i = sum over batches and sequences b of (mean_s |a[b, s, i]|)^2;  importance_i = sqrt(s_i).
  Query head h: a = the input of o_proj, viewed (B, S, H, hd); the same per (h, d), then
      importance_h = sqrt(sum_d s_hd) (L2 over the head dimension).
GQA rule: whole KV groups are ranked (group score = L2 of its query heads' scores), and
query heads are ranked within each group, so a head prefix of whole groups keeps the
best groups and their K/V heads (see flextron.model.config).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from flextron.model.budget_configs import CalibrationConfig
from flextron.model.config import ModelConfig
from flextron.model.elastic_model import FlextronModel


@torch.no_grad()
def compute_importance(
    model: FlextronModel, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Scores {"layers.{l}.mlp": (d_ff,), "layers.{l}.heads": (H,)} from blocks (N, S) of token ids."""
    if blocks.dim() != 2 or blocks.numel() == 0:
        raise ValueError(
            f"calibration blocks must be (num_blocks, seq_len) and non-empty, got {tuple(blocks.shape)}"
        )
    config = model.config
    layers = range(config.num_layers)
    mlp_sums = [torch.zeros(config.layer_intermediate_size(i), dtype=torch.float64) for i in layers]
    head_sums = [torch.zeros(config.layer_heads(i), config.head_dim, dtype=torch.float64) for i in layers]

    def mlp_hook(index: int):
        def hook(module, args):
            x = args[0]  # (B, S, D), the MLP input; rebuild down_proj's input from it
            gate = module.gate_proj(x).float()
            up = module.up_proj(x).float()
            a = torch.nn.functional.silu(gate) * up  # (B, S, d_ff)
            mlp_sums[index] += (a.abs().mean(1) ** 2).sum(0).double()

        return hook

    def head_hook(index: int):
        def hook(module, args):
            a = args[0].float()  # (B, S, H * hd), the input of o_proj
            a = a.view(*a.shape[:2], -1, config.head_dim)  # (B, S, H, hd)
            head_sums[index] += (a.abs().mean(1) ** 2).sum(0).double()  # (H, hd)

        return hook

    handles = []
    for index, layer in enumerate(model.layers):
        handles.append(layer.mlp.register_forward_pre_hook(mlp_hook(index)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(index)))
    try:
        device = model.embed_tokens.weight.device
        batches = blocks.split(batch_size)
        for batch in tqdm(batches, desc="importance", disable=not progress, unit="batch"):
            model(batch.to(device), last_only=True)
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for index in range(config.num_layers):
        scores[f"layers.{index}.mlp"] = mlp_sums[index].sqrt().float()
        scores[f"layers.{index}.heads"] = head_sums[index].sum(-1).sqrt().float()
    return scores


def orders_from_importance(
    config: ModelConfig, importance: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Permutations {"layers.{l}.mlp": (d_ff,), "layers.{l}.heads": (H,)}, most important first.

    Head order: KV groups by descending group score (L2 of its heads), and within each
    group its query heads by descending score.  Ties keep the original order.
    """
    orders = {}
    group = config.group_size
    for index in range(config.num_layers):
        mlp = importance[f"layers.{index}.mlp"]
        orders[f"layers.{index}.mlp"] = torch.sort(mlp, descending=True, stable=True).indices
        heads = importance[f"layers.{index}.heads"].view(-1, group)  # (kv_heads, group)
        group_order = torch.sort(heads.norm(dim=1), descending=True, stable=True).indices
        within = torch.sort(heads, dim=1, descending=True, stable=True).indices  # (kv_heads, group)
        order = (group_order[:, None] * group + within[group_order]).flatten()
        orders[f"layers.{index}.heads"] = order
    return orders


def random_orders(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random permutations of the same form (the no-importance baseline)."""
    generator = torch.Generator().manual_seed(seed)
    orders = {}
    for index in range(config.num_layers):
        size, kv_heads = config.layer_intermediate_size(index), config.layer_kv_heads(index)
        orders[f"layers.{index}.mlp"] = torch.randperm(size, generator=generator)
        group_order = torch.randperm(kv_heads, generator=generator)
        group = config.group_size
        within = torch.stack([torch.randperm(group, generator=generator) for _ in range(kv_heads)])
        orders[f"layers.{index}.heads"] = (group_order[:, None] * group + within[group_order]).flatten()
    return orders


def _take(param: torch.nn.Parameter | None, index: torch.Tensor, dim: int) -> None:
    if param is not None:
        param.data = param.data.index_select(dim, index.to(param.device))


@torch.no_grad()
def permute(model: FlextronModel, orders: dict[str, torch.Tensor]) -> None:
    """Reorder neurons and heads in place: new position i holds old neuron/head order[i].

    MLP: rows of gate_proj/up_proj (and biases), columns of down_proj.  Heads: row blocks of
    q_proj, the matching KV row blocks of k_proj/v_proj, column blocks of o_proj.
    """
    config = model.config
    hd, group = config.head_dim, config.group_size
    for index, layer in enumerate(model.layers):
        mlp_order = orders[f"layers.{index}.mlp"]
        mlp = layer.mlp
        for linear in (mlp.gate_proj, mlp.up_proj):
            _take(linear.weight, mlp_order, 0)
            _take(linear.bias, mlp_order, 0)
        _take(mlp.down_proj.weight, mlp_order, 1)

        head_order = orders[f"layers.{index}.heads"]
        kv_order = head_order.view(-1, group)[:, 0] // group  # the group of each new KV slot
        if not torch.equal(head_order.view(-1, group) // group, kv_order[:, None].expand(-1, group)):
            raise ValueError(f"layer {index}: a head order must keep each KV group's query heads together")
        q_rows = (head_order[:, None] * hd + torch.arange(hd)).flatten()  # (H * hd,)
        kv_rows = (kv_order[:, None] * hd + torch.arange(hd)).flatten()  # (Hkv * hd,)
        attn = layer.self_attn
        _take(attn.q_proj.weight, q_rows, 0)
        _take(attn.q_proj.bias, q_rows, 0)
        for linear in (attn.k_proj, attn.v_proj):
            _take(linear.weight, kv_rows, 0)
            _take(linear.bias, kv_rows, 0)
        _take(attn.o_proj.weight, q_rows, 1)


def convert(
    model: FlextronModel,
    blocks: torch.Tensor,
    config: CalibrationConfig | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Rank on `blocks` (N, S) in batches of config.batch_size, permute `model` in place, and keep
    the (re-ordered) scores and the orders in model.importance.  Returns model.importance."""
    scores = compute_importance(model, blocks, (config or CalibrationConfig()).batch_size, progress)
    orders = orders_from_importance(model.config, scores)
    permute(model, orders)
    model.importance = {
        **{name: scores[name][order] for name, order in orders.items()},  # scores in the new order
        **{f"{name}.order": order for name, order in orders.items()},  # new index -> old index
    }
    return model.importance
