"""The elastic-training loss: knowledge distillation from the frozen full model + alpha * LM loss.

    loss = T^2 * KL(softmax(teacher / T) || softmax(student / T))  +  alpha * CE(student, next token)

KL is the forward KL (teacher as the target distribution), averaged over tokens; the T^2
factor keeps its gradient scale independent of the temperature (Hinton et al., 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits, teacher_logits: (B, T, V); targets: (B, T) next-token ids.

    Returns the scalar loss and its parts {"kd", "ce"} as floats for logging.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    vocab = student_logits.shape[-1]
    # fp32 for the softmaxes: bf16 log-probabilities lose the tail the KL depends on.
    student = student_logits.float().reshape(-1, vocab)  # (N, V)
    teacher = teacher_logits.float().reshape(-1, vocab)
    kd = (
        F.kl_div(
            F.log_softmax(student / temperature, -1),
            F.log_softmax(teacher / temperature, -1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    ce = F.cross_entropy(student, targets.reshape(-1))
    loss = kd + alpha * ce if alpha else kd
    return loss, {"kd": kd.item(), "ce": ce.item()}
