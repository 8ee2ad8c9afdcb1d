"""Training batches: packed blocks, a validation split, and a resumable batch order.

Blocks come from flextron.data.blocks (text files, directories, JSONL, saved `datasets`, or the
built-in corpus).  Validation: for the built-in corpus its held-out topics; for any other
source every k-th block (k = round(1 / val_fraction)), so the split is deterministic.

`BatchOrder` walks the training blocks in a fresh random permutation each epoch (seeded by
seed and epoch), so its whole state is (epoch, position): a checkpoint stores those two
numbers and a resumed run continues with the very next batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flextron.data.blocks import iter_texts, load_blocks, pack, tokenize


@dataclass
class TrainData:
    """train: (N, S) token blocks; val: (M, S) token blocks (M may be 0)."""

    train: torch.Tensor
    val: torch.Tensor


def load_train_data(
    tokenizer,
    source: str | os.PathLike | None = "builtin",
    block_size: int = 256,
    val_fraction: float = 0.1,
    max_val_blocks: int | None = 16,
) -> TrainData:
    """Packed training and validation blocks from a source (see the module docstring)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if source is None or str(source) == "builtin":
        train = load_blocks(tokenizer, "builtin", block_size, split="train")
        val = load_blocks(tokenizer, "builtin", block_size, max_val_blocks, split="eval")
        return TrainData(train, val if val_fraction > 0 else val[:0])
    blocks = pack(tokenize(tokenizer, iter_texts(source)), block_size)
    return split_blocks(blocks, val_fraction, max_val_blocks)


def split_blocks(blocks: torch.Tensor, val_fraction: float, max_val_blocks: int | None = None) -> TrainData:
    """Every k-th block (k = round(1 / val_fraction)) to validation, the rest to training."""
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"no training blocks: got a tensor of shape {tuple(blocks.shape)}")
    is_val = torch.zeros(blocks.shape[0], dtype=torch.bool)
    if val_fraction > 0:
        is_val[:: max(2, round(1 / val_fraction))] = True
    if is_val.all() or blocks.shape[0] - int(is_val.sum()) == 0:
        raise ValueError(f"only {blocks.shape[0]} blocks: none left for training after the validation split")
    val = blocks[is_val]
    return TrainData(blocks[~is_val], val if max_val_blocks is None else val[:max_val_blocks])


class BatchOrder:
    """Global batches of block indices: a new seeded permutation every epoch, no block dropped
    within an epoch except the tail that does not fill a batch."""

    def __init__(self, num_blocks: int, batch_size: int, seed: int = 0) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if num_blocks < batch_size:
            raise ValueError(
                f"batch size {batch_size} is larger than the data: only {num_blocks} training blocks "
                "(add text, shorten --seq-len or lower --batch-size)"
            )
        self.num_blocks, self.batch_size, self.seed = num_blocks, batch_size, seed
        self.epoch, self.position = 0, 0

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(
            self.num_blocks, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )

    def next(self) -> torch.Tensor:
        """(batch_size,) int64 block indices of the next global batch."""
        if self.position + self.batch_size > self.num_blocks:
            self.epoch, self.position = self.epoch + 1, 0
        indices = self._permutation()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
