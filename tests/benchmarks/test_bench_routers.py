"""benchmarks/bench_routers.py end to end on a tiny model (synthetic LUT, untrained routers)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.model.budget_configs import BudgetConfigs
from flextron.model.checkpoint import save_pretrained
from flextron.model.config import arch_for_budget
from flextron.routers import DynamicRouter, StaticRouter, save_routers
from flextron.routers.sequence import SequenceRouter

pytestmark = pytest.mark.usefixtures("one_thread")


def load_bench():
    path = Path(__file__).parents[2] / "benchmarks" / "bench_routers.py"
    spec = importlib.util.spec_from_file_location("bench_routers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_routers_times_every_routing_in_one_round_and_compares_with_static_at_measured_latency(
    synthetic_table,
    tiny_flextron,
    tiny_tokenizer,
    tmp_path,
):
    model = tiny_flextron()
    model.tokenizer = tiny_tokenizer()
    half = arch_for_budget(model.config, 0.5)
    model.budget_configs = BudgetConfigs(
        [
            {
                "budget": 0.5,
                "arch": half.to_dict(),
                "loss": 1.0,
                "rule_loss": 1.0,
                "parameters": model.num_parameters(half),
            }
        ]
    )
    save_pretrained(model, tmp_path / "model")
    synthetic_table().save(tmp_path / "model")
    torch.manual_seed(0)
    routers = {
        "static": StaticRouter(model.config, [0.5, 1.0], hidden_size=8),
        "dynamic": DynamicRouter(model.config, [0.5, 1.0], hidden_size=8),
        "sequence": SequenceRouter(model.config, [half, model.full_arch()]),
    }
    with torch.no_grad():
        routers["sequence"].weight.normal_()
        routers["sequence"].validation_loss.copy_(torch.tensor([2.0, 1.0]))
    save_routers(tmp_path / "model", routers, LatencyShape("prefill", 1, 16))
    out = tmp_path / "out"
    args = [
        "--model",
        str(tmp_path / "model"),
        "--data",
        "builtin",
        "--routings",
        "uniform,static,dynamic,sequence,trained",
        "--budgets",
        "0.6,0.8",
        "--curve-budgets",
        "0.5,1.0",
        "--oracle",
        "--eval-blocks",
        "3",
        "--seq-len",
        "16",
        "--prefix",
        "4",
        "--repeats",
        "2",
        "--timing-blocks",
        "2",
        "--out",
        str(out),
    ]
    assert load_bench().main(args) == 0
    summary = json.loads((out / "routers.json").read_text())
    assert summary["timing_blocks"] == 2 and summary["full_ms_measured"] > 0 and summary["prefix"] == 4
    assert [(r["routing"], r["budget"]) for r in summary["rows"]] == [
        *[(routing, b) for routing in ("uniform", "static") for b in (0.5, 0.6, 0.8, 1.0)],
        *[("dynamic", b) for b in (0.6, 0.8)],
        *[("sequence", b) for b in (0.6, 0.8)],
        *[("trained", b) for b in (0.5, 1.0)],  # the model's budget configurations and the full model
        *[("oracle", b) for b in (0.6, 0.8)],
    ]
    trained = [r for r in summary["rows"] if r["routing"] == "trained"]
    assert trained[0]["arch"] == half.to_dict() and trained[1]["arch"] == model.full_arch().to_dict()
    for row in summary["rows"]:
        assert row["fraction_of_full"] == pytest.approx(row["measured_ms"] / summary["full_ms_measured"])
        assert row["overhead"] == pytest.approx(row["fraction_of_full"] - row["lut_fraction"])
        losses = summary["block_losses"][f"{row['routing']} {row['budget']:g}"]
        assert len(losses) == 3 and row["perplexity"] == pytest.approx(math.exp(sum(losses) / 3))
        references = {
            "dynamic": ["static"],
            "sequence": ["static", "trained"],
            "oracle": ["static"],
            "static": ["uniform", "trained"],
        }
        for reference in references.get(row["routing"], []):
            versus = row[f"vs_{reference}"]
            assert versus["fraction"] == row["fraction_of_full"] and versus["standard_error"] >= 0
            assert versus["ratio"] == pytest.approx(math.exp(versus["log_ppl_difference"]))
    sequence = [r for r in summary["rows"] if r["routing"] == "sequence"]
    smallest, largest = model.num_parameters(half), model.num_parameters()
    assert all(0 <= r["wide_share"] <= 1 and smallest <= r["parameters"] <= largest for r in sequence)
    oracle = [r for r in summary["rows"] if r["routing"] == "oracle"]
    assert all("vs_static_paying_overhead" in r and r["multiplier"] >= 0 for r in oracle)
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
        "--curve-budgets",
        "0.9",
        "--data",
        "builtin",
        "--latency-shape",
        "decode:1x64",
        "--eval-blocks",
        "2",
        "--seq-len",
        "16",
        "--prefix",
        "4",
        "--out",
        str(out),
    ]
    assert load_bench().main(args) == 0
    summary = json.loads((out / "routers.json").read_text())
    assert summary["shape"] == {"phase": "decode", "batch": 1, "length": 64}
    assert summary["timing_blocks"] == 4  # the decode default: one timed token per block
    full = synthetic_table().predict(model.full_arch(), LatencyShape("decode", 1, 64))
    assert summary["full_ms_lut"] == pytest.approx(full)
