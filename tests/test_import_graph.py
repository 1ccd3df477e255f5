"""The package's internal import graph has no cycle, and every module imports on its own.

The graph is read from the source, not from a run: every ``.py`` of the installed packages (``embcompress/`` and
the folders ``setup.cfg``'s ``package_dir`` maps under it, ``tables/`` -> ``embcompress.tables`` and
``ctr_models/`` -> ``embcompress.ctr_models``) is parsed, and every ``import`` / ``from ... import`` of a package
module counts as an edge: module-level ones and function-level (lazy) ones alike, since a lazy import only hides a
cycle from the interpreter, not from a reader. ``from pkg import name`` points at ``pkg.name`` when that is a
module, else at ``pkg``.
"""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Cycles that exist today and are someone else's to remove, each allowed by the one import edge
# (importer, imported) that closes it. Remove an entry when its fix lands; the test then holds the line.
# Everything not listed here must form a DAG.
KNOWN_CYCLES: dict[tuple[str, str], str] = {}


def package_dirs() -> dict[str, Path]:
    """``{package name: folder}`` from setup.cfg's ``[options] package_dir``."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    dirs = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, _, folder = (part.strip() for part in line.partition("="))
        dirs[name] = ROOT / folder
    return dirs


def package_modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the installed packages (a package is its __init__)."""
    modules = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = package_modules()
TOP = sorted({name.split(".")[0] for name in MODULES})


def _owning_module(name: str) -> str | None:
    """The package module ``name`` is, or the innermost one it lies in (``embcompress.x.Y`` -> ``embcompress.x``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> dict[str, tuple[int, bool]]:
    """``{imported package module: (line, lazy)}`` for every import in ``module``'s source."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    # Imports inside a function body run on call (lazy); everything else runs on import.
    lazy_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                  for n in ast.walk(f)}
    found: dict[str, tuple[int, bool]] = {}
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))), key=lambda n: n.lineno)
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = here
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = ".".join(p for p in (anchor, node.module) if p)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        lazy = id(node) in lazy_nodes
        for target in targets:
            owner = _owning_module(target) if target.split(".")[0] in TOP else None
            # Report the first module-level import of a module, else its first lazy one.
            if owner and owner != module and (owner not in found or (found[owner][1] and not lazy)):
                found[owner] = (node.lineno, lazy)
    return found


def import_graph() -> dict[str, dict[str, tuple[int, bool]]]:
    return {module: imports_of(module) for module in MODULES}


def find_cycle(graph: dict[str, dict[str, tuple[int, bool]]], skip: set[tuple[str, str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph`` without the edges in ``skip``, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif (path[-1], nxt) in skip or state.get(nxt) == 2:
                continue
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            else:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def describe(graph: dict[str, dict[str, tuple[int, bool]]], cycle: list[str]) -> str:
    lines = [f"import cycle: {' -> '.join(cycle)}"]
    for a, b in zip(cycle, cycle[1:]):
        line, lazy = graph[a][b]
        where = MODULES[a].relative_to(ROOT)
        lines.append(f"  {a} -> {b}  ({where}:{line}{', lazy' if lazy else ''})")
    return "\n".join(lines)


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"embcompress", "embcompress.tables", "embcompress.ctr_models", "embcompress.training"} <= set(graph)
    assert "embcompress.contract" in graph["embcompress.tables.full"]  # absolute import from a mapped folder
    assert "embcompress.ctr_models.layers" in graph["embcompress.ctr_models.dlrm"]  # relative import
    # and the checker finds a cycle when there is one, lazy edges included
    toy = {"a": {"b": (1, False)}, "b": {"c": (2, True)}, "c": {"a": (3, False)}}
    assert find_cycle(toy, set()) == ["a", "b", "c", "a"]
    assert find_cycle(toy, {("b", "c")}) is None


def test_no_import_cycle():
    graph = import_graph()
    stale = sorted(edge for edge in KNOWN_CYCLES if edge[1] not in graph.get(edge[0], {}))
    if stale:  # a fix has landed: its entry can go
        warnings.warn(f"KNOWN_CYCLES entries whose import is gone: {stale}", stacklevel=1)
    cycle = find_cycle(graph, set(KNOWN_CYCLES))
    if cycle is not None:
        message = describe(graph, cycle)
        print(message)
        raise AssertionError(message)


_IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for key in [k for k in sys.modules if k.split(".")[0] in {tops}]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name + ":\\n" + traceback.format_exc())
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_module_imports_alone():
    # One fresh interpreter; before each module the package's modules are dropped from sys.modules, so each is
    # imported first, as a user's `import embcompress.x` would (third-party modules stay loaded, for speed).
    script = _IMPORT_EACH.format(tops=set(TOP))
    proc = subprocess.run([sys.executable, "-c", script, *sorted(MODULES)], capture_output=True, text=True,
                          cwd=ROOT / "tests", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
