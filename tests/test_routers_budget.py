"""Budget-driven inference: budgets and latency targets -> configurations; router files; the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from flextron.budget import BudgetResolver, fit_to_latency, parse_shape
from flextron.checkpoint import load_pretrained, save_pretrained
from flextron.cli import main
from flextron.latency import LUT_FILE, LatencyTable
from flextron.loading import load_model
from flextron.nn.routers import DynamicRouter, StaticRouter, load_routers, save_routers
from flextron.routing import calibration_grid
from tests.test_latency import synthetic_table
from tests.tiny_models import tiny_flextron, tiny_hf_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_dir(tmp_path):
    """A tiny model directory with the synthetic latency table and both routers."""
    model = tiny_flextron()
    save_pretrained(model, tmp_path)
    synthetic_table().save(tmp_path)
    torch.manual_seed(0)
    routers = {
        "static": StaticRouter(model.config, [0.5, 0.75, 1.0], hidden_size=8),
        "dynamic": DynamicRouter(model.config, [0.5, 1.0], hidden_size=8),
    }
    save_routers(tmp_path, routers, {"phase": "prefill", "batch": 1, "length": 16})
    return model, tmp_path, routers


def test_router_files_round_trip(model_dir) -> None:
    model, path, routers = model_dir
    loaded, shape = load_routers(path, model.config)
    assert shape == {"phase": "prefill", "batch": 1, "length": 16}
    for kind, router in routers.items():
        assert type(loaded[kind]) is type(router)
        for (name, a), (_, b) in zip(
            router.state_dict().items(), loaded[kind].state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    assert loaded["static"].arch(0.6) == routers["static"].arch(0.6)


def test_latency_target_becomes_a_budget_with_the_uniform_configuration_nearest(model_dir) -> None:
    model, path, _ = model_dir
    resolver = BudgetResolver(model, path)
    assert resolver.shape == ("prefill", 1, 16)
    # Full model: 2 + 2 * (4 + 2) = 14 ms; 7 ms = budget 0.5.
    selection = resolver.select(latency_ms=7.0, routing="uniform")
    assert selection.budget == pytest.approx(0.5)
    assert selection.arch.is_uniform
    assert selection.predicted_ms == pytest.approx(7.0, rel=0.15)
    assert resolver.table.predict(selection.arch, "prefill", 1, 16) == selection.predicted_ms


def test_latency_target_outside_the_range_names_it(model_dir) -> None:
    model, path, _ = model_dir
    resolver = BudgetResolver(model, path)
    for target in (1.0, 20.0):
        with pytest.raises(ValueError, match=r"achievable range is 6\.000 ms .* to 14\.000 ms"):
            resolver.select(latency_ms=target, routing="uniform")
    with pytest.raises(ValueError, match="not both"):
        resolver.select(budget=0.5, latency_ms=7.0)


def test_static_router_interpolates_between_trained_budgets_and_rejects_others(model_dir) -> None:
    model, path, routers = model_dir
    resolver = BudgetResolver(model, path)
    selection = resolver.select(budget=0.6)  # auto: the static router
    assert selection.routing == "static"
    assert selection.predicted_ms == pytest.approx(0.6 * 14.0, rel=0.05)
    weights = routers["static"].encoder(0.6)
    assert torch.allclose(weights, torch.tensor([[0.6, 0.4, 0.0]]))
    with pytest.raises(ValueError, match=r"budget 0.45 outside the router.s trained range \[0.5, 1\]"):
        resolver.select(budget=0.45)
    # Below the smallest sub-network a budget runs (the smallest), but says it cannot be met.
    with pytest.warns(UserWarning, match=r"budget 0.3 \(4.20 ms\) is below .* 6.00 ms .* are 0.429 to 1"):
        assert resolver.select(budget=0.3, routing="uniform").predicted_ms == pytest.approx(6.0)


def test_dynamic_selection_gives_fresh_sessions(model_dir) -> None:
    model, path, _ = model_dir
    selection = BudgetResolver(model, path).select(budget=0.7, routing="dynamic")
    assert selection.arch is None and selection.router is not None
    first, second = selection.session(2), selection.session(2)
    assert first is not second
    ids = torch.randint(3, 300, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids, router=first), model(ids, router=second))


def test_dynamic_router_is_refused_at_a_shape_it_was_not_calibrated_for(model_dir) -> None:
    model, path, _ = model_dir
    resolver = BudgetResolver(model, path, shape=("decode", 1, 64))
    assert resolver.router_shape == ("prefill", 1, 16)
    with pytest.raises(ValueError, match=r"calibrated for prefill:1x16, not decode:1x64: recalibrate"):
        resolver.select(budget=0.7, routing="dynamic")
    # Static choices are refit to the requested shape's latency.
    selection = resolver.select(budget=0.75, routing="static")
    full = resolver.table.predict(model.full_arch(), "decode", 1, 64)
    assert selection.predicted_ms == pytest.approx(0.75 * full, rel=0.05)


def test_without_table_or_routers(tmp_path) -> None:
    model = tiny_flextron()
    resolver = BudgetResolver(model, None)
    assert resolver.select(budget=0.5).arch == model.arch_for_budget(0.5)
    with pytest.raises(ValueError, match="needs the model's latency table"):
        resolver.select(latency_ms=5.0)
    with pytest.raises(ValueError, match="no static router"):
        resolver.select(budget=0.5, routing="static")


def test_parse_shape() -> None:
    assert parse_shape("decode:4x512") == ("decode", 4, 512)
    with pytest.raises(ValueError, match="prefill:1x128"):
        parse_shape("prefill-1x128")


def test_cli_profile_train_router_and_budget_driven_commands(tmp_path, capsys, monkeypatch) -> None:
    tiny_hf_dir(tmp_path / "hf", kv_heads=2)
    out = tmp_path / "converted"
    assert (
        main(
            [
                "convert",
                "--model",
                str(tmp_path / "hf"),
                "--out",
                str(out),
                "--samples",
                "2",
                "--seq-len",
                "32",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "profile",
                "--model",
                str(out),
                "--prefill",
                "1x16",
                "--decode",
                "1x32",
                "--repeats",
                "2",
                "--check",
                "2",
                "--json",
                str(tmp_path / "check.json"),
            ]
        )
        == 0
    )
    assert (out / LUT_FILE).is_file()
    assert len(json.loads((tmp_path / "check.json").read_text())["checks"]) == 4
    assert "predicted vs measured" in capsys.readouterr().out
    common = ["--seq-len", "16", "--batch-size", "2", "--budgets", "0.5,1", "--hidden-size", "8"]
    assert (
        main(
            [
                "train-router",
                "--model",
                str(out),
                "--steps",
                "4",
                "--finetune-steps",
                "1",
                "--log",
                str(tmp_path / "log.json"),
                *common,
            ]
        )
        == 0
    )
    assert set(json.loads((tmp_path / "log.json").read_text())) == {"surrogate", "joint"}
    assert (
        main(
            [
                "train-router",
                "--model",
                str(out),
                "--kind",
                "dynamic",
                "--mode",
                "end-to-end",
                "--steps",
                "2",
                *common,
            ]
        )
        == 0
    )
    routers, _ = load_routers(out, tiny_flextron().config)
    assert set(routers) == {"static", "dynamic"}
    # Calibrated on the trained budgets and every 0.1 between, from the smallest sub-network up
    # (this tiny model's measured table may put that above 0.5).
    dynamic, table, tiny = routers["dynamic"], LatencyTable.load(out), tiny_flextron()
    full = table.predict(tiny.full_arch(), "prefill", 1, 16)
    smallest = table.latency_range(tiny.config, "prefill", 1, 16, dynamic.mlp_choices, dynamic.head_choices)[
        0
    ]
    assert dynamic.calibration["budgets"] == calibration_grid([0.5, 1.0], smallest / full)[0]
    # Joint fine-tuning alone, from the trained static router; recalibration alone.
    for mode, kind in (("joint", "static"), ("calibrate", "dynamic")):
        args = [
            "train-router",
            "--model",
            str(out),
            "--kind",
            kind,
            "--mode",
            mode,
            "--steps",
            "1",
            "--log",
            str(tmp_path / f"{mode}.json"),
            *common,
        ]
        assert main(args) == 0
    assert set(json.loads((tmp_path / "joint.json").read_text())) == {"joint"}
    assert set(json.loads((tmp_path / "calibrate.json").read_text())) == {"calibration", "overhead"}
    # Calibration on measured latency (timer stubbed: routed forwards "take" 0.6 of the full model),
    # and from here on the synthetic table: this tiny model's measured one is noise (its smallest
    # sub-network may time slower than the full model), which moves the calibration grid.
    synthetic_table().save(out)
    monkeypatch.setattr(
        "flextron.routing.median_times_ms",
        lambda functions, *_: {k: 10.0 if k == "full" else 6.0 for k in functions},
    )
    args = [
        "train-router",
        "--model",
        str(out),
        "--kind",
        "dynamic",
        "--mode",
        "calibrate",
        "--calibrate-by",
        "measured",
        "--calibrate-blocks",
        "2",
        "--log",
        str(tmp_path / "measured.json"),
        *common,
    ]
    assert main(args) == 0
    logged = json.loads((tmp_path / "measured.json").read_text())
    assert set(logged) == {"calibration", "calibration_lut"}
    assert [r["measured_ms"] / r["goal_ms"] for r in logged["calibration"] if r["budget"] == 0.6] == [
        pytest.approx(1.0)
    ]
    assert load_routers(out, tiny_flextron().config)[0]["dynamic"].calibration["offsets"] == [
        r["offset"] for r in logged["calibration"]
    ]
    capsys.readouterr()
    assert main(["train-router", "--model", str(out), "--mode", "calibrate", *common]) == 2
    assert "applies to the dynamic router" in capsys.readouterr().err
    # A dynamic router started at the static router's configurations, with its choices.
    static = load_routers(out, tiny_flextron().config)[0]["static"]
    args = [
        "train-router",
        "--model",
        str(out),
        "--kind",
        "dynamic",
        "--mode",
        "end-to-end",
        "--init",
        "static",
        "--steps",
        "1",
        "--calibrate-blocks",
        "0",
        *common,
    ]
    assert main(args) == 0
    dynamic = load_routers(out, tiny_flextron().config)[0]["dynamic"]
    assert (dynamic.mlp_choices, dynamic.head_choices) == (static.mlp_choices, static.head_choices)
    assert main([*args[:4], "static", *args[5:]]) == 2  # --kind static
    assert "starts a dynamic router" in capsys.readouterr().err
    assert main(["generate", "--model", str(out), "--latency-ms", "100000", "hi"]) == 2
    message = capsys.readouterr().err
    assert "achievable range is" in message and "full model" in message
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--routing",
                "dynamic",
                "--budget",
                "0.7",
                "--max-new-tokens",
                "3",
                "hi",
            ]
        )
        == 0
    )
    assert "dynamic routing at budget 0.700" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                str(out),
                "--routing",
                "static",
                "--budgets",
                "0.5,0.75",
                "--seq-len",
                "16",
                "--max-blocks",
                "2",
                "--json",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["budget"] for r in rows] == [0.5, 0.75] and all(r["predicted_ms"] > 0 for r in rows)
    assert (
        main(
            [
                "eval",
                "--model",
                str(out),
                "--routing",
                "dynamic",
                "--budgets",
                "0.6",
                "--seq-len",
                "16",
                "--max-blocks",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "export",
                "--model",
                str(out),
                "--out",
                str(tmp_path / "small"),
                "--budget",
                "0.5",
                "--routing",
                "static",
            ]
        )
        == 0
    )
    model = load_pretrained(out)
    chosen = BudgetResolver(model, out).select(budget=0.5, routing="static").arch
    assert load_model(tmp_path / "small").num_parameters() == model.num_parameters(chosen)
    # export takes static configurations only
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "bad"), "--routing", "dynamic"]) == 2
    # One latency shape per directory: training the static router at another shape would mislabel
    # the dynamic router's calibration; recalibrating the dynamic router moves the directory to it.
    capsys.readouterr()
    decode = ["--latency-shape", "decode:1x64"]
    assert (
        main(["train-router", "--model", str(out), "--steps", "1", "--finetune-steps", "0", *decode, *common])
        == 2
    )
    assert "calibrated for prefill:1x16" in capsys.readouterr().err
    calibrate = [
        "train-router",
        "--model",
        str(out),
        "--kind",
        "dynamic",
        "--mode",
        "calibrate",
        "--calibrate-blocks",
        "1",
        *decode,
        *common,
    ]
    assert main([*calibrate, "--calibrate-by", "measured"]) == 2  # refused before any work
    assert "measured times prefill shapes" in capsys.readouterr().err
    assert main(calibrate) == 0
    assert load_routers(out, tiny_flextron().config)[1] == {"phase": "decode", "batch": 1, "length": 64}
    assert (
        main(["train-router", "--model", str(out), "--steps", "1", "--finetune-steps", "0", *common]) == 0
    )  # the static router, by default at the directory's shape
    assert load_routers(out, tiny_flextron().config)[1]["phase"] == "decode"
    generate = [
        "generate",
        "--model",
        str(out),
        "--routing",
        "dynamic",
        "--budget",
        "0.8",
        "--max-new-tokens",
        "2",
        "hi",
    ]
    assert main(generate) == 0
    assert main([*generate, "--latency-shape", "prefill:1x16"]) == 2
    assert "calibrated for decode:1x64, not prefill:1x16" in capsys.readouterr().err
    # A budget out of reach runs (the smallest sub-network) with a one-line warning.
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--routing",
                "uniform",
                "--budget",
                "0.3",
                "--max-new-tokens",
                "1",
                "hi",
            ]
        )
        == 0
    )
    assert "flextron generate: warning: budget 0.3 (0.26 ms) is below" in capsys.readouterr().err


def test_fit_to_latency_nudges_the_router_configuration_into_the_band(model_dir) -> None:
    model, _, routers = model_dir
    router, table, shape = routers["static"], synthetic_table(), ("prefill", 1, 16)
    for budget in (0.5, 0.75, 1.0):
        arch = fit_to_latency(router, budget, table, budget * 14.0, shape)
        assert table.predict(arch, *shape) == pytest.approx(budget * 14.0, rel=0.05)
    # Already inside the band: the router's own choice is kept.
    raw = router.arch(0.75)
    target = table.predict(raw, *shape)
    assert fit_to_latency(router, 0.75, table, target, shape) == raw
