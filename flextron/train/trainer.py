"""The elastic-training loop (DESIGN §1 step 3).

Each micro-batch trains one sampled sub-network (flextron.train.sampling) of the student,
sliced (never masked), against the frozen teacher's logits (computed once per batch,
no grad) with loss = KD + alpha * CE (flextron.objectives.distillation_loss).  AdamW (no
weight decay on norms and biases), linear warm-up then cosine decay to min_lr_ratio * lr, gradient
clipping, gradient accumulation, optional bf16 autocast.  Rank 0 logs metrics.jsonl,
plots metrics.png, validates (perplexity at eval_budgets) every eval_every steps, and
checkpoints every save_every steps and at the end (flextron.train.train_state).

A step is one optimizer update: accumulation_steps micro-batches of batch_size blocks
(the global batch, split across data-parallel ranks).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flextron.checkpoint import load_pretrained
from flextron.config import check_budget
from flextron.evaluate import perplexity
from flextron.model import FlextronModel
from flextron.objectives import distillation_loss
from flextron.train.batches import BatchOrder, TrainData
from flextron.train.distributed import DistContext
from flextron.train.metrics import MetricsLog, plot_metrics, read_metrics
from flextron.train.rundir import check_run_dir, clear_run, run_lock
from flextron.train.sampling import RULES, SubnetSampler
from flextron.train.train_state import (
    RESUME_FIELDS,
    latest_checkpoint,
    load_training_state,
    save_checkpoint,
    set_rng_states,
)

# Settings a resumed run must share with the run it continues, or it would not continue it.
RESUME_INVARIANTS = ("batch_size", "accumulation_steps", "seed", "rule", "p_full", "budgets", "min_fraction")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; nothing was saved from that step."""


@dataclass
class TrainConfig:
    """Settings of one elastic-training run."""

    # ---- length and batches
    steps: int = 100
    batch_size: int = 4  # blocks per micro-batch, global (split across ranks)
    accumulation_steps: int = 1
    # ---- optimizer and schedule
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad_norm: float = 1.0
    train_embeddings: bool = True  # False freezes the (large) embedding / tied LM head
    # ---- loss
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the LM (cross-entropy) loss next to KD
    # ---- sub-network sampling
    rule: str = "budget"  # budget | random | mixed (flextron.train.sampling)
    p_full: float = 1 / 3
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)
    min_fraction: float = 0.25
    # ---- numerics
    bf16: bool = False  # autocast the student and teacher forward passes to bfloat16
    # ---- feedback and checkpoints
    eval_every: int = 50  # 0: only at the start and the end
    eval_budgets: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    eval_batch_size: int = 4
    save_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown budget rule {self.rule!r}; choose one of {RULES}")
        if not 0.0 <= self.p_full <= 1.0:
            raise ValueError(f"TrainConfig.p_full must be in [0, 1], got {self.p_full}")
        self.betas = tuple(self.betas)
        self.budgets = tuple(check_budget(b) for b in self.budgets)
        self.eval_budgets = tuple(check_budget(b) for b in self.eval_budgets)
        for name in ("steps", "batch_size", "accumulation_steps", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"TrainConfig: need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}"
            )
        if not self.clip_grad_norm > 0:
            raise ValueError(f"TrainConfig.clip_grad_norm must be positive, got {self.clip_grad_norm}")
        if self.alpha < 0 or self.temperature <= 0:
            raise ValueError(
                f"TrainConfig: need alpha >= 0 and temperature > 0, got {self.alpha}, {self.temperature}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based): warm-up, then cosine."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one elementwise kernel per tensor (a loop of separate ops made AdamW a large
    # share of a CPU step), and the same arithmetic per element on every device count.
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=True)


@torch.no_grad()
def validate(
    model: torch.nn.Module, blocks: torch.Tensor, config: TrainConfig, flextron: FlextronModel
) -> dict[str, float]:
    """Perplexity {"1": ..., "0.5": ...} of the uniform configuration at each eval budget."""
    return {
        f"{budget:g}": perplexity(model, blocks, flextron.arch_for_budget(budget), config.eval_batch_size)[0]
        for budget in config.eval_budgets
    }


def _check_resume(saved: dict[str, Any], config: TrainConfig, num_blocks: int, saved_blocks: int) -> None:
    changed = [name for name in RESUME_INVARIANTS if saved.get(name) != config.to_dict()[name]]
    if changed:
        raise ValueError(f"cannot resume: these settings differ from the checkpoint's: {changed}")
    if saved_blocks != num_blocks:
        raise ValueError(
            f"cannot resume: the checkpoint was trained on {saved_blocks} blocks, "
            f"the data now has {num_blocks}"
        )


def check_resume_steps(step: int, steps: int, stop_after: int | None) -> None:
    """ValueError unless a run at `step` can continue to `steps` (and stop after `stop_after`)."""
    if steps < step:
        raise ValueError(f"--steps {steps} is below the resumed run's step {step}: give at least {step}")
    if stop_after is not None and stop_after <= step:
        raise ValueError(f"--stop-after {stop_after}: the resumed run is already at step {step}")


def train(
    student: FlextronModel,
    teacher: FlextronModel,
    data: TrainData,
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    context: DistContext | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train `student` in place (elastic, distilled from the frozen `teacher`); write
    out/metrics.jsonl, out/metrics.png and out/checkpoints/.  With resume, continue from
    the latest checkpoint under out (from scratch when there is none).  stop_after: end
    this call (validated and checkpointed) once that many steps are done in total, to be
    resumed later (time-limited jobs); the schedule still spans config.steps.

    The main process holds out's lock throughout (flextron.train.rundir); an out that
    already holds a run is refused unless resumed, or replaced with overwrite.

    data.train: (N, S) token blocks; each micro-batch feeds S - 1 tokens per block and
    predicts the next ones.  Returns {"steps": steps done, "tokens": trained in this call,
    "seconds", "val": the last validation}.
    """
    context = context or DistContext()
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be at least 1, got {stop_after}")
    if not context.is_main:
        return _train(student, teacher, data, config, Path(out), resume, context, progress, stop_after)
    with run_lock(out):
        check_run_dir(out, resume, overwrite)
        if overwrite:
            clear_run(out)
        return _train(student, teacher, data, config, Path(out), resume, context, progress, stop_after)


def _train(
    student: FlextronModel,
    teacher: FlextronModel,
    data: TrainData,
    config: TrainConfig,
    out: Path,
    resume: bool,
    context: DistContext,
    progress: bool,
    stop_after: int | None,
) -> dict[str, Any]:
    device = context.device
    if config.batch_size % context.world_size:
        raise ValueError(f"batch size {config.batch_size} is not divisible by {context.world_size} ranks")
    if data.train.dim() != 2 or data.train.shape[0] == 0 or data.train.shape[1] < 2:
        raise ValueError(
            f"training data must be (num_blocks, block_size >= 2) blocks, got "
            f"{tuple(data.train.shape)} (empty data?)"
        )
    context_length = student.config.max_position_embeddings
    if data.train.shape[1] > context_length:  # validation runs whole blocks through the model
        raise ValueError(
            f"blocks of {data.train.shape[1]} tokens exceed the model's context of {context_length}: "
            f"use a sequence length of at most {context_length - 1}"
        )
    order = BatchOrder(data.train.shape[0], config.batch_size, config.seed)  # checks batch <= data
    local_batch = config.batch_size // context.world_size
    sampler = SubnetSampler(
        student.config,
        config.rule,
        config.p_full,
        config.budgets,
        config.min_fraction,
        config.seed,
        student.arch_for_budget,
    )

    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    student.embed_tokens.weight.requires_grad_(config.train_embeddings)
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    model = context.wrap(student)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    start_step = 0
    if checkpoint is not None:
        trainer_state, optimizer_state, rng = load_training_state(checkpoint, RESUME_FIELDS)
        _check_resume(trainer_state["config"], config, data.train.shape[0], trainer_state["num_train_blocks"])
        weights = load_pretrained(checkpoint).state_dict()
        context.load_full_state(model, optimizer, weights, optimizer_state)
        start_step = trainer_state["step"]
        check_resume_steps(start_step, config.steps, stop_after)
        try:
            scheduler.load_state_dict(trainer_state["scheduler"])
            order.load_state_dict(trainer_state["data"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{checkpoint / 'trainer.json'}: corrupt scheduler or data state ({error!r})"
            ) from error
        set_rng_states(rng)
    log = MetricsLog(out / "metrics.jsonl") if context.is_main else None
    if log is not None:
        if checkpoint is None:
            log.path.unlink(missing_ok=True)
        else:
            log.truncate_after(start_step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    tokens_per_step = config.accumulation_steps * config.batch_size * (data.train.shape[1] - 1)

    def record_validation(step: int) -> dict[str, float]:
        if data.val.numel() == 0:
            return {}
        with autocast:
            val = validate(model if context.fsdp else student, data.val.to(device), config, student)
        if log is not None:
            log.write({"step": step, "val": val})
            plot_metrics(read_metrics(log.path), out / "metrics.png")
        return val

    def save(step: int) -> None:
        model_state, optimizer_state = context.full_state(model, optimizer)
        if context.is_main:
            to_save = student
            if context.fsdp:  # a plain (unsharded) copy for save_pretrained
                to_save = FlextronModel.from_state_dict(student.config, model_state)
                to_save.tokenizer, to_save.importance = student.tokenizer, student.importance
            save_checkpoint(
                out / "checkpoints",
                step,
                to_save,
                optimizer_state,
                {
                    "config": config.to_dict(),
                    "scheduler": scheduler.state_dict(),
                    "data": order.state_dict(),
                    "num_train_blocks": data.train.shape[0],
                    "tokens": step * tokens_per_step,
                },
                config.keep_checkpoints,
            )
        context.barrier()

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    val = record_validation(0) if start_step == 0 else {}
    started = time.perf_counter()
    bar = tqdm(
        range(start_step, end),
        initial=start_step,
        total=config.steps,
        desc="train",
        unit="step",
        disable=not (progress and context.is_main),
    )
    for step in bar:
        step_started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses, parts, labels, seconds = [], [], [], []
        for micro in range(config.accumulation_steps):
            arch = sampler.sample(step * config.accumulation_steps + micro)
            blocks = data.train[order.next()][context.rank * local_batch : (context.rank + 1) * local_batch]
            blocks = blocks.to(device)
            inputs, targets = blocks[:, :-1], blocks[:, 1:]  # (b, S - 1) each
            with torch.inference_mode(), autocast:
                teacher_logits = teacher(inputs)  # (b, S - 1, V)
            tick = time.perf_counter()
            last = micro == config.accumulation_steps - 1
            with context.no_sync(model, sync=last):
                with autocast:
                    logits = model(inputs, arch)
                loss, part = distillation_loss(
                    logits, teacher_logits, targets, config.temperature, config.alpha
                )
                mean_loss = float(context.mean(loss.detach()))
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(
                        f"non-finite loss ({mean_loss}) at step {step + 1}, micro-batch {micro} "
                        f"({sampler.describe(arch)}); stopped before the update, no checkpoint written"
                    )
                (loss / config.accumulation_steps).backward()
            seconds.append(time.perf_counter() - tick)
            losses.append(mean_loss)
            parts.append(part)
            labels.append(sampler.describe(arch))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm ({grad_norm}) at step {step + 1}; stopped before the update, "
                "no checkpoint written"
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step_seconds = time.perf_counter() - step_started
        done = step + 1
        loss_value = sum(losses) / len(losses)
        if log is not None:
            log.write(
                {
                    "step": done,
                    "loss": loss_value,
                    "kd": sum(p["kd"] for p in parts) / len(parts),
                    "ce": sum(p["ce"] for p in parts) / len(parts),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "archs": labels,
                    "student_seconds": seconds,
                    "step_seconds": step_seconds,
                    "tokens": done * tokens_per_step,
                }
            )
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", arch=labels[-1])
        if done == end or (config.eval_every and done % config.eval_every == 0):
            val = record_validation(done)
        if done == end or (config.save_every and done % config.save_every == 0):
            save(done)
    bar.close()
    return {
        "steps": end,
        "tokens": (end - start_step) * tokens_per_step,
        "seconds": time.perf_counter() - started,
        "val": val,
    }
