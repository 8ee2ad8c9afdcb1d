"""Cutting a sub-network out of an elastic model: a standalone FlextronModel holding copies
of the configuration's weight prefixes (what every export writes)."""

from __future__ import annotations

import dataclasses

import torch

from flextron.config import ArchConfig
from flextron.model import FlextronModel


def slice_model(model: FlextronModel, arch: ArchConfig, dtype: torch.dtype | None = None) -> FlextronModel:
    """A new, smaller FlextronModel holding copies of `arch`'s weight prefixes, in `dtype`
    (default: the model's).

    Head counts must be whole KV groups (multiples of the group size).
    """
    config = model.config
    arch.validate(config)
    group, hd = config.group_size, config.head_dim
    if any(h % group for h in arch.heads):
        raise ValueError(
            f"export needs whole KV groups: head counts must be multiples of {group}, got {arch.heads}"
        )
    if arch.is_uniform:
        new_config = dataclasses.replace(
            config,
            intermediate_size=arch.mlp_widths[0],
            num_heads=arch.heads[0],
            num_kv_heads=arch.heads[0] // group,
            layer_intermediate_sizes=None,
            layer_num_heads=None,
        )
    else:
        new_config = dataclasses.replace(
            config, layer_intermediate_sizes=list(arch.mlp_widths), layer_num_heads=list(arch.heads)
        )
    weights = dict(model.state_dict())
    for index, (width, heads) in enumerate(zip(arch.mlp_widths, arch.heads, strict=True)):
        prefix = f"layers.{index}."
        q_rows, kv_rows = heads * hd, heads // group * hd
        rows = {
            "mlp.gate_proj.weight": (width, None),
            "mlp.gate_proj.bias": (width, None),
            "mlp.up_proj.weight": (width, None),
            "mlp.up_proj.bias": (width, None),
            "mlp.down_proj.weight": (None, width),
            "self_attn.q_proj.weight": (q_rows, None),
            "self_attn.q_proj.bias": (q_rows, None),
            "self_attn.k_proj.weight": (kv_rows, None),
            "self_attn.k_proj.bias": (kv_rows, None),
            "self_attn.v_proj.weight": (kv_rows, None),
            "self_attn.v_proj.bias": (kv_rows, None),
            "self_attn.o_proj.weight": (None, q_rows),
        }
        for name, (out_rows, in_cols) in rows.items():
            if prefix + name in weights:
                tensor = weights[prefix + name]
                tensor = tensor[:out_rows] if out_rows is not None else tensor[:, :in_cols]
                weights[prefix + name] = tensor
    # copy: the export owns its weights (and safetensors wants no shared storage).
    copies = {k: v.detach().to(dtype or v.dtype, copy=True) for k, v in weights.items()}
    small = FlextronModel.from_state_dict(new_config, copies)
    small.tokenizer = model.tokenizer
    small.importance = _slice_importance(model.importance, arch)
    return small


def _slice_importance(importance: dict[str, torch.Tensor], arch: ArchConfig) -> dict[str, torch.Tensor]:
    sliced = {}
    for name, scores in importance.items():
        layer = int(name.split(".")[1])
        keep = arch.heads[layer] if ".heads" in name else arch.mlp_widths[layer]
        sliced[name] = scores[:keep].clone()
    return sliced
