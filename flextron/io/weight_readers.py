"""Read weights one tensor at a time, straight into the dtype and device they will run in.

Loading peak memory stays near the weights in the chosen dtype: each tensor is read with
plain file reads (no memory map whose pages would stay resident) in chunks of at most
CHUNK_BYTES (raw, and float32 once dequantized), converted chunk by chunk into its final
tensor, and moved to the device before the next one is read.  Safetensors files are read
from their documented layout (an 8-byte header length, a JSON header, then the raw
little-endian data); GGUF files through the `gguf` package's reader and dequantizer.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

CHUNK_BYTES = 4 << 20
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _target(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    # Only floating-point tensors change dtype (integer buffers keep theirs).
    return dtype if dtype is not None and stored.is_floating_point else stored


def safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header {name: {"dtype", "shape", "data_offsets"}}, offset of the data)."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        try:
            header = json.loads(file.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: corrupt safetensors header ({error})") from error
    header.pop("__metadata__", None)
    return header, 8 + size


def read_safetensors(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, floating ones in `dtype` (None: as stored), on `device`."""
    return dict(iter_safetensors(path, dtype, device))


def iter_safetensors(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """read_safetensors one (name, tensor) at a time, in file order."""
    header, base = safetensors_header(path)
    scratch = torch.empty(CHUNK_BYTES, dtype=torch.uint8)  # one read buffer for the whole file
    with open(path, "rb") as file:
        for name, info in header.items():
            stored = _SAFETENSORS_DTYPES.get(info["dtype"])
            if stored is None:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=_target(stored, dtype))
            flat = tensor.view(-1)  # (numel,)
            if end - start != flat.numel() * stored.itemsize:
                raise ValueError(f"{path}: tensor {name} has {end - start} bytes for shape {info['shape']}")
            file.seek(base + start)
            if stored == tensor.dtype:
                if file.readinto(flat.view(torch.uint8).numpy()) != end - start:
                    raise ValueError(f"{path}: truncated file (tensor {name})")
            else:
                step = CHUNK_BYTES // stored.itemsize
                buffer = scratch.view(stored)
                for first in range(0, flat.numel(), step):
                    chunk = buffer[: min(step, flat.numel() - first)]
                    if file.readinto(chunk.view(torch.uint8).numpy()) != chunk.numel() * stored.itemsize:
                        raise ValueError(f"{path}: truncated file (tensor {name})")
                    flat[first : first + chunk.numel()].copy_(chunk)
            yield name, tensor if device is None else tensor.to(device)


# GGUF tensor names (llama.cpp) -> Hugging Face Llama names without the "model." prefix.
_GGUF_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_name(name: str) -> str:
    """ "blk.3.attn_q.weight" -> "layers.3.self_attn.q_proj.weight"; ValueError when unknown."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_NAMES:
        return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"GGUF tensor {name!r} has no counterpart in a Llama-family model")


def _unpermute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of q/k (rows (heads * hd,), any trailing dims)."""
    rows = weight.shape[0]
    halves = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])  # (heads, hd / 2, 2, ...)
    return halves.transpose(1, 2).reshape(weight.shape)


def read_gguf(
    path: str | os.PathLike,
    num_heads: int,
    num_kv_heads: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of a Llama-family GGUF, dequantized to `dtype`, under FlextronModel's names."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    # The reader holds every metadata field (the whole vocabulary) as numpy objects: keep only
    # the tensor layout, and let it go before the weights are allocated.
    reader = GGUFReader(path)
    layout = [
        (t.name, t.tensor_type, tuple(int(n) for n in reversed(t.shape.tolist())), t.n_bytes, t.data_offset)
        for t in reader.tensors
    ]  # GGUF lists dims innermost first
    del reader
    gc.collect()
    weights = {}
    with open(path, "rb") as file:
        for gguf_tensor, qtype, shape, n_bytes, offset in layout:
            name = gguf_name(gguf_tensor)
            tensor = torch.empty(shape, dtype=dtype)
            matrix = tensor.view(shape[0] if len(shape) > 1 else 1, -1)  # (rows, columns)
            rows, row_bytes = matrix.shape[0], n_bytes // matrix.shape[0]
            # Chunks bound both the raw bytes read and their float32 dequantization.
            step = max(CHUNK_BYTES // max(row_bytes, 4 * matrix.shape[1]), 1)
            for first in range(0, rows, step):
                count = min(step, rows - first)
                file.seek(offset + first * row_bytes)
                raw = np.fromfile(file, dtype=np.uint8, count=count * row_bytes).reshape(count, row_bytes)
                values = dequantize(raw, qtype).reshape(count, -1)  # (count, columns) float32
                matrix[first : first + count].copy_(torch.from_numpy(np.ascontiguousarray(values)))
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = _unpermute_rope(tensor, num_heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = _unpermute_rope(tensor, num_kv_heads)
            weights[name] = tensor if device is None else tensor.to(device)
    return weights


def read_weights(
    files: list[Path],
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    rename: Callable[[str], str | None] = lambda name: name,
) -> dict[str, torch.Tensor]:
    """The tensors of several safetensors shards, renamed (None drops a tensor)."""
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in read_safetensors(file, dtype, device).items():
            new = rename(name)
            if new is not None:
                weights[new] = tensor
    return weights
