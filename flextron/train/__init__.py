"""Elastic continued training with distillation (docs/design.md#elastic-training): `flextron train`.

sampling: which sub-network each micro-batch trains; batches: packed blocks, validation split,
resumable batch order; trainer: the loop, its loss KD + alpha * CE from flextron.model.objectives;
train_state: atomic, resumable training-state checkpoints; distributed: torchrun DDP / FSDP2;
metrics: JSONL log and plot; demo_training: the cached training phase of `flextron demo`.
"""

from flextron.train.batches import TrainData, load_train_data
from flextron.train.distributed import DistContext, init_distributed
from flextron.train.sampling import SubnetSampler
from flextron.train.train_state import latest_checkpoint, save_checkpoint
from flextron.train.trainer import NonFiniteLossError, TrainConfig, train

__all__ = [
    "DistContext",
    "NonFiniteLossError",
    "SubnetSampler",
    "TrainConfig",
    "TrainData",
    "init_distributed",
    "latest_checkpoint",
    "load_train_data",
    "save_checkpoint",
    "train",
]
