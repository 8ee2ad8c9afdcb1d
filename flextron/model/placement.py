"""Where a model's tensors live and in what precision: the dtype and device names accepted by
the command line, `from_pretrained` and the exporters."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")


def parse_dtype(name: str) -> torch.dtype:
    """ "float32" | "bfloat16" | "float16" -> the torch dtype; ValueError otherwise."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_device(device: str) -> str:
    """ "cpu" or "cuda" (ValueError when CUDA is asked for and absent)."""
    if device.split(":")[0] not in DEVICES:
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested, but torch sees no CUDA device")
    return device
