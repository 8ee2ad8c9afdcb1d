"""Hub ids through the Hugging Face cache, and --dtype / --device on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flextron.cli import command_options, main
from flextron.io.hub import is_hub_id, resolve_model_dir
from flextron.io.weight_readers import read_safetensors
from flextron.model.checkpoint import load_pretrained, save_pretrained
from flextron.model.loading import load_model
from flextron.model.placement import parse_dtype

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(hf_home: Path, repo_id: str, write) -> Path:
    """Lay out a hub cache entry as huggingface_hub does (refs/main -> snapshots/COMMIT/)."""
    storage = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    write(snapshot)
    return snapshot


def test_hub_ids_load_offline_from_a_filled_cache(
    tiny_flextron, tiny_hf_dir, tiny_tokenizer, tmp_path
) -> None:
    home = tmp_path / "hf_home"
    fill_cache(home, "tiny-org/tiny-llama", lambda path: tiny_hf_dir(path, kv_heads=2))

    def write_flextron(path: Path) -> None:
        model = tiny_flextron(kv_heads=2)
        model.tokenizer = tiny_tokenizer()
        save_pretrained(model, path)

    fill_cache(home, "tiny-org/tiny-flextron", write_flextron)
    # A fresh process: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported.
    script = """
import sys
from transformers import AutoModelForCausalLM
from flextron.cli import main
print("info", main(["info", "--model", "tiny-org/tiny-llama", "--budgets", "1"]))
model = AutoModelForCausalLM.from_pretrained("tiny-org/tiny-flextron").at(0.5)
print("auto", type(model).__name__, list(model.arch.heads))
print("missing", main(["info", "--model", "tiny-org/not-cached"]))
"""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"hidden_size": 64' in result.stdout and "info 0" in result.stdout
    assert "auto FlextronForCausalLM [2, 2]" in result.stdout
    assert "missing 2" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("flextron info: error:")]
    assert len(errors) == 1 and "Hugging Face cache" in errors[0]


def test_local_paths_are_not_hub_ids(tmp_path, monkeypatch) -> None:
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M") and not is_hub_id("model.gguf")
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name") and resolve_model_dir("org/name") == "org/name"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_loading_in_a_dtype_matches_casting(tiny_hf_dir, tmp_path, dtype) -> None:
    tiny_hf_dir(tmp_path / "hf", kv_heads=2)
    full = load_model(tmp_path / "hf")
    cast = load_model(tmp_path / "hf", parse_dtype(dtype))
    for name, tensor in full.state_dict().items():
        assert torch.equal(cast.state_dict()[name], tensor.to(parse_dtype(dtype))), name
    save_pretrained(full, tmp_path / "flextron")
    again = load_model(tmp_path / "flextron", parse_dtype(dtype))
    assert all(t.dtype == parse_dtype(dtype) for t in again.state_dict().values())
    # Integer tensors keep their dtype.
    from safetensors.torch import save_file

    save_file({"ids": torch.arange(5), "x": torch.ones(3)}, str(tmp_path / "mixed.safetensors"))
    mixed = read_safetensors(tmp_path / "mixed.safetensors", torch.bfloat16)
    assert mixed["ids"].dtype == torch.int64 and mixed["x"].dtype == torch.bfloat16


def test_dtype_and_device_options_on_every_loading_command() -> None:
    for name in ("convert", "eval", "generate", "export", "profile", "bench"):
        assert {"--dtype", "--device"} <= set(command_options(name)), name


def test_commands_run_in_bfloat16(tiny_hf_dir, tmp_path, capsys) -> None:
    tiny_hf_dir(tmp_path / "hf", kv_heads=2)
    source = str(tmp_path / "hf")
    assert main(["generate", "--model", source, "--dtype", "bfloat16", "hello", "--max-new-tokens", "4"]) == 0
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 10)
    assert (
        main(
            [
                "eval",
                "--model",
                source,
                "--dtype",
                "bfloat16",
                "--data",
                str(tmp_path / "text.txt"),
                "--budgets",
                "1,0.5",
                "--seq-len",
                "32",
            ]
        )
        == 0
    )
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_hf_dir, tmp_path, capsys) -> None:
    tiny_hf_dir(tmp_path / "hf")
    assert main(["generate", "--model", str(tmp_path / "hf"), "--device", "cuda", "hi"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_float16_load_keeps_budget_configs(tiny_flextron, tmp_path) -> None:
    """budget_configs.json's fingerprint rounds to bfloat16: a float16 load checks the file as stored."""
    from flextron.conversion.budget_search import choose_budget_configs
    from flextron.model.budget_configs import FILE

    model = tiny_flextron()
    model.budget_configs = choose_budget_configs(model, torch.randint(3, 300, (2, 16)), progress=False)
    save_pretrained(model, tmp_path)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        loaded = load_pretrained(tmp_path, dtype)
        assert loaded.budget_configs is not None and loaded.embed_tokens.weight.dtype == dtype
    stale = tiny_flextron(seed=1)
    save_pretrained(stale, tmp_path / "other")
    (tmp_path / "other" / FILE).write_bytes((tmp_path / FILE).read_bytes())
    with pytest.raises(ValueError, match="stale"):
        load_pretrained(tmp_path / "other", torch.float16)
