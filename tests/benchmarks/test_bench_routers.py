"""benchmarks/bench_routers.py end to end on a tiny model (synthetic LUT, untrained routers)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.model.checkpoint import save_pretrained
from flextron.routers import DynamicRouter, StaticRouter, save_routers

pytestmark = pytest.mark.usefixtures("one_thread")


def load_bench():
    path = Path(__file__).parents[2] / "benchmarks" / "bench_routers.py"
    spec = importlib.util.spec_from_file_location("bench_routers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_routers_reports_each_budget_against_the_lut_and_the_full_model_of_the_same_round(
    synthetic_table, tiny_flextron, tiny_tokenizer, tmp_path
):
    model = tiny_flextron()
    model.tokenizer = tiny_tokenizer()
    save_pretrained(model, tmp_path / "model")
    synthetic_table().save(tmp_path / "model")
    torch.manual_seed(0)
    routers = {
        "static": StaticRouter(model.config, [0.5, 1.0], hidden_size=8),
        "dynamic": DynamicRouter(model.config, [0.5, 1.0], hidden_size=8),
    }
    save_routers(tmp_path / "model", routers, LatencyShape("prefill", 1, 16))
    out = tmp_path / "out"
    args = [
        "--model",
        str(tmp_path / "model"),
        "--budgets",
        "0.6,1.0",
        "--eval-blocks",
        "2",
        "--seq-len",
        "16",
        "--repeats",
        "2",
        "--timing-blocks",
        "2",
        "--speedup-batch",
        "2",
        "--out",
        str(out),
    ]
    assert load_bench().main(args) == 0
    summary = json.loads((out / "routers.json").read_text())
    assert summary["timing_blocks"] == 2 and summary["full_ms_measured"] > 0
    assert [(r["routing"], r["budget"]) for r in summary["rows"]] == [
        (routing, budget) for routing in ("uniform", "static", "dynamic") for budget in (0.6, 1.0)
    ]
    for row in summary["rows"]:
        assert row["target_ms"] == pytest.approx(row["budget"] * summary["full_ms_lut"])
        assert row["fraction_of_full"] == pytest.approx(row["measured_ms"] / summary["full_ms_measured"])
        assert row["fraction_error"] == pytest.approx(row["fraction_of_full"] / row["budget"] - 1)
        assert row["perplexity"] > 1
    assert [s["budget"] for s in summary["dynamic_speedup"]] == [0.6]
    assert (out / "routers_pareto.png").is_file()


def test_bench_routers_at_a_decode_shape_times_one_cached_step(
    synthetic_table, tiny_flextron, tiny_tokenizer, tmp_path
):
    model = tiny_flextron()
    model.tokenizer = tiny_tokenizer()
    save_pretrained(model, tmp_path / "model")
    synthetic_table().save(tmp_path / "model")  # has decode 1x64
    torch.manual_seed(0)
    save_routers(
        tmp_path / "model",
        {"static": StaticRouter(model.config, [0.5, 1.0], hidden_size=8)},
        LatencyShape("prefill", 1, 16),
    )
    out = tmp_path / "out"
    args = [
        "--model",
        str(tmp_path / "model"),
        "--budgets",
        "0.8,1.0",
        "--routings",
        "uniform,static",
        "--latency-shape",
        "decode:1x64",
        "--eval-blocks",
        "2",
        "--seq-len",
        "16",
        "--out",
        str(out),
    ]
    assert load_bench().main(args) == 0
    summary = json.loads((out / "routers.json").read_text())
    assert (
        summary["shape"] == {"phase": "decode", "batch": 1, "length": 64} and summary["dynamic_speedup"] == []
    )
    assert summary["timing_blocks"] == 4  # the decode default: one timed token per block
    full = synthetic_table().predict(model.full_arch(), LatencyShape("decode", 1, 64))
    assert summary["full_ms_lut"] == pytest.approx(full)
