"""GGUF export: one sub-network as a llama.cpp file, written with the `gguf` package.

Architectures (general.architecture):
- "llama": uniform Llama and Mistral sub-networks (llama.cpp runs Mistral as Llama).
- "qwen2": uniform Qwen2 sub-networks that keep every head (bias on q/k/v; llama.cpp's qwen2
  sizes q and o as hidden x hidden).
- "deci": per-layer configurations, and Qwen2 ones with fewer heads.  llama.cpp's "deci"
  (NVIDIA's Nemotron NAS models) is the Llama block with per-layer feed_forward_length,
  head_count and head_count_kv arrays and optional biases: exactly what a per-layer Flextron
  configuration is.  transformers' gguf_file= loader cannot read it (its classes have one size
  for all layers).

RoPE layout: Hugging Face rotates the two halves of each head, (i, i + head_dim/2); llama.cpp's
"llama" and "deci" rotate adjacent pairs (2i, 2i + 1).  So q/k rows (and biases) are reordered
within each head to put every pair side by side; "qwen2" rotates halves like Hugging Face, and
keeps the order.  Scaled RoPE (linear, llama3) goes in as per-frequency divisors
(rope_freqs.weight); YaRN is refused.

Types (--gguf-type): f32, f16, bf16 store the 2-D weights in that type; q8_0 stores them in
blocks of 32 (int8 values with an fp16 scale) and falls back to f16 for a tensor whose rows are
not a multiple of 32.  Every block of a row gets that row's scale in the full model
(flextron.model.quantization), so a q8_0 file holds the same numbers as `--dtype int8` runs, at
any budget.  1-D tensors (norms, biases) stay f32, as llama.cpp expects.

Tokenizer: byte-level BPE (GPT-2 style, as in SmolLM, Llama 3, Qwen2) becomes llama.cpp's
"gpt2" model: the tokens in id order (padded to the vocabulary size), their types (special added
tokens are control tokens), the merges, the special token ids, whether BOS/EOS are added, and
the chat template.  Other tokenizers are refused.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch

from flextron.export.model_card import ModelCard, write_model_card
from flextron.model.config import ArchConfig, ModelConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.quantization import quantize_rows, row_scales
from flextron.model.rope import rope_frequencies
from flextron.model.slicing import slice_model

# --gguf-type -> (tensor type of 2-D weights, general.file_type)
GGUF_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]  # weights per q8_0 block (32)

# Hugging Face parameter suffix -> GGUF tensor name within block N
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
TOP_TENSORS = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def names_a_gguf_file(path: str | os.PathLike) -> bool:
    """Whether an output path is a GGUF file (X.gguf) rather than a directory."""
    return Path(path).suffix.lower() == ".gguf"


def gguf_architecture(config: ModelConfig, arch: ArchConfig) -> str:
    """The llama.cpp architecture that holds this sub-network (see the module docstring)."""
    if not arch.is_uniform:
        return "deci"
    if config.model_type != "qwen2":
        return "llama"
    # llama.cpp's qwen2 sizes q/o as hidden x hidden: only all heads fit it.
    return "qwen2" if arch.heads[0] * config.head_dim == config.hidden_size else "deci"


def pairs_adjacent(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves (i, i + hd/2) to adjacent pairs (2i, 2i + 1).

    rows: (heads * hd, ...) q/k weight or bias -> same shape.
    """
    head_dim = rows.shape[0] // heads
    halves = rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:])  # (heads, half, hd/2, ...)
    return halves.transpose(1, 2).reshape(rows.shape)


def gguf_tensors(model: FlextronModel, architecture: str) -> dict[str, torch.Tensor]:
    """The sliced model's weights under GGUF names, fp32, q/k in llama.cpp's RoPE layout."""
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().cpu()
        if not name.startswith("layers."):
            tensors[TOP_TENSORS[name]] = tensor
            continue
        _, layer, suffix = name.split(".", 2)
        index = int(layer)
        if architecture != "qwen2" and suffix.startswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.layer_heads(index)
            tensor = pairs_adjacent(tensor, heads if "q_proj" in suffix else heads // config.group_size)
        tensors[f"blk.{index}.{LAYER_TENSORS[suffix]}"] = tensor
    return tensors


def encode(
    tensor: torch.Tensor, gguf_type: str, row_scale: torch.Tensor | None = None
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data, tensor type) of one fp32 tensor for the file; q8_0 blocks take `row_scale` (R,),
    the rows' scales in the full model (default: this tensor's own)."""
    data = tensor.numpy()
    qtype = GGUF_TYPES[gguf_type][0]
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return data, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        if data.shape[-1] % Q8_0_BLOCK:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16
        return q8_0_blocks(tensor, row_scales(tensor) if row_scale is None else row_scale), qtype
    return gguf.quants.quantize(data, qtype), qtype


def q8_0_blocks(tensor: torch.Tensor, row_scale: torch.Tensor) -> np.ndarray:
    """(R, C) fp32, (R,) fp16-representable scales -> (R, C / 32 * 34) uint8 q8_0 blocks: each
    block of 32 is the row's scale (fp16) and the row's int8 values (quantize_rows)."""
    rows, cols = tensor.shape
    blocks_per_row = cols // Q8_0_BLOCK
    values = quantize_rows(tensor, row_scale).numpy().view(np.uint8).reshape(rows, blocks_per_row, Q8_0_BLOCK)
    scale_bytes = row_scale.half().numpy().view(np.uint8).reshape(rows, 1, 2)  # (R, 1, 2)
    blocks = np.concatenate([np.broadcast_to(scale_bytes, (rows, blocks_per_row, 2)), values], axis=-1)
    return blocks.reshape(rows, -1)


def _rope_freq_divisors(config: ModelConfig) -> torch.Tensor | None:
    """rope_freqs.weight (head_dim / 2,): llama.cpp divides each default frequency by it."""
    rope_type = config.rope_scaling.get("rope_type", "default")
    if rope_type == "default":
        return None
    if rope_type == "yarn":
        raise ValueError("GGUF export does not support YaRN RoPE scaling")
    default, _ = rope_frequencies(config.head_dim, config.rope_theta, {"rope_type": "default"})
    scaled, _ = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    return default / scaled


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, recognised by its structure."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own split (SmolLM2 as transformers reads it from GGUF)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # GPT-2's split after every digit on its own (SmolLM, SmolLM2)
    if kinds == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex", "")
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)"):
            return "llama-bpe" if "\\p{N}{1,3}" in pattern else "qwen2"
    warnings.warn(
        f"GGUF export: pre-tokenizer {kinds} is not one llama.cpp names; writing 'default', "
        "so llama.cpp may split some text differently",
        stacklevel=3,
    )
    return "default"


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Write a byte-level BPE tokenizer as llama.cpp's "gpt2" tokenizer model."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if (
        model["type"] != "BPE"
        or model.get("byte_fallback")
        or (backend.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise ValueError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2), "
            f"not this {model['type']} tokenizer"
        )
    if not model["merges"]:
        raise ValueError("GGUF export: the tokenizer has no BPE merges, which llama.cpp requires")
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in tokenizer.get_vocab().items():
        if index >= vocab_size:
            raise ValueError(f"GGUF export: token {text!r} has id {index} >= vocabulary size {vocab_size}")
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in backend.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    # tokenizers writes a merge as "a b" (older) or ["a", "b"] (newer)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # Whether the tokenizer adds BOS/EOS, as it does it (a template, a flag or nothing).
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(
    model: FlextronModel, arch: ArchConfig, path: str | os.PathLike, gguf_type: str = "f16", name: str = ""
) -> None:
    """Write sub-network `arch` of `model` to the GGUF file `path`."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if model.tokenizer is None:
        raise ValueError("GGUF export needs the model's tokenizer: llama.cpp reads it from the file")
    config = model.config
    architecture = gguf_architecture(config, arch)
    divisors = _rope_freq_divisors(config)
    if divisors is not None and architecture == "qwen2":
        architecture = "deci"  # llama.cpp's qwen2 reads no RoPE frequency factors
    # q8_0 scales come from the full model's rows, so that every budget holds the same numbers.
    full_scales = (
        {name: row_scales(t) for name, t in gguf_tensors(model, architecture).items() if t.dim() == 2}
        if gguf_type == "q8_0"
        else {}
    )
    small = slice_model(model, arch)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name or "flextron sub-network")
    writer.add_file_type(GGUF_TYPES[gguf_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    # Per-layer arrays for "deci"; one number when every layer is the same.
    kv_heads = [heads // config.group_size for heads in arch.heads]
    per_layer = architecture == "deci"
    writer.add_feed_forward_length(list(arch.mlp_widths) if per_layer else arch.mlp_widths[0])
    writer.add_head_count(list(arch.heads) if per_layer else arch.heads[0])
    writer.add_head_count_kv(kv_heads if per_layer else kv_heads[0])
    # head_dim is not hidden_size / heads once heads are dropped: state it.
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, model.tokenizer, config.vocab_size)
    tensors = gguf_tensors(small, architecture)
    if divisors is not None:
        tensors["rope_freqs.weight"] = divisors
    for tensor_name, tensor in tensors.items():
        scale = full_scales.get(tensor_name)
        data, qtype = encode(tensor, gguf_type, None if scale is None else scale[: tensor.shape[0]])
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def export_gguf(
    model: FlextronModel,
    arch: ArchConfig,
    path: str | os.PathLike,
    gguf_type: str = "f16",
    card: ModelCard | None = None,
) -> Path:
    """Write directory `path`: model-<type>.gguf and a README.md model card; returns the file.
    A `path` ending in .gguf is written as that one file (the card's source is in general.name)."""
    path = Path(path)
    if names_a_gguf_file(path):
        write_gguf(model, arch, path, gguf_type, name=card.source if card else "")
        return path
    path.mkdir(parents=True, exist_ok=True)
    target = path / gguf_file_name(gguf_type)
    write_gguf(model, arch, target, gguf_type, name=card.source if card else "")
    write_model_card(path, model, arch, card=card, format="gguf", dtype=gguf_type, files=[target.name])
    return target
