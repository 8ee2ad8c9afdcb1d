"""`flextron train-router` (the pipeline) with profile and the budget-driven commands, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from flextron.cli import main
from flextron.eval.perplexity import perplexity
from flextron.latency.shape import LatencyShape
from flextron.latency.table import LUT_FILE, LatencyTable
from flextron.model.checkpoint import load_pretrained
from flextron.model.config import ArchConfig
from flextron.model.loading import load_model
from flextron.routers import (
    BudgetResolver,
    RouterTrainingConfig,
    StaticRouter,
    calibration_grid,
    load_routers,
    pipeline,
)
from flextron.routers.pipeline import _Job, _keep_better_starts

pytestmark = pytest.mark.usefixtures("one_thread")


def _converted(tiny_hf_dir, tmp_path):
    """A tiny model converted by the CLI (with its budgets' configurations): its directory."""
    tiny_hf_dir(tmp_path / "hf", kv_heads=2)
    out = tmp_path / "converted"
    args = [
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
    assert main(args) == 0
    return out


def test_cli_profile_train_router_and_budget_driven_commands(
    synthetic_table, tiny_flextron, tiny_hf_dir, tmp_path, capsys, monkeypatch
) -> None:
    out = _converted(tiny_hf_dir, tmp_path)
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
    full = table.predict(tiny.full_arch(), LatencyShape("prefill", 1, 16))
    smallest = table.latency_range(
        tiny.config, LatencyShape("prefill", 1, 16), dynamic.mlp_choices, dynamic.head_choices
    )[0]
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
        "flextron.routers.calibration.times_ms",
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
    chosen = BudgetResolver(model, out).select(budget=0.5, method="static").arch
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
    assert load_routers(out, tiny_flextron().config)[1] == LatencyShape("decode", 1, 64)
    assert (
        main(["train-router", "--model", str(out), "--steps", "1", "--finetune-steps", "0", *common]) == 0
    )  # the static router, by default at the directory's shape
    assert load_routers(out, tiny_flextron().config)[1].phase == "decode"
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


def test_a_static_router_keeps_its_start_where_training_did_not_improve_on_it(
    synthetic_table, tiny_flextron
) -> None:
    """Per budget: the start comes back where it has lower probe loss at no more predicted latency."""
    model, table, shape = tiny_flextron(), synthetic_table(), LatencyShape("prefill", 1, 16)
    router = StaticRouter(model.config, [0.5, 1.0], mlp_choices=[256, 128, 64], hidden_size=8)
    layers = model.config.num_layers
    narrow = ArchConfig((64,) * layers, (2,) * layers)
    wider = ArchConfig((128,) * layers, (2,) * layers)  # what "training" found: slower
    router.init_to({0.5: wider, 1.0: model.full_arch()})
    probe = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    reports = []
    job = _Job(model, None, RouterTrainingConfig(), table, shape, reports.append)
    # A start slower than the trained choice is never taken back.
    _keep_better_starts(job, router, {0.5: model.full_arch(), 1.0: model.full_arch()}, probe)
    assert router.arch(0.5) == wider and not reports
    _keep_better_starts(job, router, {0.5: narrow, 1.0: model.full_arch()}, probe)
    better = perplexity(model, probe, narrow)[0] < perplexity(model, probe, wider)[0]
    assert router.arch(0.5) == (narrow if better else wider) and router.arch(1.0) == model.full_arch()
    assert bool(reports) == better


def test_a_static_router_takes_a_trained_configuration_within_its_budget_where_it_is_better(
    synthetic_table, tiny_flextron, monkeypatch
) -> None:
    """A configuration the model was trained at, predicted within the budget, replaces what
    training found where its probe loss is lower; one beyond the budget never does."""
    model, table, shape = tiny_flextron(), synthetic_table(), LatencyShape("prefill", 1, 16)
    router = StaticRouter(model.config, [0.5, 1.0], mlp_choices=[256, 128, 64], hidden_size=8)
    layers = model.config.num_layers
    narrow, wider = ArchConfig((64,) * layers, (2,) * layers), ArchConfig((128,) * layers, (4,) * layers)
    full = model.full_arch()
    monkeypatch.setattr(pipeline, "trained_configurations", lambda _: {0.25: narrow, 1.0: full})
    reports = []
    job = _Job(model, None, RouterTrainingConfig(), table, shape, reports.append)
    for seed in range(8):  # probes on which the trained configuration is better, and worse
        probe = torch.randint(
            0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed)
        )
        router.init_to({0.5: wider, 1.0: full})
        reports.clear()
        _keep_better_starts(job, router, {0.5: wider, 1.0: full}, probe)
        ppl = {arch: perplexity(model, probe, arch)[0] for arch in (narrow, wider, full)}
        assert router.arch(0.5) == min((wider, narrow), key=ppl.get)  # full is beyond budget 0.5
        assert router.arch(1.0) == min((full, narrow), key=ppl.get)
        replaced = ppl[narrow] < min(ppl[wider], ppl[full])
        assert bool(reports) == (ppl[narrow] < max(ppl[wider], ppl[full]))
        assert not replaced or "a trained configuration" in reports[0]


def test_cli_fits_the_sequence_router_and_routes_generate_eval_and_refuses_export(
    synthetic_table, tiny_hf_dir, tmp_path, capsys
) -> None:
    out = _converted(tiny_hf_dir, tmp_path)
    assert main(["train-router", "--model", str(out), "--kind", "sequence"]) == 2  # no latency table yet
    assert "flextron profile" in capsys.readouterr().err
    synthetic_table().save(out)
    static = ["--steps", "2", "--finetune-steps", "0", "--seq-len", "16", "--budgets", "0.5,0.75,1"]
    assert main(["train-router", "--model", str(out), "--hidden-size", "8", *static]) == 0
    capsys.readouterr()
    fit = ["train-router", "--model", str(out), "--kind", "sequence", "--seq-len", "16", "--prefix", "4"]
    sizes = ["--sequence-blocks", "6", "--validation-blocks", "4", "--log", str(tmp_path / "log.json")]
    assert main([*fit, *sizes]) == 0
    captured = capsys.readouterr()
    assert "saved the sequence router" in captured.out and "of the full model's latency" in captured.out
    model = load_pretrained(out)
    static_archs = {BudgetResolver(model, out).select(b, method="static").arch for b in (0.5, 0.75, 1.0)}
    trained_archs = {model.arch_for_budget(b) for b in model.budget_configs.budgets()} | {model.full_arch()}
    # The candidates: the trained configurations and the static router's, each once.
    assert f"losses of {len(static_archs | trained_archs)} candidates" in captured.err
    router = load_routers(out, model.config)[0]["sequence"]
    # Those on the validation hull, ascending in latency.
    assert set(router.configurations) <= static_archs | trained_archs
    assert len(json.loads((tmp_path / "log.json").read_text())["sequence"]) == len(router.configurations) - 1
    assert main([*fit, "--mode", "joint"]) == 2
    assert "leave --mode out" in capsys.readouterr().err
    generate = ["generate", "--model", str(out), "--routing", "sequence", "--budget", "0.8"]
    assert main([*generate, "--max-new-tokens", "2", "hi"]) == 0
    assert "sequence routing at budget 0.800" in capsys.readouterr().err
    evaluate = ["eval", "--model", str(out), "--routing", "sequence", "--budgets", "0.6,0.9"]
    assert (
        main([*evaluate, "--seq-len", "16", "--max-blocks", "2", "--json", str(tmp_path / "eval.json")]) == 0
    )
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["budget"] for r in rows] == [0.6, 0.9] and all(r["perplexity"] > 0 for r in rows)
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "bad"), "--routing", "sequence"]) == 2
