"""The public API: what `import flextron` exposes, documented, and the README's example runs."""

from __future__ import annotations

import re
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
