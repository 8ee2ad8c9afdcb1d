"""Elastic training: sampling, data order, schedule, exact resume, NaN guard, bad input (its loss:
tests/test_objectives.py)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from flextron.model.config import ArchConfig, arch_for_budget
from flextron.model.elastic_model import FlextronModel
from flextron.model.objectives import distillation_loss
from flextron.train import NonFiniteLossError, SubnetSampler, TrainConfig, TrainData, train
from flextron.train.batches import BatchOrder, split_blocks
from flextron.train.metrics import read_metrics
from flextron.train.sampling import TokenWidths
from flextron.train.train_state import latest_checkpoint
from flextron.train.trainer import lr_factor

VOCAB = 300


def tiny_data(blocks: int = 24, block_size: int = 17, seed: int = 0) -> TrainData:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (blocks, block_size), generator=generator)
    return TrainData(ids[:-4], ids[-4:])


@pytest.fixture(scope="session")
def student_and_teacher(tiny_flextron):
    """A factory fixture (it needs tiny_flextron)."""

    def student_and_teacher() -> tuple[FlextronModel, FlextronModel]:
        model = tiny_flextron()
        return model, copy.deepcopy(model)

    return student_and_teacher


def quick_config(**overrides) -> TrainConfig:
    settings = dict(
        steps=4,
        batch_size=2,
        accumulation_steps=2,
        lr=1e-3,
        warmup_steps=1,
        eval_every=2,
        save_every=2,
        eval_batch_size=4,
        alpha=0.5,
        temperature=2.0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


# ---- sampling


def test_sampler_is_a_function_of_seed_and_index(tiny_flextron) -> None:
    config = tiny_flextron().config
    a, b = SubnetSampler(config, "mixed", seed=3), SubnetSampler(config, "mixed", seed=3)
    draws = [a.sample(i) for i in range(50)]
    assert draws == [b.sample(i) for i in reversed(range(50))][::-1]  # order of calls does not matter
    assert draws != [SubnetSampler(config, "mixed", seed=4).sample(i) for i in range(50)]


def test_sampler_rules_and_full_probability(tiny_flextron) -> None:
    config = tiny_flextron().config
    full = ArchConfig.full(config)
    budget = SubnetSampler(config, "budget", p_full=0.25, budgets=(0.5, 0.75))
    draws = [budget.sample(i) for i in range(400)]
    allowed = {full, arch_for_budget(config, 0.5), arch_for_budget(config, 0.75)}
    assert set(draws) <= allowed
    assert 0.17 < sum(d == full for d in draws) / 400 < 0.33
    random = SubnetSampler(config, "random", p_full=0.0, min_fraction=0.5)
    draws = [random.sample(i) for i in range(200)]
    assert not any(d.is_uniform and d == full for d in draws[:5])
    assert any(not d.is_uniform for d in draws)  # per-layer choices differ
    for arch in draws:
        arch.validate(config)
        assert min(arch.mlp_widths) >= 0.5 * config.intermediate_size
    assert all(SubnetSampler(config, "budget", p_full=1.0).sample(i) == full for i in range(20))


def test_budget_weights_set_the_budgets_shares(tiny_flextron) -> None:
    config = tiny_flextron().config
    small, large = arch_for_budget(config, 0.5), arch_for_budget(config, 0.75)
    sampler = SubnetSampler(config, "budget", p_full=0.0, budgets=(0.5, 0.75), budget_weights=(1, 3))
    draws = [sampler.sample(i) for i in range(800)]
    assert set(draws) == {small, large}
    assert 0.7 < sum(d == large for d in draws) / 800 < 0.8
    never = SubnetSampler(config, "budget", p_full=0.0, budgets=(0.5, 0.75), budget_weights=(0, 1))
    assert all(never.sample(i) == large for i in range(50))
    # No weights: equal shares, and the draws that runs saved before weights existed made (the
    # p_full coin, then a uniform pick of the budget), so those runs resume as they were.
    equal = SubnetSampler(config, "budget", p_full=0.0, budgets=(0.5, 0.75))
    draws = [equal.sample(i) for i in range(800)]
    assert 0.4 < sum(d == large for d in draws) / 800 < 0.6
    for i, draw in enumerate(draws):
        generator = torch.Generator().manual_seed(i)  # seed 0
        torch.rand((), generator=generator)
        assert draw == (small, large)[int(torch.randint(2, (), generator=generator))]


@pytest.mark.parametrize("weights", [(1.0,), (1.0, -1.0), (0.0, 0.0)])
def test_bad_budget_weights_are_a_clear_error(weights) -> None:
    with pytest.raises(ValueError, match=r"must be one number >= 0 per budget \[0.5, 0.75\], not all zero"):
        TrainConfig(budgets=(0.5, 0.75), budget_weights=weights)


def test_resume_accepts_a_checkpoint_older_than_budget_weights(student_and_teacher, tmp_path) -> None:
    """A run saved before --budget-weights existed resumes with equal weights, and only with them."""
    student, teacher = student_and_teacher()
    train(student, teacher, tiny_data(), quick_config(steps=2), tmp_path, progress=False)
    trainer_json = latest_checkpoint(tmp_path / "checkpoints") / "trainer.json"
    state = json.loads(trainer_json.read_text())
    del state["config"]["budget_weights"]
    trainer_json.write_text(json.dumps(state))
    train(student, teacher, tiny_data(), quick_config(steps=3), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"settings differ from the checkpoint's: \['budget_weights'\]"):
        weighted = quick_config(steps=4, budget_weights=(1, 2, 1))
        train(student, teacher, tiny_data(), weighted, tmp_path, resume=True, progress=False)


def test_token_rule_mixes_the_trained_widths_per_token(tiny_flextron) -> None:
    model = tiny_flextron()
    sampler = SubnetSampler(model.config, "token", p_full=0.0, budgets=(0.25, 0.5), seed=2)
    draw = sampler.sample(0)
    assert isinstance(draw, TokenWidths) and draw == sampler.sample(0)
    assert draw.arch == arch_for_budget(model.config, draw.budget)
    full = model.config.layer_intermediate_size(0)
    assert draw.layer_widths[0] == tuple(
        sorted({full, *(arch_for_budget(model.config, b).mlp_widths[0] for b in (0.25, 0.5))}, reverse=True)
    )
    choice = draw.session(64, torch.device("cpu")).choice  # (L, 64)
    assert torch.equal(choice, draw.session(64, torch.device("cpu")).choice)
    assert all(len(set(row.tolist())) == len(draw.layer_widths[0]) for row in choice)  # every width used
    assert sampler.describe(draw) == f"tokens at {draw.budget:g}"


def test_token_rule_gradients_stay_inside_the_used_prefixes(tiny_flextron) -> None:
    """A per-token mixed-width step gives exactly zero gradient to weights no token's prefix used."""
    model = tiny_flextron()
    sampler = SubnetSampler(model.config, "token", p_full=0.0, budgets=(0.25,), seed=0)
    draw = sampler.sample(0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    logits = model(tokens, session=draw.session(tokens.numel(), tokens.device))
    logits.float().logsumexp(-1).sum().backward()
    head_dim = model.config.head_dim
    for layer, block in enumerate(model.layers):
        widest = draw.layer_widths[layer][0]
        mlp = block.mlp
        assert torch.all(mlp.gate_proj.weight.grad[widest:] == 0) and torch.all(
            mlp.down_proj.weight.grad[:, widest:] == 0
        )
        narrowest = draw.layer_widths[layer][-1]
        assert mlp.up_proj.weight.grad[:narrowest].abs().sum() > 0
        used = draw.arch.heads[layer] * head_dim
        assert torch.all(block.self_attn.q_proj.weight.grad[used:] == 0)


def test_unknown_budget_rule_is_a_clear_error(tiny_flextron) -> None:
    with pytest.raises(ValueError, match="unknown budget rule 'latency'"):
        TrainConfig(rule="latency")
    with pytest.raises(ValueError, match="unknown budget rule"):
        SubnetSampler(tiny_flextron().config, "latency")


# ---- data


def test_batch_order_covers_each_epoch_and_resumes() -> None:
    order = BatchOrder(10, 3, seed=1)
    epoch = torch.cat([order.next() for _ in range(3)])
    assert len(set(epoch.tolist())) == 9  # no repeats within an epoch, the tail of 1 dropped
    state = order.state_dict()
    expected = [order.next() for _ in range(5)]
    resumed = BatchOrder(10, 3, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.next() for _ in range(5)], strict=True))


def test_batch_larger_than_the_data_and_empty_data_are_clear_errors(student_and_teacher, tmp_path) -> None:
    with pytest.raises(ValueError, match="batch size 8 is larger than the data: only 5 training blocks"):
        BatchOrder(5, 8)
    student, teacher = student_and_teacher()
    data = tiny_data(blocks=9)
    with pytest.raises(ValueError, match="larger than the data"):
        train(student, teacher, data, quick_config(batch_size=8), tmp_path, progress=False)
    empty = TrainData(torch.zeros(0, 17, dtype=torch.int64), data.val)
    with pytest.raises(ValueError, match="empty data"):
        train(student, teacher, empty, quick_config(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="no training blocks"):
        split_blocks(torch.zeros(0, 8, dtype=torch.int64), 0.1)


def test_validation_split_is_deterministic_and_disjoint() -> None:
    blocks = torch.arange(40 * 4).view(40, 4)
    data = split_blocks(blocks, 0.1)
    assert data.val.shape[0] == 4 and data.train.shape[0] == 36
    assert torch.equal(data.val[:, 0], torch.tensor([0, 40, 80, 120]))
    assert not set(data.val[:, 0].tolist()) & set(data.train[:, 0].tolist())


# ---- schedule


def test_warmup_then_cosine() -> None:
    config = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)  # half-way through the cosine
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] > 0.1 and math.isclose(lr_factor(110, config), 0.1)


# ---- the loop


@torch.no_grad()
def held_out_kd(student: FlextronModel, teacher: FlextronModel, blocks: torch.Tensor, budget: float) -> float:
    logits = student(blocks[:, :-1], student.arch_for_budget(budget))
    return distillation_loss(logits, teacher(blocks[:, :-1]), blocks[:, 1:])[0].item()


def test_training_distills_small_budgets_and_logs(student_and_teacher, tmp_path) -> None:
    student, teacher = student_and_teacher()
    teacher_copy = copy.deepcopy(teacher)
    data = tiny_data(blocks=40)
    kd_before = held_out_kd(student, teacher, data.val, 0.25)
    config = quick_config(
        steps=12, accumulation_steps=1, eval_every=6, lr=3e-3, alpha=0.0, p_full=0.0, budgets=(0.25,)
    )
    result = train(student, teacher, data, config, tmp_path, progress=False)
    assert held_out_kd(student, teacher, data.val, 0.25) < 0.9 * kd_before  # on held-out blocks
    records = read_metrics(tmp_path / "metrics.jsonl")
    val = [r["val"] for r in records if "val" in r]
    assert [r["step"] for r in records if "val" in r] == [0, 6, 12]
    assert set(val[0]) == {"1", "0.75", "0.5", "0.25"}
    assert result["tokens"] == 12 * 2 * 16 and result["val"] == val[-1]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    for name, param in teacher.state_dict().items():  # the teacher is frozen
        assert torch.equal(param, teacher_copy.state_dict()[name])


@pytest.mark.parametrize("rule,bf16", [("mixed", False), ("token", False), ("token", True)])
def test_resume_continues_exactly(student_and_teacher, tmp_path, rule, bf16) -> None:
    """Training 2N steps equals N steps + resume + N steps: identical weights (bf16 autocast too)."""
    config = quick_config(steps=6, save_every=0, eval_every=0, rule=rule, p_full=1 / 3, bf16=bf16)
    data = tiny_data()
    straight, teacher = student_and_teacher()
    train(straight, teacher, data, config, tmp_path / "straight", progress=False)

    first, teacher = student_and_teacher()
    train(first, teacher, data, config, tmp_path / "split", progress=False, stop_after=3)
    assert latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-000003"
    resumed, teacher = student_and_teacher()  # a fresh process: the original model again
    train(resumed, teacher, data, config, tmp_path / "split", resume=True, progress=False)
    for name, param in straight.state_dict().items():
        assert torch.equal(param, resumed.state_dict()[name]), name
    losses = [
        [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
        for run in ("straight", "split")
    ]
    assert losses[0] == losses[1]


def test_resume_refuses_changed_settings(student_and_teacher, tmp_path) -> None:
    student, teacher = student_and_teacher()
    train(student, teacher, tiny_data(), quick_config(steps=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"settings differ from the checkpoint's: \['seed'\]"):
        train(
            student,
            teacher,
            tiny_data(),
            quick_config(steps=4, seed=1),
            tmp_path,
            resume=True,
            progress=False,
        )


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(student_and_teacher, tmp_path) -> None:
    student, teacher = student_and_teacher()
    config = quick_config(steps=4, save_every=2, eval_every=0)
    train(student, teacher, tiny_data(), config, tmp_path, progress=False, stop_after=2)
    saved = load_file(tmp_path / "checkpoints" / "step-000002" / "model.safetensors")
    with torch.no_grad():
        teacher.norm.weight.fill_(float("nan"))  # the teacher's logits (and the KD loss) become NaN
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 3"):
        train(student, teacher, tiny_data(), config, tmp_path, resume=True, progress=False)
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.name == "step-000002"
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(weights[k], saved[k]) and weights[k].isfinite().all() for k in saved)


def test_bf16_autocast_trains(student_and_teacher, tmp_path) -> None:
    student, teacher = student_and_teacher()
    result = train(student, teacher, tiny_data(), quick_config(steps=2, bf16=True), tmp_path, progress=False)
    assert all(math.isfinite(v) for v in result["val"].values())
    assert all(p.dtype == torch.float32 for p in student.parameters())  # autocast, not a cast


def test_frozen_embeddings_stay_put(student_and_teacher, tmp_path) -> None:
    student, teacher = student_and_teacher()
    before = student.embed_tokens.weight.detach().clone()
    train(
        student, teacher, tiny_data(), quick_config(steps=2, train_embeddings=False), tmp_path, progress=False
    )
    assert torch.equal(student.embed_tokens.weight, before)
    assert not torch.equal(student.layers[0].mlp.up_proj.weight, teacher.layers[0].mlp.up_proj.weight)


def test_blocks_longer_than_the_context_are_a_clear_error(student_and_teacher, tmp_path) -> None:
    student, teacher = student_and_teacher()  # context 128
    data = tiny_data(blocks=8, block_size=129)
    with pytest.raises(ValueError, match="blocks of 129 tokens exceed the model's context of 128"):
        train(student, teacher, data, quick_config(), tmp_path, progress=False)
