"""Export one sub-network as a standalone model, written into a given directory.

Formats, each with a README.md model card:
- "hf": a Hugging Face directory for the source family's class (LlamaForCausalLM,
  MistralForCausalLM or Qwen2ForCausalLM): config.json with an explicit head_dim
  (hidden_size / num_attention_heads no longer gives it), safetensors (sharded, with an
  index, above max_shard_size), generation_config.json and the tokenizer.  Uniform
  configurations only: these classes have one MLP width and head count for all layers.
- "flextron": a Flextron directory whose config lists each layer's sizes; any configuration;
  `FlextronModel.from_pretrained` loads it.
- "gguf": one llama.cpp file (flextron.export_gguf); per-layer sizes allowed.
Exported weights are copies of the prefixes, so the files are small and the model computes
exactly the sub-network.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flextron.checkpoint import (
    save_safetensors_atomic,
    save_tokenizer_atomic,
    write_json_atomic,
    write_text_atomic,
)
from flextron.config import HF_CLASSES, ArchConfig
from flextron.model import FlextronModel

FORMATS = ("auto", "hf", "flextron", "gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class ModelCard:
    """What an export's README.md reports besides the configuration it can read off the model."""

    source: str = "unknown"  # the --model the sub-network was cut from
    selection: str | None = None  # how it was chosen, e.g. "uniform routing at budget 0.500"
    perplexity: float | None = None
    perplexity_data: str | None = None  # what the perplexity was measured on


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


def hf_state_dict(model: FlextronModel) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face names ("model." prefix; lm_head when untied)."""
    return {
        (name if name.startswith("lm_head") else f"model.{name}"): tensor
        for name, tensor in model.state_dict().items()
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_safetensors_shards(
    path: Path, weights: dict[str, torch.Tensor], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when
    the weights exceed max_shard_size (bytes, or "500MB", "5GB"); returns the file names."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        weights, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_safetensors_atomic(path / filename, {name: weights[name] for name in names}, {"format": "pt"})
    if not split.is_sharded:
        return list(split.filename_to_tensors)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    write_json_atomic(path / "model.safetensors.index.json", index)
    return [*split.filename_to_tensors, "model.safetensors.index.json"]


def generation_config(model: FlextronModel) -> dict:
    """generation_config.json: the special tokens transformers' generate() reads."""
    from transformers import GenerationConfig

    config = model.config
    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).to_diff_dict()


def export_hf(
    model: FlextronModel,
    arch: ArchConfig,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    card: ModelCard | None = None,
) -> None:
    """Write a uniform sub-network as a Hugging Face directory of its family's class."""
    if not arch.is_uniform:
        raise ValueError("a Hugging Face export needs a uniform configuration; export flextron or gguf")
    small = slice_model(model, arch, dtype)
    hf_config = small.config.to_hf()  # raises for what the family's config cannot express
    weights_dtype = small.embed_tokens.weight.dtype
    hf_config["torch_dtype"] = dtype_name(weights_dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if small.tokenizer is not None:
        save_tokenizer_atomic(small.tokenizer, path)
    files = write_safetensors_shards(path, hf_state_dict(small), max_shard_size)
    write_json_atomic(path / "generation_config.json", generation_config(small))
    write_model_card(path, model, arch, card, format="hf", dtype=weights_dtype, files=files)
    write_json_atomic(path / "config.json", hf_config)  # last: its presence marks a complete export


def export_flextron(
    model: FlextronModel,
    arch: ArchConfig,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    card: ModelCard | None = None,
) -> None:
    """Write any sub-network (per-layer sizes allowed) as a Flextron directory."""
    small = slice_model(model, arch, dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = small.embed_tokens.weight.dtype
    write_model_card(path, model, arch, card, format="flextron", dtype=dtype, files=["model.safetensors"])
    small.save_pretrained(path)


def auto_format(model: FlextronModel, arch: ArchConfig) -> str:
    """ "hf" when the family's Hugging Face class can hold the sub-network, else "flextron"."""
    if not arch.is_uniform:
        return "flextron"
    try:
        model.config.to_hf()
    except ValueError:
        return "flextron"
    return "hf"


def export(
    model: FlextronModel,
    arch: ArchConfig,
    path: str | os.PathLike,
    *,
    format: str = "auto",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    gguf_type: str | None = None,
    card: ModelCard | None = None,
) -> str:
    """Export into directory `path` in `format` "hf", "flextron", "gguf" or "auto" (hf when the
    family's class can hold it, else flextron); returns the format used.

    dtype: the weights' dtype for hf/flextron (default: the model's); gguf_type: f32, f16,
    bf16 or q8_0 for gguf (default f16)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "auto":
        format = auto_format(model, arch)
    if gguf_type is not None and format != "gguf":
        raise ValueError(f"--gguf-type applies to the gguf format, not {format}")
    if format == "gguf":
        if dtype is not None:
            raise ValueError("the gguf format takes --gguf-type (f32, f16, bf16, q8_0), not --dtype")
        from flextron.export_gguf import export_gguf

        export_gguf(model, arch, path, gguf_type or "f16", card)
    elif format == "hf":
        export_hf(model, arch, path, dtype, max_shard_size, card)
    else:
        export_flextron(model, arch, path, dtype, card)
    return format


# ---- model card


def _configuration_text(model: FlextronModel, arch: ArchConfig) -> str:
    group = model.config.group_size
    if arch.is_uniform:
        heads = arch.heads[0]
        return (
            f"every layer: MLP width {arch.mlp_widths[0]} of {model.config.intermediate_size}, "
            f"{heads} query heads / {heads // group} KV heads of {model.config.num_heads}"
        )
    rows = "\n".join(
        f"| {layer} | {width} | {heads} | {heads // group} |"
        for layer, (width, heads) in enumerate(zip(arch.mlp_widths, arch.heads, strict=True))
    )
    return (
        "per layer (full model: MLP width "
        f"{model.config.intermediate_size}, {model.config.num_heads} query heads):\n\n"
        "| layer | MLP width | query heads | KV heads |\n|---|---|---|---|\n" + rows
    )


def model_card(
    model: FlextronModel, arch: ArchConfig, card: ModelCard | None, format: str, dtype: str, files: list[str]
) -> str:
    """README.md text: source, selection, configuration, parameters, perplexity when measured."""
    card = card or ModelCard()
    parameters, full = model.num_parameters(arch), model.num_parameters()
    kind = {
        "hf": f"Hugging Face `{HF_CLASSES[model.config.model_type]}` directory",
        "flextron": "Flextron directory",
        "gguf": "llama.cpp GGUF file",
    }[format]
    library = {"hf": ["library_name: transformers"], "gguf": ["library_name: gguf"]}.get(format, [])
    lines = [
        "---",
        *library,
        "tags:",
        "- flextron",
        "---",
        "",
        "# A Flextron sub-network",
        "",
        f"Cut by [Flextron](https://arxiv.org/abs/2406.10260) from the elastic model `{card.source}` "
        f"and exported as a {kind} (weights {dtype}: {', '.join(files)}).",
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{card.source}` |",
        f"| selection | {card.selection or 'a given configuration'} |",
        f"| parameters | {parameters / 1e6:.1f}M ({100 * parameters / full:.1f}% of {full / 1e6:.1f}M) |",
        f"| layers | {model.config.num_layers} (hidden size {model.config.hidden_size}, "
        f"head dim {model.config.head_dim}) |",
    ]
    if card.perplexity is not None:
        lines.append(f"| perplexity | {card.perplexity:.3f} on {card.perplexity_data or 'held-out text'} |")
    lines += ["", "Configuration, " + _configuration_text(model, arch), ""]
    configuration = json.dumps(arch.to_dict())
    lines += ["As a Flextron configuration file (`--arch`):", "", "```json", configuration, "```", ""]
    return "\n".join(lines)


def write_model_card(
    path: Path,
    model: FlextronModel,
    arch: ArchConfig,
    card: ModelCard | None,
    *,
    format: str,
    dtype: torch.dtype | str,
    files: list[str],
) -> None:
    """README.md in `path`; dtype: the weights' dtype (or GGUF type) as stated in the card."""
    dtype = dtype if isinstance(dtype, str) else dtype_name(dtype)
    write_text_atomic(path / "README.md", model_card(model, arch, card, format, dtype, files))
