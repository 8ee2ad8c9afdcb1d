"""The flextron command line on a tiny Hugging Face directory (in process, fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from flextron.cli import COMMAND_TABLE, main
from flextron.model.checkpoint import load_pretrained


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    """(HF source dir, converted Flextron dir) of a tiny random model."""
    root = tmp_path_factory.mktemp("cli")
    hf = tiny_hf_dir(root / "hf", kv_heads=2)
    out = root / "converted"
    assert (
        main(["convert", "--model", str(root / "hf"), "--out", str(out), "--samples", "4", "--seq-len", "32"])
        == 0
    )
    return hf, out


def test_subcommands_exist() -> None:
    assert {"demo", "convert", "eval", "generate", "export", "info", "bench"} <= set(COMMAND_TABLE)


def test_convert_writes_a_flextron_directory_equal_to_the_source(assert_logits_close, converted) -> None:
    hf, out = converted
    model = load_pretrained(out)
    assert model.importance and model.tokenizer is not None
    ids = torch.randint(0, 300, (1, 19))
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids).logits)


def test_eval_table_json_plot(converted, tmp_path, capsys) -> None:
    _, out = converted
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    argv = [
        "eval",
        "--model",
        str(out),
        "--data",
        str(tmp_path / "text.txt"),
        "--budgets",
        "1,0.5",
        "--seq-len",
        "64",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
    ]
    assert main(argv) == 0
    assert "perplexity" in capsys.readouterr().out
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["budget"] for r in rows] == [1.0, 0.5] and all(r["perplexity"] > 1 for r in rows)
    assert (tmp_path / "r.png").stat().st_size > 0


def test_int8_weights_for_eval_generate_and_bench(converted, tmp_path, capsys) -> None:
    """--dtype int8 runs the inference commands on int8 weights (perplexity close to fp32's);
    commands that train, convert or export refuse it, as does bench --hf."""
    _, out = converted
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    perplexity = {}
    for dtype in ("float32", "int8"):
        argv = ["eval", "--model", str(out), "--dtype", dtype, "--data", str(tmp_path / "text.txt")]
        assert (
            main([*argv, "--budgets", "0.5", "--seq-len", "64", "--json", str(tmp_path / f"{dtype}.json")])
            == 0
        )
        perplexity[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())["results"][0]["perplexity"]
    assert abs(perplexity["int8"] / perplexity["float32"] - 1) < 0.05
    argv = ["--model", str(out), "--dtype", "int8"]
    assert main(["generate", *argv, "--max-new-tokens", "3", "--temperature", "1", "--seed", "0", "hi"]) == 0
    assert (
        main(["bench", *argv, "--budgets", "0.5", "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1"])
        == 0
    )
    capsys.readouterr()
    assert main(["bench", *argv, "--hf", "--prompt-len", "8"]) == 2
    assert "takes no --dtype int8" in capsys.readouterr().err
    assert main(["export", *argv, "--budget", "0.5", "--out", str(tmp_path / "small")]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err and not (tmp_path / "small").exists()


def test_generate_streams_text(converted, capsys) -> None:
    _, out = converted
    # A random model's greedy choice may be EOS or an id the byte tokenizer cannot decode: sample.
    argv = ["generate", "--model", str(out), "--budget", "0.5", "--max-new-tokens", "20"]
    assert main([*argv, "--min-new-tokens", "20", "--temperature", "1", "--seed", "0", "hello"]) == 0
    assert capsys.readouterr().out.strip()


def test_export_budget_loads_in_transformers(assert_logits_close, converted, tmp_path) -> None:
    _, out = converted
    assert main(["export", "--model", str(out), "--budget", "0.5", "--out", str(tmp_path / "small")]) == 0
    hf_small = LlamaForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32).eval()
    model = load_pretrained(out)
    ids = torch.randint(0, 300, (1, 13))
    with torch.no_grad():
        assert_logits_close(hf_small(ids).logits, model(ids, model.arch_for_budget(0.5)))


def test_export_per_layer_arch_file(converted, tmp_path) -> None:
    _, out = converted
    (tmp_path / "arch.json").write_text(json.dumps({"mlp_widths": [64, 256], "heads": [2, 4]}))
    assert (
        main(
            [
                "export",
                "--model",
                str(out),
                "--arch",
                str(tmp_path / "arch.json"),
                "--out",
                str(tmp_path / "mixed"),
            ]
        )
        == 0
    )
    assert load_pretrained(tmp_path / "mixed").config.layer_num_heads == [2, 4]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--budget", "1.5", "hi"], "--budget: expected a number in (0, 1]"),
        (["eval", "--data", "{empty}", "--seq-len", "64"], "no text found"),
        (["info", "--model", "{nowhere}"], "model not found"),
    ],
)
def test_bad_input_gives_a_clear_error(converted, tmp_path, capsys, argv, message) -> None:
    _, out = converted
    (tmp_path / "empty.txt").write_text("")
    argv = [a.format(empty=tmp_path / "empty.txt", nowhere=tmp_path / "nowhere") for a in argv]
    if "--model" not in argv:
        argv[1:1] = ["--model", str(out)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_prompt_longer_than_context(converted, capsys) -> None:
    _, out = converted
    assert main(["generate", "--model", str(out), "--no-chat", "x" * 400]) == 2
    assert "does not fit the model's context" in capsys.readouterr().err


def test_python_dash_m_flextron_help() -> None:
    result = subprocess.run([sys.executable, "-m", "flextron", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout


def test_bench_table_and_json(converted, tmp_path, capsys) -> None:
    _, out = converted
    argv = [
        "bench",
        "--model",
        str(out),
        "--budgets",
        "1,0.5",
        "--prompt-len",
        "8",
        "--new-tokens",
        "3",
        "--repeats",
        "1",
        "--hf",
        "--json",
        str(tmp_path / "speed.json"),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "budget 0.5" in table and "transformers" in table and "decode vs HF" in table
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["budget 1", "transformers", "budget 0.5"]
    assert all(row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 for row in rows)
    assert rows[2]["parameters"] < rows[0]["parameters"] == rows[1]["parameters"]


def test_bench_rejects_bad_settings(converted, capsys) -> None:
    _, out = converted
    assert main(["bench", "--model", str(out), "--budgets", "0.5", "--hf", "--prompt-len", "8"]) == 2
    assert "needs budget 1" in capsys.readouterr().err
    threads = torch.get_num_threads()
    try:
        cpu_clock_two_threads = ["--threads", "2", "--clock", "cpu", "--prompt-len", "8"]
        assert main(["bench", "--model", str(out), *cpu_clock_two_threads]) == 2
    finally:
        torch.set_num_threads(threads)  # --threads set it for the whole process
    assert "clock 'cpu'" in capsys.readouterr().err
    assert main(["bench", "--model", str(out), "--prompt-len", "100000"]) == 2
    assert "does not fit" in capsys.readouterr().err
