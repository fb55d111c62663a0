"""The house rules of the layout (docs/architecture.md), checked on the source so they stay true:
no module of ``secu/``, ``pipelines/`` or ``jobs/`` over 400 lines, no function over 80 lines, no
import cycle between modules, ``secu/`` free of Ray, ``pipelines/`` free of ``jobs``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("secu", "pipelines", "jobs")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def modules() -> dict[str, Path]:
    """Dotted module name -> path, for every module of the three packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path) -> set[str]:
    """Modules named by the file's import statements (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_at_most_400_lines(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{name} has {lines} lines; split it by what its parts are"


def test_no_function_over_80_lines() -> None:
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, long


def test_no_import_cycle() -> None:
    mods = modules()
    graph = {name: {m for m in imports_of(path) if m in mods and m != name} for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_layers_import_only_downwards() -> None:
    """secu/ never imports ray, pipelines or jobs; pipelines/ never imports jobs."""
    bad = []
    for name, path in modules().items():
        names = imports_of(path)
        if name.startswith("secu") and any(n.split(".")[0] in ("ray", "pipelines", "jobs") for n in names):
            bad.append(name)
        if name.startswith("pipelines") and any(n.split(".")[0] == "jobs" for n in names):
            bad.append(name)
    assert not bad, bad
