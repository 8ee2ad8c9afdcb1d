"""What a training run needs before its first step: a run directory that may be used, and the
model and text to train on.  Checked and loaded before anything expensive, so that a bad
request ends in one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flextron.model.elastic_model import FlextronModel
from flextron.model.requests import check_context
from flextron.train.batches import TrainData, load_train_data
from flextron.train.distributed import DistContext
from flextron.train.rundir import check_run_dir, check_unlocked
from flextron.train.train_state import resumed_step
from flextron.train.trainer import check_resume_steps


def check_run_request(
    out: str | os.PathLike, resume: bool, overwrite: bool, steps: int, stop_after: int | None
) -> None:
    """Refuse a locked, occupied or unresumable run directory before anything is loaded."""
    check_unlocked(out)
    check_run_dir(out, resume, overwrite)
    if resume:
        step = resumed_step(Path(out) / "checkpoints")  # None: nothing saved yet, a fresh start
        if step is not None:
            check_resume_steps(step, steps, stop_after)


def training_data(
    model: FlextronModel,
    source: str,
    data: str,
    *,
    seq_len: int,
    val_fraction: float,
    val_blocks: int,
    context: DistContext,
) -> TrainData:
    """The TrainData of `seq_len` + 1 token blocks from `data` for `model` (loaded from `source`)."""
    check_context(model, "--seq-len", seq_len, 1)
    if model.tokenizer is None:
        raise ValueError(f"{source} has no tokenizer: training text cannot be tokenized")
    if not model.importance:
        print(
            f"warning: {source} is not converted; sub-networks are unranked prefixes "
            "(run flextron convert first)",
            file=sys.stderr,
        )
    train_data = load_train_data(model.tokenizer, data, seq_len + 1, val_fraction, val_blocks)
    if context.is_main:
        print(
            f"{train_data.train.shape[0]} training and {train_data.val.shape[0]} validation blocks of "
            f"{seq_len + 1} tokens; {context.world_size} process(es) on {context.device}",
            file=sys.stderr,
        )
    return train_data
