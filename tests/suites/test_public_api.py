"""The public API: what `import flextron` exposes, documented, and the README's example runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import flextron

README = Path(__file__).resolve().parents[2] / "README.md"


def test_public_names_are_documented():
    for name in flextron.__all__:
        value = getattr(flextron, name)
        assert (value.__doc__ or "").strip(), f"flextron.{name} has no docstring"


def readme_python_example() -> str:
    """The README's first ```python block (the 5-line example)."""
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, "README.md has no python example"
    return match.group(1)


def test_readme_example_is_five_lines():
    lines = [line for line in readme_python_example().splitlines() if line.strip()]
    assert len(lines) == 5, lines


@pytest.mark.slow  # loads the packaged SmolLM2 and generates
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_example_runs(capsys):
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    parameters, answer = capsys.readouterr().out.strip().split("\n", 1)
    assert re.fullmatch(r"\d+\.\dM parameters", parameters)
    assert answer.strip()


PUBLIC_API = {
    "ArchConfig": "flextron.model.config",
    "BudgetConfigs": "flextron.model.budget_configs",
    "FlextronModel": "flextron.model.elastic_model",
    "ModelConfig": "flextron.model.config",
    "generate_text": "flextron.eval.generation",
    "load_model": "flextron.model.loading",
    "ops": "flextron.ops",
}
OPS_API = {
    "OP_NAMES",
    "backends",
    "decoder_layer",
    "nested_linear",
    "nested_linear_int8",
    "nested_mlp",
    "route",
    "routed_nested_mlp",
    "varhead_attention",
}


def test_public_api_is_pinned():
    assert sorted(flextron.__all__) == sorted(PUBLIC_API)
    for name, module in PUBLIC_API.items():
        value = getattr(flextron, name)
        assert (value.__name__ if name == "ops" else value.__module__) == module
    assert set(flextron.ops.__all__) == OPS_API


HEAVY = ("torch", "transformers", "matplotlib", "lm_eval", "datasets")


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter holds after running `code`."""
    script = f"{code}\nimport sys\nprint('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.strip().splitlines()[-1].removeprefix("loaded:")
    return [name for name in loaded.split(",") if name]


def test_import_flextron_loads_no_heavy_library():
    assert _loaded_after("import flextron") == []


def test_help_loads_no_heavy_library():
    code = "from flextron.cli import main\nassert main(['--help']) == 0"
    assert _loaded_after(code) == []


def test_transformers_import_registers_the_auto_classes():
    code = (
        "import flextron, transformers\n"
        "from transformers import AutoConfig\n"
        "assert type(AutoConfig.for_model('flextron')).__name__ == 'FlextronConfig'"
    )
    assert "transformers" in _loaded_after(code)
