"""flextron.model.objectives: next-token cross-entropy, perplexity and the chunked KD losses, against
the plain PyTorch formulas they replace (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flextron.model import objectives
from flextron.model.objectives import PerplexityMeter, distillation_loss, kd_loss, next_token_cross_entropy

# ---- cross-entropy and perplexity


def test_next_token_cross_entropy_scores_each_position_against_the_next_token() -> None:
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 6, 11, dtype=torch.float64), torch.randint(0, 11, (2, 6))
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    assert next_token_cross_entropy(logits, tokens).dtype == torch.float32  # fp32, whatever the logits
    torch.testing.assert_close(next_token_cross_entropy(logits, tokens), plain)
    total = next_token_cross_entropy(logits, tokens, reduction="sum")
    torch.testing.assert_close(total, plain * 10)  # 2 x 5 scored tokens
    by_hand = -sum(
        torch.log_softmax(logits[b, t].float(), -1)[tokens[b, t + 1]] for b in range(2) for t in range(5)
    )
    torch.testing.assert_close(total, by_hand)


def test_next_token_cross_entropy_skips_ignored_labels_and_has_a_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, requires_grad=True)
    tokens = torch.tensor([[1, 2, -100, 4, 5]])
    loss = next_token_cross_entropy(logits, tokens)
    kept = [0, 2, 3]  # positions whose next token is not -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, kept], tokens[0, [1, 3, 4]]))
    loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0


def test_perplexity_meter_weighs_every_token_alike_across_batches() -> None:
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    meter = PerplexityMeter()
    for part in (slice(0, 2), slice(2, 3)):  # batches of 2 and 1 blocks
        meter.add(logits[part], tokens[part])
    assert meter.tokens == 15
    expected = math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item())
    assert meter.perplexity == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no tokens scored"):
        _ = PerplexityMeter().perplexity


# ---- KD


def test_kd_loss_is_the_per_token_forward_kl_and_its_gradient(monkeypatch) -> None:
    monkeypatch.setattr(objectives, "CHUNK_ELEMENTS", 3 * 13)  # 3 rows of 13: chunks and a ragged tail
    torch.manual_seed(0)
    student = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 13, dtype=torch.float64)
    # The plain formula router training used: KL(teacher || student) per token, batchmean.
    plain = F.kl_div(
        torch.log_softmax(student, -1).flatten(0, 1),
        torch.log_softmax(teacher, -1).flatten(0, 1),
        log_target=True,
        reduction="batchmean",
    )
    loss = kd_loss(student, teacher)
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, student)
    (plain_grad,) = torch.autograd.grad(plain, student)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-10, atol=1e-12)
    assert abs(kd_loss(teacher, teacher).item()) < 1e-12  # a student equal to its teacher
    kl_t2 = kd_loss(student, teacher, temperature=2.0)
    loss_t2, _ = distillation_loss(student, teacher, torch.zeros(2, 5, dtype=torch.long), temperature=2.0)
    torch.testing.assert_close(kl_t2, loss_t2)
    with pytest.raises(ValueError, match="differ"):
        kd_loss(student, teacher[:, :4])


def test_distillation_loss_is_forward_kl_times_t_squared_plus_alpha_ce() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    loss, parts = distillation_loss(student, teacher, targets, temperature=2.0, alpha=0.3)
    p = F.softmax(teacher / 2, -1)
    kl = (p * (p.log() - F.log_softmax(student / 2, -1))).sum(-1).mean() * 4
    ce = F.cross_entropy(student.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, kl + 0.3 * ce)
    assert parts["kd"] == pytest.approx(kl.item(), rel=1e-5)
    zero, _ = distillation_loss(teacher, teacher, targets)
    assert abs(zero.item()) < 1e-6  # a student equal to its teacher has no KD loss


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.0), (1.0, 0.5), (2.0, 0.0), (0.5, 0.3)])
def test_chunked_distillation_loss_and_gradient_equal_the_plain_one(monkeypatch, temperature, alpha) -> None:
    monkeypatch.setattr(objectives, "CHUNK_ELEMENTS", 3 * 37)  # 3 rows of 37: chunks and a ragged tail
    torch.manual_seed(0)
    student = (3 * torch.randn(2, 7, 37, dtype=torch.float64)).requires_grad_()
    teacher, targets = 3 * torch.randn(2, 7, 37, dtype=torch.float64), torch.randint(0, 37, (2, 7))
    loss, parts = distillation_loss(student, teacher, targets, temperature, alpha)
    (grad,) = torch.autograd.grad(0.25 * loss, student)  # a scaled loss, as with accumulation
    logits = student.flatten(0, 1)
    kd = (
        F.kl_div(
            F.log_softmax(logits / temperature, -1),
            F.log_softmax(teacher.flatten(0, 1) / temperature, -1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    ce = F.cross_entropy(logits, targets.flatten())
    plain = kd + alpha * ce
    (plain_grad,) = torch.autograd.grad(0.25 * plain, student)
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-10, atol=1e-12)
    assert parts == pytest.approx({"kd": kd.item(), "ce": ce.item()}, rel=1e-12)


def test_chunked_distillation_loss_in_bf16_matches_fp32() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 300).bfloat16(), torch.randn(2, 5, 300).bfloat16()
    targets = torch.randint(0, 300, (2, 5))
    grads = []
    for logits in (student.requires_grad_(), student.float().requires_grad_()):
        loss, _ = distillation_loss(logits, teacher, targets, alpha=0.5)
        grads.append(torch.autograd.grad(loss, logits)[0])
    assert grads[0].dtype == torch.bfloat16  # the gradient has the logits' dtype
    torch.testing.assert_close(grads[0].float(), grads[1], rtol=1e-2, atol=1e-4)
