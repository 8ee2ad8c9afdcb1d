"""The README.md model card every export writes: source, selection, configuration,
parameters and, when measured, perplexity (front matter for the Hugging Face hub).

A module of its own because every export format writes it (flextron.export.hf for hf and
flextron directories, flextron.export.gguf for GGUF files), and those two must not import
each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from flextron.data.blocks import load_blocks
from flextron.eval.perplexity import perplexity
from flextron.io.atomic import write_text_atomic
from flextron.model.config import HF_CLASSES, ArchConfig
from flextron.model.elastic_model import FlextronModel


@dataclass
class ModelCard:
    """What an export's README.md reports besides the configuration it can read off the model."""

    source: str = "unknown"  # the --model the sub-network was cut from
    selection: str | None = None  # how it was chosen, e.g. "uniform routing at budget 0.500"
    perplexity: float | None = None
    perplexity_data: str | None = None  # what the perplexity was measured on


def measure_perplexity(card: ModelCard, model: FlextronModel, arch: ArchConfig, blocks: int) -> None:
    """Fill the card's perplexity: `blocks` held-out blocks of up to 512 tokens of the built-in text."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: perplexity for the model card needs one")
    length = min(512, model.config.max_position_embeddings)
    held_out = load_blocks(model.tokenizer, "builtin", length, blocks, split="eval")
    card.perplexity = perplexity(model, held_out, arch)[0]
    card.perplexity_data = f"{held_out.shape[0]} x {held_out.shape[1]} tokens of the built-in held-out text"


def dtype_name(dtype: torch.dtype) -> str:
    """The name Hugging Face configs and model cards give `dtype` ("float32", "bfloat16", ...)."""
    return str(dtype).removeprefix("torch.")


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
    if format == "hf" and not arch.is_uniform:  # flextron.model.slicing.pad_to_widest_layer
        widest = arch.widest_layer(model.config)
        lines.append(
            f"| stored | {model.num_parameters(widest) / 1e6:.1f}M parameters: every layer zero-padded to "
            f"the widest (MLP {widest.mlp_widths[0]}, {widest.heads[0]} heads); the zeros change no output |"
        )
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
    *,
    card: ModelCard | None,
    format: str,
    dtype: torch.dtype | str,
    files: list[str],
) -> None:
    """README.md in `path`; dtype: the weights' dtype (or GGUF type) as stated in the card."""
    dtype = dtype if isinstance(dtype, str) else dtype_name(dtype)
    write_text_atomic(path / "README.md", model_card(model, arch, card, format, dtype, files))
