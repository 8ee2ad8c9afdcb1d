"""The elastic-training loop (docs/design.md#elastic-training).

Each micro-batch trains one sampled sub-network (flextron.train.sampling) of the student,
sliced (never masked), against the frozen teacher's logits (computed once per batch,
no grad) with loss = KD + alpha * CE (flextron.model.objectives.distillation_loss).  AdamW (no
weight decay on norms and biases), linear warm-up then cosine decay to min_lr_ratio * lr, gradient
clipping, gradient accumulation, optional bf16 autocast.  Rank 0 logs metrics.jsonl,
plots metrics.png, validates (perplexity at eval_budgets) every eval_every steps, and
checkpoints every save_every steps and at the end (flextron.train.train_state).

A step is one optimizer update: accumulation_steps micro-batches of batch_size blocks
(the global batch, split across data-parallel ranks).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flextron.eval.perplexity import perplexity
from flextron.model.checkpoint import load_pretrained
from flextron.model.config import DEFAULT_BUDGETS, REPORTED_BUDGETS, check_budget
from flextron.model.elastic_model import FlextronModel
from flextron.model.objectives import distillation_loss
from flextron.options import (
    non_negative_float,
    non_negative_int,
    option,
    parse_budgets,
    parse_weights,
    positive_float,
    positive_int,
    unit_float,
)
from flextron.train.batches import BatchOrder, TrainData
from flextron.train.distributed import DistContext
from flextron.train.metrics import MetricsLog, plot_metrics, read_metrics
from flextron.train.rundir import check_run_dir, clear_run, run_lock
from flextron.train.sampling import RULES, SubnetSampler, TokenWidths, check_budget_weights
from flextron.train.train_state import (
    RESUME_FIELDS,
    latest_checkpoint,
    load_training_state,
    save_checkpoint,
    set_rng_states,
)

# Settings a resumed run must share with the run it continues, or it would not continue it.
RESUME_INVARIANTS = (
    "batch_size",
    "accumulation_steps",
    "seed",
    "rule",
    "p_full",
    "budgets",
    "budget_weights",
    "min_fraction",
)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; nothing was saved from that step."""


@dataclass
class TrainConfig:
    """Settings of one elastic-training run; the fields with option(...) are `flextron train`'s options."""

    # ---- length and batches
    steps: int = option(100, "optimizer steps", type=positive_int)
    batch_size: int = option(4, "blocks per micro-batch, global across ranks", type=positive_int)
    accumulation_steps: int = option(1, "micro-batches per optimizer step", type=positive_int)
    # ---- optimizer and schedule
    lr: float = option(1e-4, "peak learning rate", type=positive_float)
    min_lr_ratio: float = option(0.1, "the cosine decay ends at this share of --lr", type=unit_float)
    warmup_steps: int = option(10, "linear warm-up steps", type=non_negative_int)
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only)", type=non_negative_float)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad_norm: float = option(1.0, "clip the gradient norm to this", type=positive_float)
    train_embeddings: bool = option(
        True, "do not train the embedding / tied LM head", negative_flag="--freeze-embeddings"
    )
    # ---- loss
    temperature: float = option(1.0, "KD softmax temperature", type=positive_float)
    alpha: float = option(0.0, "weight of the LM (cross-entropy) loss next to KD", type=non_negative_float)
    # ---- sub-network sampling (flextron.train.sampling)
    rule: str = option("budget", "sub-network sampling", choices=RULES)
    p_full: float = option(1 / 3, "probability of training the full model", type=unit_float)
    budgets: tuple[float, ...] = option(
        DEFAULT_BUDGETS, "budgets the budget rule samples", type=parse_budgets
    )
    budget_weights: tuple[float, ...] = option(
        (), "relative sampling weight of each of --budgets, e.g. 2,1,1 (default: equal)", type=parse_weights
    )
    min_fraction: float = 0.25
    # ---- numerics
    bf16: bool = option(False, "bfloat16 autocast for the student and teacher forward passes")
    # ---- feedback and checkpoints
    eval_every: int = option(50, "validate every N steps (0: start and end only)", type=non_negative_int)
    eval_budgets: tuple[float, ...] = option(
        REPORTED_BUDGETS, "budgets whose perplexity is validated", type=parse_budgets
    )
    eval_batch_size: int = 4
    save_every: int = option(100, "checkpoint every N steps (0: at the end only)", type=non_negative_int)
    keep_checkpoints: int = 2
    seed: int = option(0, "seed of the sub-network draws and the data order", type=int)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown budget rule {self.rule!r}; choose one of {RULES}")
        if not 0.0 <= self.p_full <= 1.0:
            raise ValueError(f"TrainConfig.p_full must be in [0, 1], got {self.p_full}")
        self.betas = tuple(self.betas)
        self.budgets = tuple(check_budget(b) for b in self.budgets)
        self.budget_weights = check_budget_weights(self.budget_weights, self.budgets)
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
    """Perplexity {"1": ..., "0.5": ...} of each eval budget's configuration (model.arch_for_budget)."""
    return {
        f"{budget:g}": perplexity(model, blocks, flextron.arch_for_budget(budget), config.eval_batch_size)[0]
        for budget in config.eval_budgets
    }


def _check_resume(saved: dict[str, Any], config: TrainConfig, num_blocks: int, saved_blocks: int) -> None:
    # Through from_dict: a setting newer than the checkpoint counts as its default.
    saved = TrainConfig.from_dict(saved).to_dict()
    changed = [name for name in RESUME_INVARIANTS if saved[name] != config.to_dict()[name]]
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
    *,
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
    out = Path(out)
    # Only the main process owns the run directory: it locks, checks and clears it.
    with run_lock(out) if context.is_main else contextlib.nullcontext():
        if context.is_main:
            check_run_dir(out, resume, overwrite)
            if overwrite:
                clear_run(out)
        _check_data(student, data, config, context)
        run = _start_run(student, teacher, data, config, out, context)
        start_step = run.restore(latest_checkpoint(out / "checkpoints") if resume else None, stop_after)
        return _run_steps(run, start_step, stop_after, progress)


def _check_data(student: FlextronModel, data: TrainData, config: TrainConfig, context: DistContext) -> None:
    """ValueError unless data.train holds (N, S) blocks the model and the ranks can train on."""
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


@dataclass
class _MicroBatch:
    """What one micro-batch of a step reports: its loss, KD / CE parts, sub-network and time."""

    loss: float
    parts: dict[str, float]
    arch: str
    seconds: float


@dataclass
class TrainingRun:
    """The state of one elastic-training run on this rank, and its steps.

    model is the student as trained (wrapped for DDP / FSDP by the context); log is the
    main process's metrics log (None on the other ranks).
    """

    student: FlextronModel
    teacher: FlextronModel
    model: torch.nn.Module
    data: TrainData
    config: TrainConfig
    out: Path
    context: DistContext
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    order: BatchOrder
    sampler: SubnetSampler
    log: MetricsLog | None

    @property
    def tokens_per_step(self) -> int:
        """Tokens trained per optimizer step, over all ranks."""
        blocks = self.config.accumulation_steps * self.config.batch_size
        return blocks * (self.data.train.shape[1] - 1)

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast of the forward passes when config.bf16 (else a no-op)."""
        return torch.autocast(self.context.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def restore(self, checkpoint: Path | None, stop_after: int | None) -> int:
        """Load weights, optimizer, schedule, data order and RNG states from checkpoint; its step.

        With no checkpoint, the run starts at step 0 (its metrics log is cleared).
        """
        if checkpoint is None:
            self._trim_log(0)
            return 0
        trainer_state, optimizer_state, rng = load_training_state(checkpoint, RESUME_FIELDS)
        _check_resume(
            trainer_state["config"], self.config, self.data.train.shape[0], trainer_state["num_train_blocks"]
        )
        weights = load_pretrained(checkpoint).state_dict()
        self.context.load_full_state(self.model, self.optimizer, weights, optimizer_state)
        step = trainer_state["step"]
        check_resume_steps(step, self.config.steps, stop_after)
        try:
            self.scheduler.load_state_dict(trainer_state["scheduler"])
            self.order.load_state_dict(trainer_state["data"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{checkpoint / 'trainer.json'}: corrupt scheduler or data state ({error!r})"
            ) from error
        set_rng_states(rng)
        self._trim_log(step)
        return step

    def _trim_log(self, step: int) -> None:
        """Drop the log's records after `step` (all of them for a fresh run)."""
        if self.log is None:
            return
        if step == 0:
            self.log.path.unlink(missing_ok=True)
        else:
            self.log.truncate_after(step)

    def step(self, step: int) -> dict[str, Any]:
        """Optimizer step `step` (0-based): accumulation_steps micro-batches, clipping, the
        update; its metrics record (also logged).  NonFiniteLossError before a bad update."""
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        micro = [self._micro_step(step, index) for index in range(self.config.accumulation_steps)]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad_norm))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm ({grad_norm}) at step {step + 1}; stopped before the update, "
                "no checkpoint written"
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        record = {
            "step": step + 1,
            "loss": sum(m.loss for m in micro) / len(micro),
            "kd": sum(m.parts["kd"] for m in micro) / len(micro),
            "ce": sum(m.parts["ce"] for m in micro) / len(micro),
            "lr": lr,
            "grad_norm": grad_norm,
            "archs": [m.arch for m in micro],
            "student_seconds": [m.seconds for m in micro],
            "step_seconds": time.perf_counter() - started,
            "tokens": (step + 1) * self.tokens_per_step,
        }
        if self.log is not None:
            self.log.write(record)
        return record

    def _micro_step(self, step: int, micro: int) -> _MicroBatch:
        """Forward and backward of micro-batch `micro` of `step` on this rank's share of the
        global batch (gradients are synchronised on the step's last micro-batch only)."""
        config, context = self.config, self.context
        arch = self.sampler.sample(step * config.accumulation_steps + micro)
        local_batch = config.batch_size // context.world_size
        blocks = self.data.train[self.order.next()][
            context.rank * local_batch : (context.rank + 1) * local_batch
        ]
        blocks = blocks.to(context.device)
        inputs, targets = blocks[:, :-1], blocks[:, 1:]  # (b, S - 1) each
        with torch.inference_mode(), self.autocast():
            teacher_logits = self.teacher(inputs)  # (b, S - 1, V)
        tick = time.perf_counter()
        with context.no_sync(self.model, sync=micro == config.accumulation_steps - 1):
            with self.autocast():
                if isinstance(arch, TokenWidths):
                    logits = self.model(inputs, session=arch.session(inputs.numel(), inputs.device))
                else:
                    logits = self.model(inputs, arch)
            loss, parts = distillation_loss(logits, teacher_logits, targets, config.temperature, config.alpha)
            mean_loss = float(context.mean(loss.detach()))
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({mean_loss}) at step {step + 1}, micro-batch {micro} "
                    f"({self.sampler.describe(arch)}); stopped before the update, no checkpoint written"
                )
            (loss / config.accumulation_steps).backward()
        return _MicroBatch(mean_loss, parts, self.sampler.describe(arch), time.perf_counter() - tick)

    def validate(self, step: int) -> dict[str, float]:
        """Validation perplexity per eval budget after `step` steps ({} without validation data)."""
        if self.data.val.numel() == 0:
            return {}
        model = self.model if self.context.fsdp else self.student
        with self.autocast():
            val = validate(model, self.data.val.to(self.context.device), self.config, self.student)
        if self.log is not None:
            self.log.write({"step": step, "val": val})
            plot_metrics(read_metrics(self.log.path), self.out / "metrics.png")
        return val

    def save(self, step: int) -> None:
        """Checkpoint after `step` steps (written by the main process; all ranks take part)."""
        model_state, optimizer_state = self.context.full_state(self.model, self.optimizer)
        if self.context.is_main:
            to_save = self.student
            if self.context.fsdp:  # a plain (unsharded) copy for save_pretrained
                to_save = FlextronModel.from_state_dict(self.student.config, model_state)
                to_save.tokenizer, to_save.importance = self.student.tokenizer, self.student.importance
            trainer_state = {
                "config": self.config.to_dict(),
                "scheduler": self.scheduler.state_dict(),
                "data": self.order.state_dict(),
                "num_train_blocks": self.data.train.shape[0],
                "tokens": step * self.tokens_per_step,
            }
            save_checkpoint(
                self.out / "checkpoints",
                step,
                to_save,
                optimizer_state,
                trainer_state,
                self.config.keep_checkpoints,
            )
        self.context.barrier()


def subnet_sampler(student: FlextronModel, config: TrainConfig) -> SubnetSampler:
    """The sampler of the sub-networks the run trains (budgets resolve to the student's choices)."""
    return SubnetSampler(
        student.config,
        config.rule,
        p_full=config.p_full,
        budgets=config.budgets,
        budget_weights=config.budget_weights,
        min_fraction=config.min_fraction,
        seed=config.seed,
        arch_for_budget=student.arch_for_budget,
    )


def _start_run(
    student: FlextronModel,
    teacher: FlextronModel,
    data: TrainData,
    config: TrainConfig,
    out: Path,
    context: DistContext,
) -> TrainingRun:
    """A run at step 0: models on the device (teacher frozen), optimizer, schedule, data order."""
    order = BatchOrder(data.train.shape[0], config.batch_size, config.seed)  # checks batch <= data
    sampler = subnet_sampler(student, config)
    teacher.to(context.device).eval().requires_grad_(False)
    student.to(context.device).train()
    student.embed_tokens.weight.requires_grad_(config.train_embeddings)
    model = context.wrap(student)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    log = MetricsLog(out / "metrics.jsonl") if context.is_main else None
    return TrainingRun(
        student, teacher, model, data, config, out, context, optimizer, scheduler, order, sampler, log
    )


def _run_steps(run: TrainingRun, start_step: int, stop_after: int | None, progress: bool) -> dict[str, Any]:
    """Steps start_step.. of the run, validating and checkpointing on schedule (see train)."""
    config = run.config
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    val = run.validate(0) if start_step == 0 else {}
    started = time.perf_counter()
    bar = tqdm(
        range(start_step, end),
        initial=start_step,
        total=config.steps,
        desc="train",
        unit="step",
        disable=not (progress and run.context.is_main),
    )
    for step in bar:
        record = run.step(step)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", arch=record["archs"][-1])
        done = step + 1
        if done == end or (config.eval_every and done % config.eval_every == 0):
            val = run.validate(done)
        if done == end or (config.save_every and done % config.save_every == 0):
            run.save(done)
    bar.close()
    return {
        "steps": end,
        "tokens": (end - start_step) * run.tokens_per_step,
        "seconds": time.perf_counter() - started,
        "val": val,
    }
