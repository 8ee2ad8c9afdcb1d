"""Cutting a sub-network out of an elastic model: a standalone FlextronModel holding copies
of the configuration's weight prefixes (what every export writes), or, for classes with one
size for all layers, those prefixes zero-padded to the configuration's widest layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch

from flextron.model.config import ArchConfig, ModelConfig
from flextron.model.elastic_model import FlextronModel


def slice_model(model: FlextronModel, arch: ArchConfig, dtype: torch.dtype | None = None) -> FlextronModel:
    """A new, smaller FlextronModel holding copies of `arch`'s weight prefixes, in `dtype`
    (default: the model's).

    Head counts must be whole KV groups (multiples of the group size).
    """
    config = model.config
    _check_exportable(config, arch)
    group = config.group_size
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
    for name, (out_rows, in_cols) in _kept_sizes(config, arch, weights):
        tensor = weights[name]
        weights[name] = tensor[:out_rows] if out_rows is not None else tensor[:, :in_cols]
    # copy: the export owns its weights (and safetensors wants no shared storage).
    copies = {k: v.detach().to(dtype or v.dtype, copy=True) for k, v in weights.items()}
    small = FlextronModel.from_state_dict(new_config, copies)
    small.tokenizer = model.tokenizer
    small.importance = _slice_importance(model.importance, arch)
    return small


def pad_to_widest_layer(
    model: FlextronModel, arch: ArchConfig, dtype: torch.dtype | None = None
) -> FlextronModel:
    """A uniform FlextronModel at `arch`'s widest layer (its largest MLP width and head count)
    whose weights beyond each layer's own sizes are zeros.

    It computes exactly `arch`'s sub-network: a zero gate/up row gives silu(0) * 0 = 0 and a
    zero down_proj or o_proj column drops what a padded neuron or head computes.  That is the
    shape of classes with one size for all layers (Hugging Face's Llama), at the cost of storing
    the zeros.
    """
    _check_exportable(model.config, arch)
    padded = slice_model(model, arch.widest_layer(model.config), dtype)
    weights = padded.state_dict()  # shares storage with the parameters
    with torch.no_grad():
        for name, (out_rows, in_cols) in _kept_sizes(padded.config, arch, weights):
            if out_rows is not None:
                weights[name][out_rows:] = 0
            else:
                weights[name][:, in_cols:] = 0
    return padded


def _check_exportable(config: ModelConfig, arch: ArchConfig) -> None:
    arch.validate(config)
    if any(h % config.group_size for h in arch.heads):
        raise ValueError(
            f"export needs whole KV groups: head counts must be multiples of {config.group_size}, "
            f"got {arch.heads}"
        )


def _kept_sizes(
    config: ModelConfig, arch: ArchConfig, names: Collection[str]
) -> list[tuple[str, tuple[int | None, int | None]]]:
    """(weight name, (rows kept, None) or (None, columns kept)) of each weight among `names`
    that `arch` narrows."""
    group, hd = config.group_size, config.head_dim
    kept = []
    for index, (width, heads) in enumerate(zip(arch.mlp_widths, arch.heads, strict=True)):
        q_rows, kv_rows = heads * hd, heads // group * hd
        sizes = {
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
        kept += [
            (f"layers.{index}.{name}", size)
            for name, size in sizes.items()
            if f"layers.{index}.{name}" in names
        ]
    return kept


def _slice_importance(importance: dict[str, torch.Tensor], arch: ArchConfig) -> dict[str, torch.Tensor]:
    sliced = {}
    for name, scores in importance.items():
        layer = int(name.split(".")[1])
        keep = arch.heads[layer] if ".heads" in name else arch.mlp_widths[layer]
        sliced[name] = scores[:keep].clone()
    return sliced


def hf_state_dict(model: FlextronModel) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face names ("model." prefix; lm_head when untied)."""
    return {
        (name if name.startswith("lm_head") else f"model.{name}"): tensor
        for name, tensor in model.state_dict().items()
    }
