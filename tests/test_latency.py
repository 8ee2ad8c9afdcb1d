"""The latency lookup table: cost model, interpolation, files, device warnings, profiling."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from flextron.config import ArchConfig
from flextron.latency import (
    LUT_FILE,
    LatencyTable,
    ShapeCosts,
    median_times_ms,
    profile_latency,
    random_archs,
    timed_forward,
)
from flextron.nn.routers import expected_latency, latency_loss
from tests.tiny_models import tiny_flextron

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_table() -> LatencyTable:
    """Costs linear in tokens: MLP w costs w/64 * tokens/16 ms, a head 0.5 * tokens/16 ms."""
    table = LatencyTable("cpu", "test cpu", "float32", num_layers=2, num_heads=4, intermediate_size=256)
    for phase, batch, length in (
        ("prefill", 1, 16),
        ("prefill", 1, 32),
        ("prefill", 2, 16),
        ("prefill", 2, 32),
        ("decode", 1, 64),
    ):
        tokens = batch * (length if phase == "prefill" else 1)
        unit = tokens / 16
        table.entries.append(
            ShapeCosts(
                phase,
                batch,
                length,
                fixed_ms=2.0 * unit,
                mlp_ms={w: w / 64 * unit for w in (64, 128, 192, 256)},
                attention_ms={h: 0.5 * h * unit for h in (2, 4)},
            )
        )
    return table


def test_predict_is_fixed_plus_per_layer_choices() -> None:
    table = synthetic_table()
    arch = ArchConfig((64, 256), (2, 4))
    # fixed 2 + mlp (1 + 4) + heads (1 + 2)
    assert table.predict(arch, "prefill", 1, 16) == pytest.approx(10.0)
    assert table.predict(arch, "prefill", 2, 32) == pytest.approx(40.0)


def test_costs_interpolate_between_profiled_shapes_and_choices() -> None:
    table = synthetic_table()
    arch = ArchConfig((64, 256), (2, 4))
    # Length 24 is halfway between 16 and 32; batch 2 length 24 likewise; width 96 between 64 and 128.
    assert table.predict(arch, "prefill", 1, 24) == pytest.approx(15.0)
    assert table.predict(arch, "prefill", 2, 24) == pytest.approx(30.0)
    assert table.predict(ArchConfig((96, 96), (2, 2)), "prefill", 1, 16) == pytest.approx(2 + 1.5 * 2 + 2)
    # Beyond the profiled range: linear extrapolation.
    assert table.predict(arch, "prefill", 1, 48) == pytest.approx(30.0)


def test_cost_vectors_match_predict_with_one_hot_probabilities() -> None:
    table = synthetic_table()
    mlp_choices, head_choices = [256, 128, 64], [4, 2]
    fixed, mlp_costs, head_costs = table.cost_vectors(mlp_choices, head_choices, "prefill", 1, 16)
    mlp_probs = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])  # layer 0: 64, layer 1: 256
    head_probs = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # layer 0: 2 heads, layer 1: 4
    latency = expected_latency(mlp_probs, head_probs, fixed, mlp_costs, head_costs)
    assert latency.item() == pytest.approx(table.predict(ArchConfig((64, 256), (2, 4)), "prefill", 1, 16))
    # Soft probabilities give the expectation, and it is differentiable.
    soft = torch.full((1, 2, 3), 1 / 3, requires_grad=True)
    latency = expected_latency(soft, head_probs, fixed, mlp_costs, head_costs)
    assert latency.item() == pytest.approx(2 + 2 * (4 + 2 + 1) / 3 + 3)
    latency.sum().backward()
    assert torch.allclose(soft.grad[0, 0], mlp_costs)


def test_latency_loss_has_a_dead_zone_and_pushes_towards_the_target() -> None:
    target = 10.0
    inside = torch.tensor([10.4], requires_grad=True)
    assert latency_loss(inside, target, dead_zone=0.05).item() == 0.0
    over = torch.tensor([12.0], requires_grad=True)
    loss = latency_loss(over, target, dead_zone=0.05)
    assert loss.item() == pytest.approx(0.2 - 0.05)
    loss.backward()
    assert over.grad.item() > 0  # descending lowers the latency
    under = torch.tensor([5.0], requires_grad=True)
    latency_loss(under, target, dead_zone=0.05).backward()
    assert under.grad.item() < 0


def test_target_outside_the_achievable_range_names_the_range() -> None:
    table = synthetic_table()
    model = tiny_flextron()
    low, high = table.latency_range(model.config, "prefill", 1, 16)
    assert (low, high) == pytest.approx((2 + 2 * 1 + 2 * 1, 2 + 2 * 4 + 2 * 2))
    assert table.check_target(7.0, model.config, "prefill", 1, 16) == pytest.approx(0.5)
    for bad in (low * 0.9, high * 1.1):
        with pytest.raises(ValueError, match="achievable range is 6.000 ms .* to 14.000 ms"):
            table.check_target(bad, model.config, "prefill", 1, 16)


def test_bad_phase_and_missing_measurements() -> None:
    table = synthetic_table()
    arch = ArchConfig((64, 64), (2, 2))
    with pytest.raises(ValueError, match="phase must be one of"):
        table.predict(arch, "train", 1, 16)
    table.entries = [e for e in table.entries if e.phase == "prefill"]
    with pytest.raises(ValueError, match="no decode measurements"):
        table.predict(arch, "decode", 1, 16)
    with pytest.raises(ValueError, match="arch has 3 layers"):
        table.predict(ArchConfig((64,) * 3, (2,) * 3))


def test_save_load_round_trip_and_device_warning(tmp_path) -> None:
    table = synthetic_table()
    written = table.save(tmp_path)
    assert written == tmp_path / LUT_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = LatencyTable.load(tmp_path, device="cpu")
    assert loaded.to_dict() == table.to_dict()
    table.device_type, table.device_name = "cuda", "NVIDIA H200"
    table.save(tmp_path)
    with pytest.warns(UserWarning, match="measured on cuda .*runs on cpu"):
        LatencyTable.load(tmp_path, device="cpu")
    (tmp_path / LUT_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a Flextron latency table"):
        LatencyTable.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="flextron profile"):
        LatencyTable.load(tmp_path / "missing")


def test_table_of_another_model_is_rejected() -> None:
    table = synthetic_table()
    table.num_layers = 30
    with pytest.raises(ValueError, match="measured for"):
        table.check_model(tiny_flextron().config)


def test_median_times_round_robin() -> None:
    calls: list[str] = []
    times = median_times_ms(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        torch.device("cpu"),
        repeats=3,
        warmup=1,
    )
    assert calls == ["a", "b"] * 4  # interleaved, warm-up included
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_profile_tiny_model_covers_every_choice_and_shape() -> None:
    model = tiny_flextron()
    table = profile_latency(
        model, prefill_shapes=[(1, 8), (2, 8)], decode_shapes=[(1, 16)], repeats=2, warmup=1
    )
    config = model.config
    assert table.shapes("prefill") == [(1, 8), (2, 8)] and table.shapes("decode") == [(1, 16)]
    for entry in table.entries:
        assert sorted(entry.mlp_ms) == config.mlp_choices()
        assert sorted(entry.attention_ms) == config.head_choices()
        assert entry.fixed_ms >= 0 and all(v > 0 for v in entry.mlp_ms.values())
    # Profiling leaves no trace on the model.
    assert not any(p.grad is not None for p in model.parameters())
    for arch in random_archs(config, 3):
        assert table.predict(arch, "decode", 1, 16) > 0


def test_profile_rejects_bad_shapes_and_choices() -> None:
    model = tiny_flextron()
    with pytest.raises(ValueError, match="must be positive and fit the context"):
        profile_latency(model, prefill_shapes=[(1, 4096)], decode_shapes=[], repeats=1)
    with pytest.raises(ValueError, match="not an allowed choice"):
        profile_latency(model, mlp_choices=[100], repeats=1)


def test_thread_count_mismatch_warns(tmp_path) -> None:
    table = synthetic_table()
    table.threads = 2
    table.save(tmp_path)
    with pytest.warns(UserWarning, match="measured with 2 CPU threads, this process uses 1"):
        LatencyTable.load(tmp_path, device="cpu")


def test_cpu_clock_needs_one_cpu_thread() -> None:
    times = median_times_ms({"a": lambda: sum(range(1000))}, torch.device("cpu"), repeats=2, clock="cpu")
    assert times["a"] >= 0
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="one thread"):
        median_times_ms({"a": lambda: None}, torch.device("cpu"), clock="cpu")
    with pytest.raises(ValueError, match="clock must be one of"):
        median_times_ms({"a": lambda: None}, torch.device("cpu"), clock="gpu")


def test_timed_forward_runs_last_position_logits_and_decodes_the_last_token_at_a_fixed_context() -> None:
    model = tiny_flextron()
    ids = torch.randint(3, 300, (2, 9))
    arch = model.arch_for_budget(0.5)
    with torch.inference_mode():
        expected = model(ids, arch)[:, -1]
        prefill = timed_forward(model, (ids,), "prefill", arch)
        torch.testing.assert_close(prefill()[0][:, -1], expected)
        # Decode: the first 8 tokens are prefilled once; every call decodes the 9th at context 8.
        step = timed_forward(model, (ids,), "decode", arch)
        for _ in range(2):
            torch.testing.assert_close(step()[0][:, -1], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="phase must be one of"):
        timed_forward(model, (ids,), "train")
