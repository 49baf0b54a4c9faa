"""The project's import graph: no cycle between its modules, and a one-way direction.

Every module of the installed packages (``[tool.setuptools.packages.find]`` in pyproject.toml)
is parsed with ``ast`` and every import is an edge, including imports inside functions (a cycle
hidden in a function body is still a cycle: it only fails later, at the call). An import of a
name from a package is an edge to that name's submodule when it is one, else to the package.

The direction (an arrow points from a module to what it may use)::

    focal_jax, focal_torch  <-  focal_reference  <-  parity_tests, focal_bench

the two libraries use neither each other nor anything else of the project; ``focal_reference``
uses no other package of the project (it is the independent truth); the benchmarks do not use
the parity suite.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  tomllib = None

ROOT = Path(__file__).resolve().parents[1]

# What each top-level package may import from the project (besides itself).
ALLOWED = {
    "focal_jax": set(),
    "focal_torch": set(),
    "focal_reference": set(),
    "parity_tests": {"focal_jax", "focal_torch", "focal_reference"},
    "focal_bench": {"focal_jax", "focal_torch", "focal_reference"},
}


def project_packages(root: Path = ROOT) -> list[str]:
  """The top-level packages the wheel installs, from pyproject.toml's include patterns."""
  if tomllib is None:
    pytest.skip("tomllib needs Python 3.11")
  with open(root / "pyproject.toml", "rb") as f:
    patterns = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
  return sorted(p.name for p in root.iterdir()
                if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat)
                                                         for pat in patterns))


def modules(root: Path, packages: list[str]) -> dict[str, Path]:
  """Dotted module name -> file, for every .py file of ``packages`` under ``root``."""
  out = {}
  for pkg in packages:
    for path in sorted((root / pkg).rglob("*.py")):
      parts = path.relative_to(root).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _known(name: str, mods: dict[str, Path]) -> str | None:
  """``name`` or its longest prefix that is a module of the project."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    candidate = ".".join(parts[:i])
    if candidate in mods:
      return candidate
  return None


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
  """Module -> the project modules it imports (anywhere in the file)."""
  graph: dict[str, set[str]] = {}
  for name, path in mods.items():
    is_package = path.name == "__init__.py"
    edges: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base_parts = name.split(".") if is_package else name.split(".")[:-1]
          base_parts = base_parts[:len(base_parts) - (node.level - 1)]
          base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
          base = node.module or ""
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                   for alias in node.names]
      else:
        continue
      for target in targets:
        known = _known(target, mods)
        if known is not None and known != name:
          edges.add(known)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle (``[a, b, ..., a]``) of ``graph``, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: finished
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_every_package_of_the_wheel_has_a_direction():
  assert set(project_packages()) == set(ALLOWED)


def test_no_import_cycle_between_modules_of_the_project():
  graph = import_graph(modules(ROOT, project_packages()))
  assert len(graph) > 40  # the walk found the project
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_one_way():
  graph = import_graph(modules(ROOT, project_packages()))
  wrong = sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets
                 if b.split(".")[0] != a.split(".")[0]
                 and b.split(".")[0] not in ALLOWED[a.split(".")[0]])
  assert not wrong, "\n".join(wrong)


def test_the_walk_finds_a_cycle_hidden_in_a_function(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from . import c\n")
  (pkg / "c.py").write_text("def g():\n  import pkg.a\n  from pkg.a import x\n")
  (pkg / "d.py").write_text("from pkg import a, b\n")
  graph = import_graph(modules(tmp_path, ["pkg"]))
  assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"}
  assert graph["pkg.c"] == {"pkg.a"}
  assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
  (pkg / "c.py").write_text("import os\n")
  assert find_cycle(import_graph(modules(tmp_path, ["pkg"]))) is None
