"""The latency lookup table: cost model, interpolation between shapes and choices, files, warnings."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.latency.table import LUT_FILE, LatencyTable
from flextron.model.config import ArchConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_predict_is_fixed_plus_per_layer_choices(synthetic_table) -> None:
    table = synthetic_table()
    arch = ArchConfig((64, 256), (2, 4))
    # fixed 2 + mlp (1 + 4) + heads (1 + 2)
    assert table.predict(arch, LatencyShape("prefill", 1, 16)) == pytest.approx(10.0)
    assert table.predict(arch, LatencyShape("prefill", 2, 32)) == pytest.approx(40.0)


def test_costs_interpolate_between_profiled_shapes_and_choices(synthetic_table) -> None:
    table = synthetic_table()
    arch = ArchConfig((64, 256), (2, 4))
    # Length 24 is halfway between 16 and 32; batch 2 length 24 likewise; width 96 between 64 and 128.
    assert table.predict(arch, LatencyShape("prefill", 1, 24)) == pytest.approx(15.0)
    assert table.predict(arch, LatencyShape("prefill", 2, 24)) == pytest.approx(30.0)
    assert table.predict(ArchConfig((96, 96), (2, 2)), LatencyShape("prefill", 1, 16)) == pytest.approx(
        2 + 1.5 * 2 + 2
    )
    # Beyond the profiled range: linear extrapolation.
    assert table.predict(arch, LatencyShape("prefill", 1, 48)) == pytest.approx(30.0)


def test_target_outside_the_achievable_range_names_the_range(synthetic_table, tiny_flextron) -> None:
    table = synthetic_table()
    model = tiny_flextron()
    low, high = table.latency_range(model.config, LatencyShape("prefill", 1, 16))
    assert (low, high) == pytest.approx((2 + 2 * 1 + 2 * 1, 2 + 2 * 4 + 2 * 2))
    assert table.check_target(7.0, model.config, LatencyShape("prefill", 1, 16)) == pytest.approx(0.5)
    for bad in (low * 0.9, high * 1.1):
        with pytest.raises(ValueError, match="achievable range is 6.000 ms .* to 14.000 ms"):
            table.check_target(bad, model.config, LatencyShape("prefill", 1, 16))


def test_bad_phase_and_missing_measurements(synthetic_table) -> None:
    table = synthetic_table()
    arch = ArchConfig((64, 64), (2, 2))
    with pytest.raises(ValueError, match="phase must be one of"):
        table.predict(arch, LatencyShape("train", 1, 16))
    table.entries = [e for e in table.entries if e.phase == "prefill"]
    with pytest.raises(ValueError, match="no decode measurements"):
        table.predict(arch, LatencyShape("decode", 1, 16))
    with pytest.raises(ValueError, match="arch has 3 layers"):
        table.predict(ArchConfig((64,) * 3, (2,) * 3))


def test_save_load_round_trip_and_device_warning(synthetic_table, tmp_path) -> None:
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


def test_table_of_another_model_is_rejected(synthetic_table, tiny_flextron) -> None:
    table = synthetic_table()
    table.num_layers = 30
    with pytest.raises(ValueError, match="measured for"):
        table.check_model(tiny_flextron().config)


def test_table_of_another_dtype_is_refused(synthetic_table) -> None:
    table = synthetic_table()
    table.check_dtype("float32")
    with pytest.raises(ValueError, match="measured in float32, the model runs in bfloat16: load the model"):
        table.check_dtype("bfloat16")
    with pytest.raises(ValueError, match="measured in float32, the model runs in int8"):
        table.check_dtype("int8")


def test_a_router_session_refuses_a_table_of_another_dtype(synthetic_table, tiny_flextron, tmp_path) -> None:
    from flextron.routers.selection import BudgetResolver

    synthetic_table().save(tmp_path)
    model = tiny_flextron()
    assert BudgetResolver(model, tmp_path).table is not None
    with pytest.raises(ValueError, match="profile --dtype bfloat16"):
        BudgetResolver(model.to(torch.bfloat16), tmp_path)


def test_thread_count_mismatch_warns(synthetic_table, tmp_path) -> None:
    table = synthetic_table()
    table.threads = 2
    table.save(tmp_path)
    with pytest.warns(UserWarning, match="measured with 2 CPU threads, this process uses 1"):
        LatencyTable.load(tmp_path, device="cpu")
