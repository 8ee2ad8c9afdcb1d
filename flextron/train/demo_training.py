"""The elastic-training phase of `flextron demo`: a short run, trained once and cached.

The first demo run trains the converted model for a few steps (distillation from its
frozen copy, the default sampling) and keeps the checkpoint under
~/.cache/flextron/demo-elastic-<key>/ (or $FLEXTRON_CACHE); later runs load it in seconds.
The key hashes the conversion (its neuron/head orders and chosen budget configurations) and
the training settings, so a different conversion or setting trains afresh.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch

from flextron.model.checkpoint import load_pretrained
from flextron.model.elastic_model import FlextronModel
from flextron.ops.info import bf16_is_fast
from flextron.train.batches import load_train_data
from flextron.train.train_state import latest_checkpoint
from flextron.train.trainer import TrainConfig, train

SEQ_LEN = 128


def cache_root() -> Path:
    return Path(os.environ.get("FLEXTRON_CACHE", Path.home() / ".cache" / "flextron"))


def demo_config(steps: int) -> TrainConfig:
    """Small batches and a frozen embedding (recovery per CPU second); lr 5e-5 keeps the full width
    in place and the answers of budget 0.75 intact (at 1e-4 its answer to the demo question drifts).
    bf16 autocast where the CPU has AVX-512 BF16: 1.7x the steps per second, the same loss per
    step (docs/quality.md)."""
    return TrainConfig(
        bf16=bf16_is_fast(),
        steps=steps,
        batch_size=2,
        lr=5e-5,
        warmup_steps=max(1, steps // 20),
        train_embeddings=False,
        eval_every=0,
        save_every=0,
        keep_checkpoints=1,
        eval_budgets=(1.0, 0.5),
        eval_batch_size=2,
    )


def demo_seq_len(model: FlextronModel) -> int:
    return min(SEQ_LEN, model.config.max_position_embeddings - 1)


def cache_key(model: FlextronModel, config: TrainConfig, data: str = "builtin") -> str:
    settings = {**config.to_dict(), "seq_len": demo_seq_len(model), "data": data}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(model.importance):
        if name.endswith(".order"):
            digest.update(model.importance[name].numpy().tobytes())
    if model.budget_configs is not None:  # training samples the budgets' chosen configurations
        digest.update(json.dumps([e["arch"] for e in model.budget_configs.entries]).encode())
    return digest.hexdigest()[:16]


def elastic_phase(
    model: FlextronModel, steps: int, data: str = "builtin", progress: bool = True
) -> tuple[FlextronModel, Path, bool]:
    """Train `model` (converted, with a tokenizer) in place for `steps` on `data` (a flextron.data.blocks
    source), or load the cached result.

    Returns (model, the checkpoint directory, whether it came from the cache).
    """
    config = demo_config(steps)
    run = cache_root() / f"demo-elastic-{cache_key(model, config, data)}"
    cached = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    if cached is None:
        blocks = load_train_data(model.tokenizer, data, demo_seq_len(model) + 1, max_val_blocks=2)
        teacher = copy.deepcopy(model)
        train(model, teacher, blocks, config, run, progress=progress)
        model.eval()
        return model, latest_checkpoint(run / "checkpoints"), False
    with torch.no_grad():
        model.load_state_dict(load_pretrained(cached).state_dict())
    return model.eval(), cached, True
