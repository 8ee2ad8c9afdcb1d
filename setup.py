"""Build flextron._C through CMake + ninja.

Environment switches:
  FLEXTRON_CUDA=auto|0|1      build the CUDA kernels (auto: when nvcc and a CUDA torch exist)
  FLEXTRON_CUDA_ARCHS="80;90a" compute capabilities to compile for
  CUTLASS_DIR=...              a CUTLASS checkout (default: the nvidia-cutlass wheel's headers)
  MAX_JOBS=N                   parallel compile jobs
  FLEXTRON_BUILD_DIR=...       CMake build directory (default: build/<python tag>); kept
                               between builds so rebuilds are incremental

Install with `pip install -e . --no-build-isolation` (or without -e); see the README.
The package requires exactly the torch it was built with (torch==<version>): the extension
links against that torch's C++ ABI, which changes between releases.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEPENDENCIES = [
    "numpy",
    "safetensors",
    "gguf",
    "transformers",
    "huggingface_hub",
    "accelerate",
    "tqdm",
    "matplotlib",
]


def torch_requirement() -> str:
    """torch==<the version building this>, without its local tag (2.14.1+cu130 -> 2.14.1)."""
    import torch  # a build requirement (pyproject.toml), so importable here

    return f"torch=={torch.__version__.split('+')[0]}"


def build_tool(name: str) -> str:
    """cmake/ninja from their pip packages when installed (a system cmake may be too old)."""
    try:
        if name == "cmake":
            import cmake

            return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return name


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        # Where setuptools expects the module (the package dir for -e/--inplace).
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        tag = sysconfig.get_config_var("SOABI") or "default"
        build_dir = Path(os.environ.get("FLEXTRON_BUILD_DIR", ROOT / "build" / tag)).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            build_tool("cmake"),
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={build_tool('ninja')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFLEXTRON_CUDA={os.environ.get('FLEXTRON_CUDA', 'auto')}",
            f"-DFLEXTRON_CUDA_ARCHS={os.environ.get('FLEXTRON_CUDA_ARCHS', '80;90a')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if "CUTLASS_DIR" in os.environ:
            configure.append(f"-DCUTLASS_DIR={os.environ['CUTLASS_DIR']}")
        subprocess.run(configure, check=True)
        build = [build_tool("cmake"), "--build", str(build_dir)]
        if "MAX_JOBS" in os.environ:
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True)


setup(
    ext_modules=[CMakeExtension("flextron._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[torch_requirement(), *DEPENDENCIES],
)
