"""`--model flextron` in lm-evaluation-harness, against `--model hf` on the same weights.

Offline: tiny random models and the shipped flextron_tiny tasks (a local JSONL).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from flextron.cli import main  # noqa: E402
from flextron.integrations.lm_eval_backend import TASKS_DIR, FlextronLM  # noqa: E402
from flextron.model.checkpoint import load_pretrained

# noqa: E402

TASKS = ["flextron_tiny_choice", "flextron_tiny_rolling", "flextron_tiny_generate"]


@pytest.fixture(scope="module")
def models(tiny_hf_dir, tmp_path_factory):
    """Directories: the HF source, its Flextron conversion, and the budget-0.5 export."""
    root = tmp_path_factory.mktemp("lm_eval")
    tiny_hf_dir(root / "hf", kv_heads=2)
    argv = ["--samples", "4", "--seq-len", "32"]
    assert main(["convert", "--model", str(root / "hf"), "--out", str(root / "flextron"), *argv]) == 0
    argv = ["--model", str(root / "flextron"), "--out", str(root / "half"), "--budget", "0.5"]
    assert main(["export", *argv]) == 0
    return root


@pytest.fixture(scope="module")
def tasks() -> TaskManager:
    """One task index for the module: building it scans all of lm-eval's tasks."""
    return TaskManager(include_path=str(TASKS_DIR))


def evaluate(tasks: TaskManager, model: str, model_args: str) -> dict:
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=tasks,
        log_samples=True,
        batch_size=4,
        device="cpu",
    )


def assert_same_results(ours: dict, theirs: dict) -> None:
    """Per request: log-likelihoods within 1e-4, the same greedy generations."""
    for task in TASKS:
        pairs = list(zip(ours["samples"][task], theirs["samples"][task], strict=True))
        assert pairs
        for mine, reference in pairs:
            assert mine["doc_id"] == reference["doc_id"]
            for a, b in zip(mine["resps"], reference["resps"], strict=True):
                if task == "flextron_tiny_generate":
                    assert a == b
                else:
                    value_a, value_b = (r[0] if isinstance(r, tuple | list) else r for r in (a[0], b[0]))
                    assert abs(value_a - value_b) <= 1e-4, (task, value_a, value_b)


def test_full_budget_equals_hf_on_the_source_weights(models, tasks) -> None:
    ours = evaluate(tasks, "flextron", f"pretrained={models / 'flextron'},budget=1.0")
    assert_same_results(ours, evaluate(tasks, "hf", f"pretrained={models / 'hf'},dtype=float32"))


def test_half_budget_equals_hf_on_the_export(models, tasks) -> None:
    ours = evaluate(tasks, "flextron", f"pretrained={models / 'flextron'},budget=0.5")
    assert_same_results(ours, evaluate(tasks, "hf", f"pretrained={models / 'half'},dtype=float32"))


def test_bad_model_arguments(models) -> None:
    with pytest.raises(ValueError, match="latency table"):
        FlextronLM(pretrained=str(models / "flextron"), latency_ms=3.0, device="cpu")
    with pytest.raises(ValueError, match="batch_size 1"):
        FlextronLM(pretrained=str(models / "flextron"), routing="dynamic", batch_size=4, device="cpu")


@pytest.mark.slow  # a fresh process importing lm-eval and indexing its tasks
def test_command_line_with_an_arch_file(models, tmp_path) -> None:
    model = load_pretrained(models / "flextron")
    arch = tmp_path / "half.json"
    arch.write_text(json.dumps(model.arch_for_budget(0.5).to_dict()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flextron.integrations.lm_eval_backend",
            "--model",
            "flextron",
            "--model_args",
            f"pretrained={models / 'flextron'},arch={arch}",
            "--tasks",
            "flextron_tiny_choice",
            "--include_path",
            str(TASKS_DIR),
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert written and "flextron_tiny_choice" in json.loads(written[0].read_text())["results"]
