"""Registers the Flextron classes with transformers' Auto classes once transformers is imported.

Why not import transformers here: it takes seconds, and most commands never need it.  Instead a
finder on `sys.meta_path` waits for the first `import transformers`, lets the real finders load
it, then registers (flextron.integrations.hf_model does so when imported).  If transformers is
already loaded, registration happens at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

HF_MODEL = "flextron.integrations.hf_model"


def _register() -> None:
    importlib.import_module(HF_MODEL)  # registers at import


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of `transformers` so that registration runs
    right after the package has executed."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the finder protocol
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # once: the real finders take it from here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            run_package(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def register_when_transformers_loads() -> None:
    """Register now when transformers is loaded, else at its first import."""
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterTransformersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
