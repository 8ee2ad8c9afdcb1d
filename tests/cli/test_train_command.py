"""`flextron train` on a tiny converted model: run, resume, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from flextron.cli import main
from flextron.model.checkpoint import load_pretrained
from flextron.train.metrics import read_metrics


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    """(converted Flextron dir, a text file) for a tiny random model."""
    root = tmp_path_factory.mktemp("train-cli")
    tiny_hf_dir(root / "hf", kv_heads=2)
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    argv = [
        "convert",
        "--model",
        str(root / "hf"),
        "--out",
        str(root / "converted"),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--calib",
        str(text),
    ]
    assert main(argv) == 0
    return root / "converted", text


def train_argv(model, text, out, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--out",
        str(out),
        "--data",
        str(text),
        "--seq-len",
        "32",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--eval-every",
        "2",
        "--save-every",
        "0",
        "--eval-budgets",
        "1,0.5",
        "--lr",
        "1e-3",
        *extra,
    ]


def test_train_stop_and_resume(converted, tmp_path, capsys) -> None:
    model, text = converted
    assert main(train_argv(model, text, tmp_path, "--stop-after", "2")) == 0
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert main(train_argv(model, text, tmp_path, "--resume")) == 0
    assert "validation perplexity: budget 1:" in capsys.readouterr().out
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["step_seconds"] > 0 for r in records if "loss" in r)  # whole-step wall time
    assert [r["step"] for r in records if "val" in r] == [0, 2, 4]
    assert (tmp_path / "metrics.png").is_file()
    trained = load_pretrained(tmp_path / "checkpoints" / "step-000004")
    assert trained.tokenizer is not None and trained.importance  # a complete model directory


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rule", "latency"], "invalid choice: 'latency'"),
        (["--batch-size", "500"], "batch size 500 is larger than the data"),
        (["--p-full", "2"], "--p-full: expected a number in [0, 1]"),
        (["--budget-weights", "0,0,0"], "--budget-weights: expected comma-separated weights >= 0"),
        (["--budget-weights", "1,2"], "budget weights [1.0, 2.0] must be one number >= 0 per budget"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_settings_are_clear_errors(converted, tmp_path, capsys, extra, message) -> None:
    model, text = converted
    assert main(train_argv(model, text, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err


def test_empty_data_is_a_clear_error(converted, tmp_path, capsys) -> None:
    model, _ = converted
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main(train_argv(model, empty, tmp_path / "run")) == 2
    assert "no text found" in capsys.readouterr().err


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_avx512_bf16_warns(converted, tmp_path, capsys, monkeypatch, fast) -> None:
    model, text = converted
    monkeypatch.setattr("flextron.ops.info.bf16_is_fast", lambda device="cpu": fast)
    extra = ("--bf16", "--steps", "1", "--eval-every", "0", "--device", "cpu")
    assert main(train_argv(model, text, tmp_path, *extra)) == 0
    warned = "this CPU has no AVX-512 BF16, so --bf16 runs slower than fp32 here" in capsys.readouterr().err
    assert warned == (not fast)
