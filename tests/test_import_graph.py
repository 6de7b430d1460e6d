"""The import graph of the harness package: no loops, and stage code imports no host code.

Every `import harness...` and `from harness... import ...` of every harness/**/*.py is an
edge, at module level and inside functions alike (a function-level import is a dependency
that only waits to be called). `from harness.x import y` where y is a submodule counts as an
edge to harness.x.y.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "harness"
RUNTIME = "harness.runtime"
# What a harness.runtime module may import outside harness.runtime: the package itself (for
# __version__) and the leaf module of exception types.
RUNTIME_MAY_IMPORT = frozenset({"harness", "harness.errors"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The harness modules `path` imports, wherever in the file the import is."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names
                         if f"{target}.{a.name}" in known)
    # `import harness.a.b` binds harness and loads harness.a too, but depends on harness.a.b.
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one
    loop through it, for the message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def loop_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One import loop inside a strongly connected component: a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(edges[path[-1]] & members)
        back = [n for n in nxt if n == start]
        if back and len(path) > 1:
            return [*path, start]
        fresh = [n for n in nxt if n not in seen]
        if not fresh:
            i = path.index(nxt[0])
            return [*path[i:], nxt[0]]
        path.append(fresh[0])
        seen.add(fresh[0])


def test_the_graph_sees_function_level_imports() -> None:
    edges = graph()
    # harness.runners imports each runner inside make_runner only.
    assert {"harness.runners.docker", "harness.runners.local"} <= edges["harness.runners"]
    assert "harness.runtime.preflight_checks" in edges["harness.runtime.preflight_worker"]


def test_no_import_cycles() -> None:
    edges = graph()
    loops = cycles(edges)
    assert not loops, "import cycles among harness modules:\n" + "\n".join(
        " -> ".join(loop_through(c, edges)) for c in loops)


def test_stage_code_imports_no_host_code() -> None:
    bad = [f"{mod} imports {dep}" for mod, deps in sorted(graph().items())
           if mod == RUNTIME or mod.startswith(RUNTIME + ".")
           for dep in sorted(deps)
           if dep != RUNTIME and not dep.startswith(RUNTIME + ".")
           and dep not in RUNTIME_MAY_IMPORT]
    assert not bad, "harness.runtime may import only itself, harness and harness.errors:\n" + \
        "\n".join(bad)


def test_errors_is_a_leaf() -> None:
    assert graph()["harness.errors"] == set()
