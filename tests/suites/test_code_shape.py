"""Code shape: no function in flextron/ is longer than 80 lines or takes more than 6 positional
parameters (beyond self, cls or an autograd ctx); longer parameter lists are keyword-only, or a
config object."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from flextron.ops import OP_NAMES

PACKAGE = Path(__file__).resolve().parents[2] / "flextron"
MAX_LINES = 80  # signature and body
MAX_POSITIONAL = 6


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef]]:
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _positional(function: ast.FunctionDef) -> int:
    names = [a.arg for a in function.args.posonlyargs + function.args.args]
    # self / cls, and the ctx of an autograd.Function, are passed by Python or torch, not by callers.
    return len(names) - (names[:1] in (["self"], ["cls"], ["ctx"]))


def _is_fake_kernel(function: ast.FunctionDef) -> bool:
    """A torch.library fake takes its op schema's arguments positionally, as the dispatcher passes them."""
    return any(
        isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "register_fake"
        for d in function.decorator_list
    )


def _mirrors_op_schema(module: str, name: str) -> bool:
    """An op's Python entry point and its reference take the schema's arguments in its order
    (csrc/registration.cpp), as torch.ops.flextron.NAME does."""
    return module in ("ops/wrappers.py", "ops/reference.py") and name in OP_NAMES


def _offences() -> dict[str, str]:
    offences = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        for name, function in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            lines = function.end_lineno - function.lineno + 1
            problems = [f"{lines} lines"] if lines > MAX_LINES else []
            if (
                _positional(function) > MAX_POSITIONAL
                and not _is_fake_kernel(function)
                and not _mirrors_op_schema(module, name)
            ):
                problems.append(f"{_positional(function)} positional parameters")
            if problems:
                offences[f"{module}:{name}"] = ", ".join(problems)
    return offences


MAX_CLI_MODULE_LINES = 300  # a command module parses, calls the library and prints


def test_command_modules_are_thin() -> None:
    long = {
        path.name: lines
        for path in sorted((PACKAGE / "cli").glob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_CLI_MODULE_LINES
    }
    assert not long, f"CLI modules over {MAX_CLI_MODULE_LINES} lines (move logic into the library): {long}"


def test_functions_are_short_with_few_positional_parameters() -> None:
    offences = _offences()
    assert not offences, (
        f"functions longer than {MAX_LINES} lines or with more than {MAX_POSITIONAL} positional "
        f"parameters (split them; make parameters keyword-only): {offences}"
    )
