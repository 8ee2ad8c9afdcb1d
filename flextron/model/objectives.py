"""The objectives on a language model's logits: next-token cross-entropy, perplexity and
knowledge distillation (KD).  Evaluation, budget resolution, router training and elastic
training all score logits through this module.

    next_token_cross_entropy(logits, tokens)   CE of logits[:, :-1] against tokens[:, 1:]
    PerplexityMeter                            exp(summed CE / scored tokens) over batches
    kd_loss(student, teacher, T)               T^2 * KL(softmax(teacher / T) || softmax(student / T))
    distillation_loss(student, teacher, targets, T, alpha)      kd_loss + alpha * CE

KL is the forward KL (teacher as the target distribution), averaged over tokens; the T^2
factor keeps its gradient scale independent of the temperature (Hinton et al., 2015).

The KD losses and their gradient are computed together, a few rows of the (tokens, vocabulary)
logits at a time, in fp32 (or the logits' wider dtype): the gradient w.r.t. the student's logits,
T * (softmax(student / T) - softmax(teacher / T)) / N  (+ alpha * (softmax(student) - onehot) / N),
is all the backward needs.  On a 49k vocabulary this replaces a dozen passes over
several full-size fp32 tensors (log-softmaxes, KL terms and their backward) with one pass
over cache-sized chunks and a single stored gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Logits per chunk (8 MiB of fp32 per temporary): small enough to stay in cache, big enough
# that each op's thread fork/join is amortised (on a loaded machine those joins dominate).
CHUNK_ELEMENTS = 1 << 21


def next_token_cross_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean", ignore_index: int = -100
) -> torch.Tensor:
    """Cross-entropy of next-token prediction, in fp32: logits (B, S, V) at positions 0..S-2
    against tokens (B, S) at 1..S-1 (tokens equal to ignore_index are not scored).

    reduction "mean" (per scored token) or "sum": a scalar tensor; "none": (B * (S - 1),), one
    loss per position (0 where not scored). Differentiable.
    """
    targets = tokens[:, 1:].flatten().to(logits.device)  # (B * (S - 1),)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets, reduction=reduction, ignore_index=ignore_index
    )


@dataclass
class PerplexityMeter:
    """Summed next-token negative log-likelihood and the count of scored tokens over batches;
    the perplexity is exp(their ratio), every token weighing alike whatever its batch."""

    nll: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Scores one batch: logits (B, S, V) of tokens (B, S)."""
        self.nll += float(next_token_cross_entropy(logits, tokens, reduction="sum"))
        self.tokens += tokens[:, 1:].numel()

    @property
    def perplexity(self) -> float:
        if self.tokens == 0:
            raise ValueError("no tokens scored: perplexity is undefined")
        return math.exp(self.nll / self.tokens)


class _DistillationLoss(torch.autograd.Function):
    """(loss, kd, ce) of (N, V) logits; the backward scales the gradient kept from the forward.

    targets None: KD alone (alpha must be 0; ce is returned as 0)."""

    @staticmethod
    def forward(ctx, student, teacher, targets, temperature, alpha, chunk_rows):
        rows, vocab = student.shape
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if needs_grad else None  # (N, V), the student's dtype
        dtype = torch.promote_types(student.dtype, torch.float32)  # bf16 logits: fp32 softmaxes
        kd, ce = student.new_zeros((), dtype=dtype), student.new_zeros((), dtype=dtype)
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            logits, teacher_logits = student[start:end].to(dtype), teacher[start:end].to(dtype)  # (c, V)
            if temperature != 1:
                logits, teacher_logits = logits / temperature, teacher_logits / temperature
            log_q = torch.log_softmax(logits, -1)  # the student at temperature T
            log_p = torch.log_softmax(teacher_logits, -1)  # the teacher
            p = log_p.exp()
            kd += torch.sub(log_p, log_q).mul_(p).sum()
            if targets is not None:
                target = targets[start:end, None]  # (c, 1)
                log_q1 = log_q if temperature == 1 else torch.log_softmax(student[start:end].to(dtype), -1)
                ce -= log_q1.gather(1, target).sum()
            if grad is None:
                continue
            q = log_q.exp_()  # softmax(student / T), in place
            # Out of place only when q is needed again below (as softmax(student) for the CE).
            chunk_grad = (q.sub(p) if alpha and temperature == 1 else q.sub_(p)).mul_(temperature / rows)
            if alpha:
                q1 = q if temperature == 1 else log_q1.exp_()
                q1.scatter_add_(1, target, q1.new_full(target.shape, -1.0))  # softmax - onehot
                chunk_grad.add_(q1, alpha=alpha / rows)
            grad[start:end] = chunk_grad
        kd, ce = kd * temperature**2 / rows, ce / rows
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce)
        return kd + alpha * ce if alpha else kd, kd.detach(), ce

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def _chunked(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, ce) of (..., V) logits through _DistillationLoss, after the checks."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    vocab = student_logits.shape[-1]
    return _DistillationLoss.apply(
        student_logits.reshape(-1, vocab),  # (N, V)
        teacher_logits.reshape(-1, vocab),
        None if targets is None else targets.reshape(-1),
        float(temperature),
        float(alpha),
        max(1, CHUNK_ELEMENTS // vocab),
    )


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per position, averaged: a scalar.

    student_logits, teacher_logits: (..., V), every position scored.  The teacher's logits are a
    fixed target: no gradient flows into them.
    """
    return _chunked(student_logits, teacher_logits, None, temperature, 0.0)[0]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The elastic-training loss kd_loss + alpha * CE(student, targets).

    student_logits, teacher_logits: (B, T, V); targets: (B, T) next-token ids (already shifted).
    Returns the scalar loss and its parts {"kd", "ce"} as floats for logging.  The teacher's
    logits are a fixed target: no gradient flows into them.
    """
    loss, kd, ce = _chunked(student_logits, teacher_logits, targets, temperature, alpha)
    return loss, {"kd": kd.item(), "ce": ce.item()}
