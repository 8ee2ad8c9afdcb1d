"""Export one sub-network as a standalone model, written into a given directory (or one file).

Formats, each with a README.md model card:
- "hf": a Hugging Face directory for the source family's class (LlamaForCausalLM,
  MistralForCausalLM or Qwen2ForCausalLM): config.json with an explicit head_dim
  (hidden_size / num_attention_heads no longer gives it), safetensors (sharded, with an
  index, above max_shard_size), generation_config.json and the tokenizer.  These classes have
  one MLP width and head count for all layers: a per-layer configuration needs pad_layers,
  which zero-pads every layer to the widest (the same function, more stored weights).
- "flextron": a Flextron directory whose config lists each layer's sizes; any configuration;
  `flextron.model.checkpoint.load_pretrained` loads it.
- "gguf": one llama.cpp file (flextron.export.gguf); per-layer sizes allowed.  An output path
  ending in .gguf is that file itself (what llama.cpp opens); any other path is a directory.
Exported weights are copies of the prefixes, so the files are small and the model computes
exactly the sub-network.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flextron.export.gguf import export_gguf, names_a_gguf_file
from flextron.export.model_card import ModelCard, dtype_name, write_model_card
from flextron.io.atomic import (
    save_safetensors_atomic,
    save_tokenizer_atomic,
    write_json_atomic,
)
from flextron.model.checkpoint import save_pretrained
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.slicing import hf_state_dict, pad_to_widest_layer, slice_model

FORMATS = ("auto", "hf", "flextron", "gguf")
DEFAULT_MAX_SHARD_SIZE = "5GB"


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
    *,
    pad_layers: bool = False,
) -> None:
    """Write a sub-network as a Hugging Face directory of its family's class: a uniform one as
    it is, a per-layer one (with pad_layers) zero-padded to its widest layer."""
    if not arch.is_uniform and not pad_layers:
        raise ValueError(
            "a Hugging Face export needs a uniform configuration: pass --pad-layers (zero-padded to "
            "the widest layer, same outputs), export flextron or gguf, or keep uniform budget "
            "configurations (`flextron choose-budgets --layer-levels 0`)"
        )
    small = slice_model(model, arch, dtype) if arch.is_uniform else pad_to_widest_layer(model, arch, dtype)
    hf_config = small.config.to_hf()  # raises for what the family's config cannot express
    weights_dtype = small.embed_tokens.weight.dtype
    hf_config["torch_dtype"] = dtype_name(weights_dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if small.tokenizer is not None:
        save_tokenizer_atomic(small.tokenizer, path)
    files = write_safetensors_shards(path, hf_state_dict(small), max_shard_size)
    write_json_atomic(path / "generation_config.json", generation_config(small))
    write_model_card(path, model, arch, card=card, format="hf", dtype=weights_dtype, files=files)
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
    write_model_card(
        path, model, arch, card=card, format="flextron", dtype=dtype, files=["model.safetensors"]
    )
    save_pretrained(small, path)


def check_export_request(path: str | os.PathLike, format: str, eval_blocks: int = 0) -> None:
    """ValueError when `path` names a GGUF file (X.gguf) but `format` is a directory format, or
    when perplexity is asked for a model card that a single file has no place for."""
    if names_a_gguf_file(path) and format not in ("auto", "gguf"):
        raise ValueError(
            f"--out {path} names a GGUF file, but --format is {format}: use --format gguf, "
            "or an output name without .gguf for a directory"
        )
    if names_a_gguf_file(path) and eval_blocks > 0:
        raise ValueError(
            f"--eval-blocks measures perplexity for the model card, which the single file {path} "
            "has no place for: export to a directory (an --out without .gguf)"
        )


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
    pad_layers: bool = False,
) -> str:
    """Export into directory `path` in `format` "hf", "flextron", "gguf" or "auto" (hf when the
    family's class can hold it, else flextron); returns the format used.  A `path` ending in
    .gguf is the GGUF file itself (format gguf, no directory).

    dtype: the weights' dtype for hf/flextron (default: the model's); gguf_type: f32, f16,
    bf16 or q8_0 for gguf (default f16); pad_layers: hf may hold a per-layer configuration,
    zero-padded to its widest layer."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_export_request(path, format)
    if names_a_gguf_file(path):
        format = "gguf"
    if format == "auto":
        format = auto_format(model, arch)
    if gguf_type is not None and format != "gguf":
        raise ValueError(f"--gguf-type applies to the gguf format, not {format}")
    if pad_layers and format != "hf":
        raise ValueError(f"--pad-layers applies to the hf format, not {format}")
    if format == "gguf":
        if dtype is not None:
            raise ValueError("the gguf format takes --gguf-type (f32, f16, bf16, q8_0), not --dtype")
        export_gguf(model, arch, path, gguf_type or "f16", card)
    elif format == "hf":
        export_hf(model, arch, path, dtype, max_shard_size, card, pad_layers=pad_layers)
    else:
        export_flextron(model, arch, path, dtype, card)
    return format
