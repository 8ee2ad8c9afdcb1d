"""Export one sub-network as a standalone dense model.

Uniform configurations (every layer the same MLP width and head count) become a plain
Hugging Face `LlamaForCausalLM` directory: config.json (with an explicit head_dim, since
hidden_size / num_attention_heads no longer gives it), model.safetensors, tokenizer.
Per-layer (heterogeneous) configurations have no Llama config, so they become a Flextron
directory whose config lists each layer's sizes; `FlextronModel.from_pretrained` loads it.
Either way the exported weights are copies of the prefixes, so the file is small and the
model computes exactly the sub-network.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from flextron.checkpoint import save_safetensors_atomic, save_tokenizer_atomic, write_json_atomic
from flextron.config import ArchConfig
from flextron.model import FlextronModel


def slice_model(model: FlextronModel, arch: ArchConfig) -> FlextronModel:
    """A new, smaller FlextronModel holding copies of `arch`'s weight prefixes.

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
            config, intermediate_size=arch.mlp_widths[0], num_heads=arch.heads[0],
            num_kv_heads=arch.heads[0] // group, layer_intermediate_sizes=None, layer_num_heads=None,
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
            "mlp.gate_proj.weight": (width, None), "mlp.gate_proj.bias": (width, None),
            "mlp.up_proj.weight": (width, None), "mlp.up_proj.bias": (width, None),
            "mlp.down_proj.weight": (None, width),
            "self_attn.q_proj.weight": (q_rows, None), "self_attn.q_proj.bias": (q_rows, None),
            "self_attn.k_proj.weight": (kv_rows, None), "self_attn.k_proj.bias": (kv_rows, None),
            "self_attn.v_proj.weight": (kv_rows, None), "self_attn.v_proj.bias": (kv_rows, None),
            "self_attn.o_proj.weight": (None, q_rows),
        }
        for name, (out_rows, in_cols) in rows.items():
            if prefix + name in weights:
                tensor = weights[prefix + name]
                tensor = tensor[:out_rows] if out_rows is not None else tensor[:, :in_cols]
                weights[prefix + name] = tensor
    # clone: the export owns its weights (and safetensors wants no shared storage).
    small = FlextronModel.from_state_dict(new_config, {k: v.detach().clone() for k, v in weights.items()})
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


def hf_state_dict(model: FlextronModel) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face Llama names ("model." prefix; lm_head when untied)."""
    return {
        (name if name.startswith("lm_head") else f"model.{name}"): tensor
        for name, tensor in model.state_dict().items()
    }


def export_hf(model: FlextronModel, arch: ArchConfig, path: str | os.PathLike) -> None:
    """Write a uniform sub-network as a Hugging Face LlamaForCausalLM directory."""
    if not arch.is_uniform:
        raise ValueError("a Hugging Face Llama export needs a uniform configuration; use export_flextron")
    small = slice_model(model, arch)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if small.tokenizer is not None:
        save_tokenizer_atomic(small.tokenizer, path)
    save_safetensors_atomic(path / "model.safetensors", hf_state_dict(small), {"format": "pt"})
    write_json_atomic(path / "config.json", small.config.to_hf())


def export_flextron(model: FlextronModel, arch: ArchConfig, path: str | os.PathLike) -> None:
    """Write any sub-network (per-layer sizes allowed) as a Flextron directory."""
    slice_model(model, arch).save_pretrained(path)


def export(model: FlextronModel, arch: ArchConfig, path: str | os.PathLike, format: str = "auto") -> str:
    """Export in `format` "hf", "flextron" or "auto" (hf when uniform); returns the format used."""
    if format not in ("auto", "hf", "flextron"):
        raise ValueError(f"format must be auto, hf or flextron, got {format!r}")
    if format == "auto":
        format = "hf" if arch.is_uniform and model.config.qkv_bias == model.config.o_bias else "flextron"
    (export_hf if format == "hf" else export_flextron)(model, arch, path)
    return format
