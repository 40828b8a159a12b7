"""The house: the module graph of metalearner/ and trainables/ has no circle, and no arrow
points up the layers of DESIGN.md. Every import counts, module-level and lazy alike."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# DESIGN.md's layers, lowest first: a module imports its own layer or those below it
LAYERS = [
    ["metalearner.knobs", "metalearner.environment", "metalearner.trace", "metalearner.schema"],
    ["metalearner.controllers", "metalearner.registry"],  # registry: a controller name to its class (plugins too)
    ["metalearner.model"],
    ["metalearner.tasks"],
    ["metalearner.config", "metalearner.experiment", "metalearner.runtime_env", "metalearner.objectives",
     "metalearner.controller_file"],
    ["metalearner.train", "metalearner.hf", "metalearner.checkpoint"],
    ["metalearner.tracking", "metalearner.journal", "metalearner.report",
     "metalearner.sweep_state", "metalearner.metrics_db"],  # journal, sweep_state: stdlib only, no mlflow;
    # metrics_db: psycopg2 only
    ["trainables"],
    ["metalearner.cli", "metalearner.inputs"],  # the face: the CLI and its input checks
    ["metalearner"],  # the package's own __init__ (re-exports)
]


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the project it imports (anywhere in its body)."""
    files = {}
    for pkg in ("metalearner", "trainables"):
        for f in sorted((root / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            files[name] = f

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in filter(None, map(resolve, names)):
                if target != m and not m.startswith(target + "."):  # a package's own __init__ is no arrow
                    graph[m].add(target)
    return graph


def layer(module: str) -> int:
    best = max(((i, len(p)) for i, group in enumerate(LAYERS) for p in group
                if module == p or module.startswith(p + ".")), key=lambda t: t[1])
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_in_a_circle():
    assert cycles(module_graph(ROOT)) == []


def test_no_arrow_points_up_the_layers():
    graph = module_graph(ROOT)
    up = sorted((a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a))
    assert up == []


def test_the_checks_see_the_circle_of_an_engine_that_imports_the_cli(tmp_path):
    for name, text in {"metalearner/__init__.py": "", "metalearner/cli.py": "from metalearner import hf\n",
                       "metalearner/hf.py": "def f():\n    from metalearner.cli import fail\n",
                       "trainables/__init__.py": ""}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = module_graph(tmp_path)
    assert cycles(graph) == [["metalearner.cli", "metalearner.hf"]]
    assert layer("metalearner.cli") > layer("metalearner.hf")  # hf -> cli is the upward arrow


TRACKING_LAYER = ("metalearner.tracking", "metalearner.metrics_db")  # what talks to the tracking store


def module_name(f: Path) -> str:
    return ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_only_tracking_imports_mlflow_and_only_trainables_import_ray():
    for f in sorted((ROOT / "metalearner").rglob("*.py")):
        tree = ast.parse(f.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "ray" not in imported or f.name == "cli.py", f
        name = module_name(f)
        assert "mlflow" not in imported or name.startswith(TRACKING_LAYER), f


def test_the_tracking_modules_each_do_one_job_in_a_readable_size():
    for f in sorted((ROOT / "metalearner" / "tracking").glob("*.py")):
        assert len(f.read_text().splitlines()) <= 500, f
