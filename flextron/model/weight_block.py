"""A model's weights in one block of memory on 2 MiB pages, for inference on the CPU.

Why: at batch 1 a decoding step streams every weight from memory once, and the CPU's hardware
prefetchers do not follow a stream across a page boundary. On 4 KiB pages a new page starts
every two or three weight rows, each with a demand miss and a TLB walk; on 2 MiB pages the
prefetchers run ahead through a whole layer. On this project's 2-core machine a (704, 576) bf16
product at one row of x streamed 11.4 GB/s from 4 KiB pages and 18.9 GB/s from 2 MiB ones
(`docs/benchmarks.md`).

Linux backs an anonymous private mapping advised MADV_HUGEPAGE with 2 MiB pages where
transparent huge pages are in "madvise" or "always" mode; elsewhere the block is an ordinary
mapping and the numbers are the same. Tensors that share storage are packed once, so a tied
output head stays tied. The packed tensors are views of one storage: safetensors refuses to
save tensors that share memory, so the block is for models that are run, not trained or saved.
"""

from __future__ import annotations

import math
import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # bytes
POOL_BLOCK = 16 * HUGE_PAGE  # bytes: the blocks huge_page_empty hands out slices of
ALIGNMENT = 64  # bytes: each tensor starts on a cache line
Identity = tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]]  # data pointer, type, shape, strides


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def huge_page_block(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of nbytes, starting on a 2 MiB boundary of a private anonymous
    mapping advised MADV_HUGEPAGE (where the platform has it). The tensor keeps the mapping alive."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # (nbytes + HUGE_PAGE,)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


class _Pool:
    """Slices of shared huge-page blocks: many small tensors without a mapping each."""

    def __init__(self) -> None:
        self.block: torch.Tensor | None = None
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > POOL_BLOCK:
            return huge_page_block(nbytes)
        if self.block is None or self.used + nbytes > POOL_BLOCK:
            self.block, self.used = huge_page_block(POOL_BLOCK), 0
        start, self.used = self.used, self.used + _aligned(nbytes)
        return self.block[start : start + nbytes]


_POOL = _Pool()


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor on 2 MiB pages, a slice of a block shared with others (a block is
    freed when every tensor in it is)."""
    return _POOL.take(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def pack_weights_(model: nn.Module) -> nn.Module:
    """Move every CPU parameter and buffer of `model` into one huge-page block, in place
    (the same values, shapes and requires_grad; contiguous). Returns `model`."""
    slots = [  # (the dict that holds the tensor, its name, the tensor)
        (store, name, tensor)
        for module in model.modules()
        for store in (module._parameters, module._buffers)
        for name, tensor in store.items()
        if tensor is not None and tensor.device.type == "cpu" and tensor.numel() > 0
    ]
    offsets: dict[Identity, int] = {}  # one place per distinct tensor
    end = 0
    for _, _, tensor in slots:
        key = _identity(tensor)
        if key not in offsets:
            offsets[key] = end
            end += _aligned(tensor.nbytes)
    if end == 0:
        return model
    block = huge_page_block(end)
    packed: dict[Identity, torch.Tensor] = {}
    for store, name, tensor in slots:
        key = _identity(tensor)
        if key not in packed:
            start = offsets[key]
            view = block[start : start + tensor.nbytes].view(tensor.dtype)
            view = view.view(tensor.shape).copy_(tensor.detach())
            is_parameter = isinstance(tensor, nn.Parameter)
            packed[key] = nn.Parameter(view, tensor.requires_grad) if is_parameter else view
        store[name] = packed[key]
    return model


def _identity(tensor: torch.Tensor) -> Identity:
    """Tensors with the same data, type, shape and strides are one (a tied head and its embedding)."""
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()
