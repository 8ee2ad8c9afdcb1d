"""Measuring latency: profiling a table, timed forwards (the timer itself: tests/test_timing.py)."""

from __future__ import annotations

import pytest
import torch

from flextron.latency.profiling import profile_latency, random_archs, timed_forward
from flextron.latency.shape import LatencyShape

pytestmark = pytest.mark.usefixtures("one_thread")


def test_profile_tiny_model_covers_every_choice_and_shape(tiny_flextron) -> None:
    model = tiny_flextron()
    table = profile_latency(
        model, prefill_shapes=[(1, 8), (2, 8)], decode_shapes=[(1, 16)], repeats=2, warmup=1
    )
    config = model.config
    assert table.shapes("prefill") == [LatencyShape("prefill", 1, 8), LatencyShape("prefill", 2, 8)]
    assert table.shapes("decode") == [LatencyShape("decode", 1, 16)]
    for entry in table.entries:
        assert sorted(entry.mlp_ms) == config.mlp_choices()
        assert sorted(entry.attention_ms) == config.head_choices()
        assert entry.fixed_ms >= 0 and all(v > 0 for v in entry.attention_ms.values())
        if entry.phase == "prefill":
            assert all(v > 0 for v in entry.mlp_ms.values())
        else:  # whole layers (one op each): the MLP's increment over its narrowest width
            assert entry.mlp_ms[min(entry.mlp_ms)] == 0 and all(v >= 0 for v in entry.mlp_ms.values())
    # Profiling leaves no trace on the model.
    assert not any(p.grad is not None for p in model.parameters())
    for arch in random_archs(config, 3):
        assert table.predict(arch, LatencyShape("decode", 1, 16)) > 0


def test_an_int8_model_gets_an_int8_table(tiny_flextron, int8_pair) -> None:
    """A table belongs to the weights' type: profiling the int8 model records "int8", and a float
    model is refused that table (and the int8 model a float table)."""
    model = tiny_flextron()
    int8, _ = int8_pair(model)
    table = profile_latency(int8, prefill_shapes=[(1, 8)], decode_shapes=[(1, 16)], repeats=1, warmup=1)
    assert table.dtype == "int8" and int8.weights_dtype == "int8" and model.weights_dtype == "float32"
    table.check_dtype(int8.weights_dtype)
    with pytest.raises(ValueError, match="measured in int8, the model runs in float32"):
        table.check_dtype(model.weights_dtype)


def test_profile_rejects_bad_shapes_and_choices(tiny_flextron) -> None:
    model = tiny_flextron()
    with pytest.raises(ValueError, match="must be positive and fit the context"):
        profile_latency(model, prefill_shapes=[(1, 4096)], decode_shapes=[], repeats=1)
    with pytest.raises(ValueError, match="not an allowed choice"):
        profile_latency(model, mlp_choices=[100], repeats=1)


def test_timed_forward_runs_last_position_logits_and_decodes_the_last_token_at_a_fixed_context(
    tiny_flextron,
) -> None:
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
