"""The package's modules import one another one way: no cycle, lazy and type-only imports
included (a cycle hidden in a function or behind TYPE_CHECKING is still a cycle); and none
reaches into another's underscore names."""

from __future__ import annotations

import ast
from pathlib import Path

import tapescope

ROOT = Path(tapescope.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycles() -> None:
    mods = modules()
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    # Every cycle passes through a module that imports a package's __init__ only if the
    # __init__ imports back; the package __init__s here are docstrings, so a plain DFS does.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d):], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert len(graph) > 50          # the walk saw the package


def private_uses(path: Path) -> list[str]:
    """Where a module reaches into another's underscore names: ``from m import _x``, or
    ``obj._x`` on anything but ``self`` / ``cls`` (another object's private member)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out += [f"{path.name}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                out.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_module_uses_another_modules_underscore_names() -> None:
    found = [use for p in sorted(ROOT.rglob("*.py")) for use in private_uses(p)]
    assert not found, "private names used from outside:\n" + "\n".join(found)


def test_the_packages_depend_one_way() -> None:
    """Layers, not only modules: no package reaches back into a package that depends on it
    (docs/architecture.md draws them)."""
    mods = modules()

    def package(m: str) -> str:
        parts = m.split(".")
        return parts[1] if len(parts) > 1 else "tapescope"

    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        for d in imports_of(m, p, set(mods)):
            if package(m) != package(d):
                graph.setdefault(package(m), set()).add(package(d))
    loops = [(a, b) for a, deps in graph.items() for b in deps if a in reachable(graph, b)]
    assert not loops, f"packages that depend on each other: {sorted(loops)}"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for d in graph.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen
