"""Data-parallel training with torchrun: DDP (gloo on CPU, NCCL on GPU), or FSDP2 sharding.

    # one process (no torchrun): plain training
    flextron train --model runs/converted --out runs/train

    # 2 processes on one machine, CPU (gloo); the global --batch-size is split across ranks
    torchrun --standalone --nproc-per-node 2 -m flextron train --model runs/converted --out runs/train

    # 8 GPUs (NCCL), one process per GPU
    torchrun --standalone --nproc-per-node 8 -m flextron train --model runs/converted --out runs/train

    # 2 nodes x 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m flextron train --model runs/converted --out runs/train

    # a model that does not fit one GPU: shard parameters, gradients and optimizer state (FSDP2)
    torchrun --standalone --nproc-per-node 8 -m flextron train --fsdp --model big --out runs/big

Every rank draws the same sub-network for each micro-batch (the draw depends only on the
shared seed and the micro-batch index, flextron.train.sampling) and the same global batch
order, and takes its own slice of each global batch; DDP averages the gradients, so a
run on N ranks computes what one process computes on the whole global batch.  Rank 0
alone logs, plots and writes checkpoints.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every decoder layer and the root;
checkpoints gather full (unsharded) state dicts on rank 0, so a checkpoint written by an
FSDP run resumes with or without FSDP and loads with flextron.model.checkpoint.load_pretrained.
The frozen teacher is not sharded: with FSDP it must still fit each device (or use a
smaller teacher copy in bf16).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process stands: rank, world size, device, and how the model is wrapped."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: DDP, FSDP2-sharded (in place), or the model itself."""
        if not self.distributed and not self.fsdp:
            return model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def no_sync(self, model: nn.Module, sync: bool) -> AbstractContextManager:
        """Skip DDP's gradient all-reduce on accumulation micro-batches (sync=False)."""
        if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (the tensor itself in one process)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ---- full (unsharded) state for checkpoints

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model state_dict, optimizer state_dict), gathered to full tensors under FSDP."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (
                get_model_state_dict(model, options=options),
                get_optimizer_state_dict(model, optimizer, options=options),
            )
        return self.unwrap(model).state_dict(), optimizer.state_dict()

    def load_full_state(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict,
        optimizer_state: dict[str, Any],
    ) -> None:
        """Load full state dicts (as written by full_state) into the wrapped model and optimizer."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, model_state, options=options)
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
            return
        with torch.no_grad():
            self.unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)


def init_distributed(device: str | None = None, fsdp: bool = False) -> DistContext:
    """The DistContext of this process: from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK), else a single process.  device: "cpu", "cuda" or None (cuda if available)."""
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device_type!r}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if fsdp:
            raise ValueError("--fsdp needs torchrun (RANK/WORLD_SIZE unset); see flextron.train.distributed")
        return DistContext(device=torch.device(device_type))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistContext(rank, world_size, torch_device, fsdp)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
