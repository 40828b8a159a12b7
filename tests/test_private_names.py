"""The house: no module of metalearner/ or trainables/ uses another module's private names.

A name with a leading underscore is its module's own business. Another module may not:
- import it (``from metalearner.model.attention import _round_up``), at the top or lazily;
- read it off an imported module (``tuning._merge``);
- call or read it on another object (``runner._fit(...)``) when the name is a private
  method or attribute that only other project modules define: that is driving another
  module's object through its private methods.
When two modules need the same step, it lives once behind a public name (STYLE.md:
"Public seams, not private reach-ins"). Private names of third-party packages are not
checked here (``os._exit``, Ray's internals).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("metalearner", "trainables")


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    files = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            files[".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = f
    return files


def own_private_names(tree: ast.AST) -> set[str]:
    """The private names a module defines: functions, classes, methods, ``self._x``
    attributes, module-level and class-level assignments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if private(n)}


def absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from ... import`` in ``module`` (relative imports too)."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    return ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])


def reach_ins(root: Path) -> list[str]:
    """One line per use of another project module's private name."""
    files = project_modules(root)
    trees = {m: ast.parse(f.read_text(), filename=str(f)) for m, f in files.items()}
    defined = {m: own_private_names(t) for m, t in trees.items()}
    found = []
    for m, tree in trees.items():
        where = f"{files[m].relative_to(root)}"
        module_aliases: set[str] = set()  # local names bound to a project module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = absolute(m, files[m].name == "__init__.py", node)
                if source.split(".")[0] not in PACKAGES:
                    continue
                for a in node.names:
                    if f"{source}.{a.name}" in files:  # a submodule
                        module_aliases.add(a.asname or a.name)
                    if private(a.name) and source != m:
                        found.append(f"{where}:{node.lineno}: from {source} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PACKAGES:
                        module_aliases.add(a.asname or a.name.split(".")[0])
        others = set().union(*(names for other, names in defined.items() if other != m)) - defined[m]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and private(node.attr)):
                continue
            owner = ast.unparse(node.value)
            if owner in ("self", "cls") or owner.startswith("super("):
                continue
            if owner.split(".")[0] in module_aliases or node.attr in others:
                found.append(f"{where}:{node.lineno}: {owner}.{node.attr}")
    return sorted(found)


def test_no_module_uses_another_modules_private_names():
    assert reach_ins(ROOT) == []


def test_the_check_finds_each_kind_of_reach_in(tmp_path):
    """The checker itself, on a small project: each kind of reach-in is found, and a
    module's own private names and third-party ones are not."""
    pkg = tmp_path / "trainables"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tuning.py").write_text(
        "def _merge(a, b):\n    return a\n\n"
        "class Runner:\n    def __init__(self):\n        self._stop = 1\n\n    def _fit(self):\n"
        "        return self._stop\n")
    (pkg / "sweep.py").write_text(
        "import os\n"
        "from trainables.tuning import _merge\n"
        "from trainables import tuning\n"
        "from . import tuning as t\n\n"
        "def _own():\n    return 1\n\n"
        "def run(runner, tuner):\n"
        "    tuning._merge(1, 2)\n"
        "    t.Runner()\n"
        "    runner._fit()\n"
        "    runner._stop\n"
        "    tuner._local_tuner\n"  # a third-party object's private name: not checked here
        "    os._exit\n"
        "    return _own()\n\n"
        "def lazy():\n"
        "    from .tuning import _merge as m\n"
        "    return m\n")
    assert reach_ins(tmp_path) == [
        "trainables/sweep.py:10: tuning._merge",
        "trainables/sweep.py:12: runner._fit",
        "trainables/sweep.py:13: runner._stop",
        "trainables/sweep.py:19: from trainables.tuning import _merge",
        "trainables/sweep.py:2: from trainables.tuning import _merge",
    ]
