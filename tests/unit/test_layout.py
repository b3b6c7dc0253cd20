"""The package's structure, read from the source with ast (nothing is imported):

- no import cycle among the modules of hybrid/, counting imports at module level and inside
  functions (a function-level import only defers a cycle, it does not remove it);
- nothing in hybrid/ outside hybrid/lab/ imports hybrid.lab (lab and benchmark tooling sits on top
  of the library; cli/ and tests/ may use it);
- no test edits sys.path (pyproject.toml's pytest ``pythonpath`` makes tests/ importable).

The checker is tested on a made-up package first, so each rule is proven able to fail."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Edge:
    source: str         # importing module
    target: str         # imported module (a module or package of the tree)
    where: str          # path:line of the import statement


def modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py below ``package_dir`` (a package named after
    its directory)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Resolve ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports(module: str, path: Path, known: set[str], base: Path) -> list[Edge]:
    """Every import of a module in ``known`` made anywhere in the file (module level, functions,
    classes, conditionals). ``from pkg import name`` counts as importing ``pkg.name`` when that
    is a module, else ``pkg``. Locations are relative to ``base``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    rel = path.relative_to(base)
    out = []

    def add(target: str, node: ast.AST) -> None:
        # "import a.b.c" of something not in the tree at that depth: the deepest known prefix
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != module:
            out.append(Edge(module, target, f"{rel}:{node.lineno}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            origin = _absolute(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                add(sub if sub in known else origin, node)
    return out


def graph(package_dir: Path) -> list[Edge]:
    mods = modules(package_dir)
    return [e for name, path in mods.items() for e in imports(name, path, set(mods), package_dir.parent)]


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) for every strongly connected component with more than one
    module (Tarjan's algorithm, iterative)."""
    succ: dict[str, list[Edge]] = {}
    for e in edges:
        succ.setdefault(e.source, []).append(e)
        succ.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for e in it:
                if e.target not in index:
                    index[e.target] = low[e.target] = len(index)
                    stack.append(e.target)
                    on_stack.add(e.target)
                    work.append((e.target, iter(succ[e.target])))
                    break
                if e.target in on_stack:
                    low[node] = min(low[node], index[e.target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.add(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        components.append(comp)
    return [_cycle_in(comp, succ) for comp in components]


def _cycle_in(comp: set[str], succ: dict[str, list[Edge]]) -> list[Edge]:
    """A shortest cycle through the component's first module (breadth-first search)."""
    start = min(comp)
    came: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for e in succ[node]:
                if e.target == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, came[path[0].source])
                    return path
                if e.target in comp and e.target not in came:
                    came[e.target] = e
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")    # pragma: no cover


def describe(cycle: list[Edge]) -> str:
    return " -> ".join(f"{e.source} ({e.where})" for e in cycle) + f" -> {cycle[0].source}"


def lab_imports(edges: list[Edge], lab: str = "hybrid.lab") -> list[str]:
    return [f"{e.where}: {e.source} imports {e.target}" for e in edges
            if (e.target == lab or e.target.startswith(lab + "."))
            and not (e.source == lab or e.source.startswith(lab + "."))]


def sys_path_edits(path: Path, base: Path = ROOT) -> list[str]:
    """Lines of ``path`` (as path:line relative to ``base``) that change the import path:
    sys.path.insert/append/extend/..., assigning sys.path, monkeypatch.syspath_prepend,
    site.addsitedir."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def is_sys_path(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path"
                and isinstance(node.value, ast.Name) and node.value.id == "sys")

    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            hit = is_sys_path(node.func.value) or node.func.attr in ("syspath_prepend", "addsitedir")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            hit = any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            hit = any(a.name == "path" for a in node.names)     # "from sys import path": then edited
        if hit:
            found.append(node.lineno)
    return [f"{path.relative_to(base)}:{n}" for n in sorted(found)]


# -- the checker proves it can fail ------------------------------------------------------------------

@pytest.fixture
def fake(tmp_path):
    def make(files: dict[str, str]) -> Path:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        return tmp_path / "pkg"
    return make


def test_checker_finds_a_cycle_through_a_function_level_relative_import(fake):
    pkg = fake({
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.sub import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "import os\nfrom . import c\n",
        "pkg/sub/c.py": "def f():\n    from ..a import x\n    return x\n",
        "pkg/d.py": "import pkg.a\n",                 # imports into the cycle: not part of it
    })
    found = cycles(graph(pkg))
    assert [[(e.source, e.target) for e in c] for c in found] == [
        [("pkg.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.sub.c"), ("pkg.sub.c", "pkg.a")]]
    assert describe(found[0]) == ("pkg.a (pkg/a.py:1) -> pkg.sub.b (pkg/sub/b.py:2) -> pkg.sub.c (pkg/sub/c.py:2) "
                                  "-> pkg.a")


def test_checker_resolves_relative_imports_in_packages_and_modules(fake):
    pkg = fake({
        "pkg/__init__.py": "from . import a\n",
        "pkg/a.py": "from .sub.b import thing\nfrom . import sub\n",
        "pkg/sub/__init__.py": "from .b import thing\nfrom .. import a\n",
        "pkg/sub/b.py": "from ..a import y\n",
    })
    pairs = {(e.source, e.target) for e in graph(pkg)}
    assert pairs == {("pkg", "pkg.a"), ("pkg.a", "pkg.sub.b"), ("pkg.a", "pkg.sub"),
                     ("pkg.sub", "pkg.sub.b"), ("pkg.sub", "pkg.a"), ("pkg.sub.b", "pkg.a")}


def test_checker_finds_lab_imports_outside_the_lab(fake):
    pkg = fake({
        "pkg/__init__.py": "",
        "pkg/lab/__init__.py": "",
        "pkg/lab/topology.py": "from pkg import core\n",
        "pkg/lab/bench.py": "from . import topology\n",
        "pkg/core.py": "def f():\n    from pkg.lab import topology\n",
    })
    assert lab_imports(graph(pkg), "pkg.lab") == ["pkg/core.py:2: pkg.core imports pkg.lab.topology"]


def test_checker_finds_sys_path_edits(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("import sys, site\nsys.path.insert(0, 'x')\nsys.path.append('y')\nsys.path = []\n"
                   "sys.path[:0] = ['z']\nsite.addsitedir('w')\n"
                   "def test(monkeypatch):\n    monkeypatch.syspath_prepend('v')\n"
                   "def ok():\n    return sys.path[0], 'sys.path.insert'\n")
    assert sys_path_edits(bad, tmp_path) == [f"test_bad.py:{n}" for n in (2, 3, 4, 5, 6, 8)]


# -- the rules, on the real tree -------------------------------------------------------------------

def test_no_import_cycles_in_hybrid():
    found = cycles(graph(ROOT / "hybrid"))
    assert not found, "import cycles (module (import at) -> ...):\n" + "\n".join(map(describe, found))


def test_the_graph_sees_the_real_imports():
    """Guard against a checker that silently sees nothing."""
    pairs = {(e.source, e.target) for e in graph(ROOT / "hybrid")}
    assert ("hybrid.datapath.loader", "hybrid.kernel.abi") in pairs       # from hybrid.kernel import abi
    assert ("hybrid.instance", "hybrid.kernel.sysutil") in pairs
    assert len(pairs) > 50


def test_nothing_outside_hybrid_lab_imports_it():
    found = lab_imports(graph(ROOT / "hybrid"))
    assert not found, "hybrid.lab is lab tooling; the library must not import it:\n" + "\n".join(found)


def test_no_test_edits_sys_path():
    found = [hit for path in sorted((ROOT / "tests").rglob("*.py")) for hit in sys_path_edits(path)]
    assert not found, ("tests edit sys.path; pyproject.toml's [tool.pytest.ini_options] pythonpath already puts "
                       "tests/ and tests/bpf/ on it, so import their helpers by name:\n" + "\n".join(found))
