"""Package attributes that import their module on first use (PEP 562).

Why: `import flextron` and `flextron --help` stay fast.  A package lists what it offers; torch,
transformers and matplotlib load only when a name that needs them is first touched.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_attributes(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], object], Callable[[], list]]:
    """`__getattr__` and `__dir__` for `package`: `exports` maps a public name to the module that
    defines it (the name of a subpackage maps to that subpackage itself)."""

    def __getattr__(name: str) -> object:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(module_name)
        value = module if module_name == f"{package}.{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
