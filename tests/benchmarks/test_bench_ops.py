"""benchmarks/bench_ops.py checks our results against PyTorch's before it times them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def load_bench():
    path = Path(__file__).parents[2] / "benchmarks" / "bench_ops.py"
    spec = importlib.util.spec_from_file_location("bench_ops", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_check_values_flags_a_wrong_result():
    bench = load_bench()
    expected = torch.randn(64, 32)
    assert bench.check_values("case", "ok", expected + 1e-6, expected)[1]
    wrong = expected.clone()
    wrong[5] = 0  # one row left unwritten
    error, ok = bench.check_values("case", "wrong", wrong, expected)
    assert not ok and error > 0.1
    assert not bench.check_values(
        "case", "nan", [expected, torch.full_like(expected, float("nan"))], [expected, expected]
    )[1]


def test_routed_rows_carry_their_check():
    bench = load_bench()
    case = bench.MlpCase("tiny", tokens=48, hidden=32, d_ff=64, widths=(64, 32))
    device = torch.device("cpu")
    with torch.inference_mode():
        rows = bench.bench_routed(case, device, torch.float32, rounds=1)
    rows += bench.bench_routed_train(case, device, torch.float32, rounds=1, reps=1)
    assert rows and all(row.values_ok for row in rows)
    assert all(row.max_rel_err < 1e-4 for row in rows)


def test_host_overhead_reports_every_op_and_targets_three(capsys):
    bench = load_bench()
    results = bench.bench_host_overhead(rounds=2, calls=5)
    assert {r["op"] for r in results} >= {
        "nested_linear",
        "nested_mlp",
        "route",
        "routed_nested_mlp",
        "varhead_attention",
    }
    assert all(r["us_per_call"] > 0 for r in results)
    targeted = {r["op"] for r in results if r["target_us"] == bench.HOST_OVERHEAD_TARGET_US}
    assert targeted == {"nested_linear", "route", "routed_nested_mlp"}
    assert all(r["passed"] == (r["us_per_call"] <= r["target_us"]) for r in results if r["target_us"])
    assert "routed_nested_mlp" in capsys.readouterr().out
