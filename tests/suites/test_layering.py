"""The package's layers point one way, and no modules import each other in a circle.

The graph is read off the source with `ast` (nothing is imported): one node per module under
flextron/, one edge per `import flextron.x`, `from flextron.x import y`, `from flextron import
x`, relative import naming another flextron module, or module named in a `lazy_attributes`
table (flextron._lazy).  Imports inside functions count too (a deferred import that closes a
cycle only postpones the cycle to the call), and so do imports under `if TYPE_CHECKING:` (a
type that needs a module above it is a layering mistake too).  The implicit import of a
module's parent packages does not count (every module would otherwise sit in a cycle with
flextron/__init__.py).  The layers are docs/design.md's "Layers" table.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "flextron"
NOT_IMPORTED = {"flextron.__main__"}  # running the command line is what importing it does
OPTIONAL_DEPENDENCIES = {"lm_eval", "datasets"}  # pyproject's extras: a module needing one may skip


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under flextron/."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _import_statements(tree: ast.Module, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The module's import statements: top level (inside if/try/with, `if TYPE_CHECKING:` too),
    and with `deferred` those in function and class bodies as well."""
    found = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if deferred:
                    visit(node.body)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    for child in getattr(node, field, []):
                        visit(
                            child.body if isinstance(child, ast.ExceptHandler | ast.match_case) else [child]
                        )

    visit(tree.body)
    return found


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a package's __init__.py binds at top level (what `from package import name` can
    mean besides a submodule)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {
                name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)
            }
    return names


def import_graph(deferred: bool) -> dict[str, set[str]]:
    """Module -> the flextron modules it imports (see the module docstring for what counts)."""
    files = module_files()
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in files.items()}
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        is_package = files[name].name == "__init__.py"
        edges = set()
        for node in _import_statements(tree, deferred):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    # `import a.b.c` binds the deepest module that exists as a file.
                    edges |= {
                        ".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in files
                    }
                continue
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in files:
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in files:
                    edges.add(f"{source}.{alias.name}")
                elif files[source].name != "__init__.py" or alias.name in _top_level_names(trees[source]):
                    edges.add(source)
                # else: a compiled submodule (flextron._C), no source to follow
        edges |= _lazy_table_modules(tree) & set(files)
        edges.discard(name)
        graph[name] = edges
    return graph


def _lazy_table_modules(tree: ast.Module) -> set[str]:
    """The modules named in a `lazy_attributes(__name__, {name: module})` table."""
    return {
        value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_attributes"
        for table in node.args[1:2]
        if isinstance(table, ast.Dict)
        for value in table.values
        if isinstance(value, ast.Constant)
    }


# docs/design.md, "Layers": a module may import its own package and the layers below its own.
LAYERS = {
    "flextron._lazy": 0,
    "flextron._version": 0,
    "flextron.options": 0,
    "flextron.timing": 0,
    "flextron.limits": 0,
    "flextron.io": 0,
    "flextron.ops": 1,
    "flextron.data": 1,
    "flextron.model": 2,
    "flextron.eval": 3,
    "flextron.latency": 3,
    "flextron.conversion": 4,
    "flextron.export": 4,
    "flextron.routers": 4,
    "flextron.train": 4,
    "flextron.integrations": 5,
    "flextron.demo": 5,
    "flextron.cli": 6,
    "flextron.__main__": 7,
    "flextron": 7,
}


def layer_unit(module: str) -> str:
    """The LAYERS entry a module belongs to: its top-level package or module under flextron."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_every_module_has_a_layer() -> None:
    assert {layer_unit(module) for module in module_files()} <= set(LAYERS)


def test_imports_point_down() -> None:
    upward = [
        f"{module} (layer {LAYERS[layer_unit(module)]}) imports {imported} "
        f"(layer {LAYERS[layer_unit(imported)]})"
        for module, imports in import_graph(deferred=True).items()
        for imported in imports
        if layer_unit(imported) != layer_unit(module)
        and LAYERS[layer_unit(imported)] >= LAYERS[layer_unit(module)]
    ]
    assert not upward, "\n".join(upward)


def test_the_layer_test_sees_upward_and_type_checking_imports() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from flextron.cli import main\n"
    )
    assert any(node.module == "flextron.cli" for node in _import_statements(tree, deferred=False))
    lazy = ast.parse('__getattr__, __dir__ = lazy_attributes(__name__, {"x": "flextron.ops"})')
    assert _lazy_table_modules(lazy) == {"flextron.ops"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is acyclic (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported)
            if cycle:
                return cycle
        done.add(path.pop())
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_find_cycle_reports_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle


def test_graph_reads_every_import_form() -> None:
    graph = import_graph(deferred=True)
    assert "flextron.model.elastic_model" in graph["flextron.model.checkpoint"]  # from a module
    assert "flextron.ops" in graph["flextron.model.elastic_model"]  # from flextron import ops
    assert "flextron.model.loading" in graph["flextron"]  # a lazy_attributes table
    assert "flextron.train.trainer" in graph["flextron.train"]  # a package's __init__
    assert "flextron" not in graph["flextron.ops.extension"]  # from flextron import _C: compiled


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "with-deferred"])
def test_no_import_cycles(deferred: bool) -> None:
    cycle = find_cycle(import_graph(deferred))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    modules = sorted(set(module_files()) - NOT_IMPORTED)
    script = f"""
import importlib, sys, traceback
failed = []
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in {sorted(OPTIONAL_DEPENDENCIES)!r}:
            failed.append(name + ":\\n" + traceback.format_exc())
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc())
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
