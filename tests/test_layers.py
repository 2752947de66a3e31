"""The packages point one way: entry points (``smoledge.*`` top-level command modules) above export,
benchmarks, cloud_fallback and quantize, above runtime, above ``smoledge.errors``.  The imports of every
``smoledge`` module (module-level and inside functions) are read from source; the test fails on
runtime -> cloud_fallback, quantize -> export, or any cycle between packages."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = {"runtime": "runtime", "cloud_fallback": "cloud_fallback", "quantize": "quantize", "export": "export",
            "benchmarks": "benchmarks"}
FORBIDDEN = {("runtime", "cloud_fallback"), ("quantize", "export")}
PENDING_MOVE: set[str] = set()  # entry points that still sit below their layer (none since the move)


def _node(module: str) -> str | None:
    """The layer a ``smoledge.x.y`` module belongs to: a package, or a top-level module of ``smoledge/``."""
    parts = module.split(".")
    if parts[0] != "smoledge" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in PACKAGES else f"smoledge.{parts[1]}"


# runtime/js is the TypeScript package (its node_modules and its Python helper scripts are no smoledge modules)
NOT_SMOLEDGE = ("runtime/js/",)


def _sources():
    for package, folder in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if not path.relative_to(REPO).as_posix().startswith(NOT_SMOLEDGE):
                yield package, path
    for path in sorted((REPO / "smoledge").glob("*.py")):
        yield f"smoledge.{path.stem}", path


def _imports(path: Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                found.add(f"smoledge.{package}")
            elif node.module:
                found.update([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
    return found


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for package, path in _sources():
        rel = path.relative_to(REPO).as_posix()
        for module in _imports(path, package if package in PACKAGES else "smoledge"):
            target = _node(module)
            if target and target != package and not (package.startswith("smoledge.") and target == package):
                edges.setdefault((package, target), []).append(rel)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, stack, state = [], [], {}

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _counted_edges() -> dict[tuple[str, str], list[str]]:
    edges = _edges()
    for edge, files in list(edges.items()):
        kept = [f for f in files if f not in PENDING_MOVE]
        if kept:
            edges[edge] = kept
        else:
            del edges[edge]
    return edges


def test_no_forbidden_direction():
    edges = _counted_edges()
    assert {edge: sorted(set(edges[edge])) for edge in FORBIDDEN if edge in edges} == {}


def test_no_package_cycle():
    graph: dict[str, set[str]] = {}
    for source, target in _counted_edges():
        graph.setdefault(source, set()).add(target)
    assert _cycles(graph) == []


def test_the_walk_sees_imports_inside_functions():
    """Guards the test itself: a function-level import counts (fidelity imports the runtime inside measure),
    and the entry points above both runtime and cloud_fallback are seen."""
    edges = _edges()
    assert "smoledge/fidelity.py" in edges[("smoledge.fidelity", "runtime")]
    assert ("smoledge.run", "cloud_fallback") in edges and ("smoledge.server_worker", "cloud_fallback") in edges
