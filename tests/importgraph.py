"""The project's import graph, read from the source (no imports run): which modules each module of a package
imports, at module level or inside functions, with relative imports resolved.  Used by the layout tests."""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports_of(path: Path) -> set[str]:
    """Every module `path` names in an import statement (absolute names; `from a import b` gives `a` and `a.b`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@cache
def graph(package: str = "disagg") -> dict[str, frozenset[str]]:
    """module -> the modules it imports, for every module under `package`."""
    return {module_name(p): frozenset(_imports_of(p)) for p in sorted((ROOT / package).rglob("*.py"))}


def top_levels(imports: frozenset[str]) -> set[str]:
    return {name.split(".")[0] for name in imports}


def importers_of(top_level: str, under: str, package: str = "disagg") -> dict[str, set[str]]:
    """The modules under `under` (a dotted prefix) that import `top_level` directly: module -> its imports of it."""
    return {
        mod: {i for i in imports if i.split(".")[0] == top_level}
        for mod, imports in graph(package).items()
        if (mod == under or mod.startswith(under + ".")) and top_level in top_levels(imports)
    }


def reachable(start: str, package: str = "disagg") -> set[str]:
    """The project modules `start` imports, directly or through other project modules."""
    g = graph(package)
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        for imp in g.get(mod, ()):
            # `from a import b` names `a.b`, which is a module only when a file of that name exists
            target = imp if imp in g else imp.rpartition(".")[0] if imp.rpartition(".")[0] in g else None
            if target is not None and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def package_of(module: str, packages: list[str]) -> str | None:
    """The package in `packages` (dotted prefixes) that `module` belongs to, if any."""
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def package_edges(packages: list[str], package: str = "disagg") -> dict[str, set[str]]:
    """package -> the other packages in `packages` its modules import directly."""
    edges: dict[str, set[str]] = {p: set() for p in packages}
    for mod, imports in graph(package).items():
        source = package_of(mod, packages)
        if source is None:
            continue
        for imp in imports:
            target = package_of(imp, packages)
            if target is not None and target != source:
                edges[source].add(target)
    return edges


def package_cycles(packages: list[str], package: str = "disagg") -> list[list[str]]:
    """Every cycle among `packages` (each as the path that closes it); empty when they form a DAG."""
    return cycles_in(package_edges(packages, package))


def cycles_in(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of a directed graph (node -> successors), each found once per entry point, as a closed path."""
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt in path:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for start in sorted(edges):
        if start not in done:
            visit(start, [start])
    return cycles
