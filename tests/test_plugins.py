"""Controller plugins: loaded by import path or entry point, checked at load, treated as
built-in policies, and shipped to Ray workers through ``runtime_env``.

The plugins live in temporary folders that are never installed and never on the workers'
PYTHONPATH: a sweep's workers can import them only because ``runtime_env`` ships them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from _view import assert_view_finds_runs
from conftest import children, history

from metalearner.cli import build_parser, main
from metalearner.config import ConfigError, load_run_config
from metalearner.experiment import parse_experiment
from metalearner.inputs import sweep_inputs
from metalearner.knobs import Knobs
from metalearner.registry import PLUGINS, build_controller, controller_params
from metalearner.trace import STEP_KEYS

ROOT = Path(__file__).resolve().parent.parent
K0 = Knobs(rope_base=10_000.0, window=8)

POLICY = '''
from metalearner.controllers import BaseController, Param


class Doubler(BaseController):
    """Doubles the window every `every` steps."""

    name = "doubler"
    PARAMS = {"every": Param(4, lambda v: isinstance(v, int) and v >= 1, "an int >= 1", int),
              "gain": Param(2.0, lambda v: v > 1, "a float > 1")}

    def update(self, step, loss):
        if step % self.settings()["every"] == 0:
            self.scale(1.0, self.settings()["gain"])
'''
BASE = {"task": {"name": "recall", "n_pairs": 4, "distance": 16}, "model": {"preset": "tiny", "window": 4},
        "train": {"steps": 20, "seq_len": 32, "report_every": 10, "eval_every": 10}}


def plugin(folder: Path, module: str, source: str = POLICY) -> Path:
    """Write ``module``.py into ``folder`` (made) and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    return folder


def test_an_import_path_plugin_is_treated_like_a_builtin_policy(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin(tmp_path, "plug_builtin_like")))
    name = "plug_builtin_like:Doubler"
    assert controller_params(name)[:2] == ["every", "gain"] and "max_window" in controller_params(name)
    c = build_controller(name, init=K0, every=2)
    assert [c.observe(s, 1.0).window for s in range(1, 5)] == [8, 16, 16, 32]
    assert c.settings()["gain"] == 2.0 and c.settings()["min_window"] == 1  # defaults filled, bounds too
    assert PLUGINS[name].__name__ == "Doubler"  # loaded once, then an entry like a built-in's
    with pytest.raises(ValueError, match=r"^gain: got 0.5, expected a float > 1$"):
        build_controller(name, init=K0, gain=0.5)
    cfg = load_run_config({**BASE, "controller": {"name": name, "every": 3}})
    assert cfg.controller == {"name": name, "every": 3}
    with pytest.raises(ConfigError, match=r"^controller.speed: unknown parameter"):
        load_run_config({**BASE, "controller": {"name": name, "speed": 3}})
    # a search space over its settings: every value it can yield is checked by its own PARAMS
    spec = parse_experiment({**BASE, "name": "p", "controller": {"name": name},
                             "search": {"space": {"controller.gain": {"uniform": [1.5, 3.0]}}, "num_samples": 2}})
    assert spec.arms[0].name == "tuned"
    with pytest.raises(ConfigError, match=r"search.space.controller.gain: .* can yield 1.0 .*gain: got 1.0, "
                                          r"expected a float > 1"):
        parse_experiment({**BASE, "name": "p", "controller": {"name": name},
                          "search": {"space": {"controller.gain": {"uniform": [1.0, 3.0]}}}})
    spec = parse_experiment({**BASE, "name": "p", "controller": {"name": name}})
    assert spec.arms[0].name == "Doubler"  # an arm the spec does not name is named by the class


def test_an_entry_point_plugin_loads_by_its_name(tmp_path, monkeypatch):
    """An installed package declares ``[metalearner.controllers] doubler-ep = mod:Class``:
    a distribution's metadata on sys.path, as pip leaves it."""
    plugin(tmp_path, "plug_entry_point")
    info = tmp_path / "plug_entry_point-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-entry-point\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[metalearner.controllers]\ndoubler-ep = plug_entry_point:Doubler\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    c = build_controller("doubler-ep", init=K0, every=1)
    assert c.observe(1, 1.0).window == 16
    cfg = load_run_config({**BASE, "controller": {"name": "doubler-ep"}})
    assert cfg.controller["name"] == "doubler-ep"
    with pytest.raises(ValueError, match=r"^name: got 'doubler-nope', expected one of .*'metalearner.controllers'"):
        build_controller("doubler-nope", init=K0)


MISSING_MEMBER = POLICY.replace("    def update(self, step, loss):", "    observe = None\n\n    def update(self, step, loss):")
NO_PARAMS = '''
class Bare:
    name = "bare"
    knobs = None
    loss_ewma = None
    def observe(self, step, loss): ...
    def settings(self): ...
    def state_dict(self): ...
    def load_state_dict(self, state): ...
'''
BAD_DEFAULT = POLICY.replace("Param(4,", "Param(0,")

# (id, module source or None (no module), controller name, extra --set, what the one line must say)
REFUSALS = [
    ("import-missing", None, "plug_absent.policies:Grow", [], "cannot be imported (ModuleNotFoundError"),
    ("import-raises", "raise RuntimeError('no GPU here')\n", "{mod}:Doubler", [],
     "cannot be imported (RuntimeError: no GPU here)"),
    ("attr-missing", POLICY, "{mod}:Halver", [], "cannot be imported (AttributeError"),
    ("not-a-class", "def make(**kw):\n    return None\n", "{mod}:make", [], "expected a class"),
    ("member-missing", NO_PARAMS, "{mod}:Bare", [], "lacks the Controller member 'PARAMS'"),
    ("member-not-callable", MISSING_MEMBER, "{mod}:Doubler", [], "lacks the Controller member 'observe'"),
    ("params-default-bad", BAD_DEFAULT, "{mod}:Doubler", [], "PARAMS['every'] has a default that fails"),
    ("setting-outside-check", POLICY, "{mod}:Doubler", ["controller.gain=0.9"],
     "controller.gain: got 0.9, expected a float > 1"),
    ("setting-unknown", POLICY, "{mod}:Doubler", ["controller.speed=2"], "controller.speed: unknown parameter"),
]


@pytest.mark.parametrize("source,name,sets,says", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_a_bad_plugin_is_refused_at_load_with_one_line(tmp_path, monkeypatch, capsys, source, name, sets, says):
    module = f"plug_refused_{abs(hash(says)) % 10**8}"  # a fresh module per case
    if source is not None:
        plugin(tmp_path / "code", module, source)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.chdir(tmp_path)
    name = name.format(mod=module)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "recall", "--controller", name, "--steps", "5", "--set", "model.preset=tiny",
              "--set", "train.seq_len=32", *[x for s in sets for x in ("--set", s)]])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("metalearner: error: controller.") and says in lines[0], lines[0]
    if "cannot be imported" in says:
        assert name in lines[0]  # the path it tried
    assert not (tmp_path / "mlflow.db").exists()
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_a_bad_plugin_exits_2_through_a_real_subprocess(cli, tmp_path):
    """The installed command, the plugin on PYTHONPATH: a setting outside its checks, then a
    module that fails to import, each one line and exit 2 before anything is written."""
    plugin(tmp_path / "code", "plug_subprocess")
    (tmp_path / "code" / "plug_broken.py").write_text("import numpy.does_not_exist\n")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path / "code")])}
    work = tmp_path / "work"
    work.mkdir()
    for name, extra, says in (("plug_subprocess:Doubler", ["--set", "controller.every=0"],
                               "controller.every: got 0, expected an int >= 1"),
                              ("plug_broken:Doubler", [], "'plug_broken:Doubler', which cannot be imported "
                                                          "(ModuleNotFoundError")):
        res = cli("train", "--task", "recall", "--controller", name, "--steps", "5", "--set", "model.preset=tiny",
                  *extra, cwd=work, env=env)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and says in lines[0], res.stderr[-2000:]
    assert list(work.iterdir()) == []


def _spec_file(folder: Path, runtime_env, name: str) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({**BASE, "name": "p", "controller": {"name": name},
                                    **({"runtime_env": runtime_env} if runtime_env is not None else {})}))
    return path


@pytest.mark.parametrize("runtime_env,flags,field", [
    ({"py_modules": ["nowhere/plug.py"]}, [], "runtime_env.py_modules[0]"),
    ({"working_dir": "code/plug_cli.py"}, [], "runtime_env.working_dir"),
    ({"pip": ["numpy"]}, [], "runtime_env.pip: unknown key"),
    ({"py_modules": "code/plug_cli.py"}, [], "runtime_env.py_modules"),
    (None, ["--py-modules", "nowhere"], "--py-modules"),
    (None, ["--working-dir", "spec.yaml"], "--working-dir"),
    (None, [], "controller.name: got 'plug_cli:Doubler', which cannot be imported"),
])
def test_bad_runtime_env_exits_2_with_one_line(tmp_path, monkeypatch, capsys, runtime_env, flags, field):
    plugin(tmp_path / "code", "plug_cli")  # not in the working folder, which may be on sys.path ('')
    monkeypatch.chdir(tmp_path)
    _spec_file(tmp_path, runtime_env, "plug_cli:Doubler")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "spec.yaml", "--num-cpus", "2", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and field in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code", "spec.yaml"]


def test_runtime_env_makes_the_plugin_importable_for_validation_and_is_kept(tmp_path, monkeypatch):
    """Spec paths are taken from the spec's folder, flag paths from the working folder; both
    are absolute in the spec (what is saved for a resume), and sys.path is left as it was."""
    code = plugin(tmp_path / "study" / "code", "plug_env_spec")
    plugin(tmp_path / "elsewhere", "plug_env_flag")
    spec_path = _spec_file(tmp_path / "study", {"py_modules": ["code/plug_env_spec.py"]}, "plug_env_spec:Doubler")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    args = build_parser().parse_args(["sweep", str(spec_path), "--num-cpus", "2"])
    spec = sweep_inputs(args)
    assert spec.runtime_env == {"py_modules": [str(code / "plug_env_spec.py")]}
    assert spec.raw["runtime_env"] == spec.runtime_env and sys.path == before
    spec_path.write_text(spec_path.read_text().replace("plug_env_spec:", "plug_env_flag:"))
    args = build_parser().parse_args(["sweep", str(spec_path), "--num-cpus", "2", "--py-modules",
                                      "elsewhere/plug_env_flag.py", "--working-dir", "study"])
    spec = sweep_inputs(args)
    assert spec.runtime_env == {"working_dir": str(tmp_path / "study"),
                                "py_modules": [str(code / "plug_env_spec.py"),
                                               str(tmp_path / "elsewhere" / "plug_env_flag.py")]}
    assert sys.path == before


# ---------------------------------------------------------------- a real sweep through runtime_env


@pytest.fixture(scope="module")
def plugin_sweep(tmp_path_factory):
    """The shipped study `experiments/plugin_policy.yaml` in smoke mode, copied with its
    plugin into a temporary folder, run by the real command from another folder on a local
    Ray of 2 CPUs; nothing but ``runtime_env`` takes the plugin to the workers."""
    tmp = tmp_path_factory.mktemp("plugin-sweep")
    study = tmp / "study"
    shutil.copytree(ROOT / "experiments" / "plugins", study / "plugins",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "experiments" / "plugin_policy.yaml", study / "plugin_policy.yaml")
    work = tmp / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # the plugin is not importable where the workers start (their PYTHONPATH, their working folder)
    probe = subprocess.run([sys.executable, "-c", "import grow_on_plateau"], cwd=work, env=env, capture_output=True)
    assert probe.returncode != 0
    res = subprocess.run([sys.executable, "-m", "metalearner.cli", "sweep", str(study / "plugin_policy.yaml"),
                          "--smoke-test", "--num-cpus", "2", "--tracking-uri", uri, "--storage", str(tmp / "ray")],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    return tmp, study, uri, res


def test_plugin_sweep_through_runtime_env_has_complete_traces_and_pbt_perturbs_its_settings(plugin_sweep):
    tmp, study, uri, res = plugin_sweep
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parent_id = next(line.split("parent run ")[1].split()[0] for line in res.stdout.splitlines()
                     if line.startswith("sweep finished"))
    client, parent, runs = children(uri, parent_id)
    assert parent.info.status == "FINISHED" and len(runs) == 4  # static + plugin + a PBT population of 2
    # the comparison: static, the plugin and the population's best member (per seed)
    assert len(assert_view_finds_runs(uri, parent_id, searched=True)) == 3
    perturbed = 0
    for r in runs:
        params = r.data.params
        n = int(params["train.steps"])
        for key in STEP_KEYS:
            if key == "loss_ewma" and params["controller.name"] == "static":
                continue
            assert [s for s, _ in history(client, r.info.run_id, key)] == list(range(1, n + 1)), (key, r.info.run_name)
        if r.data.tags["metalearner.arm"] == "static":
            continue
        assert params["controller.name"] == "grow_on_plateau:GrowOnPlateau"
        assert {"controller.factor", "controller.min_improvement", "controller.patience"} <= set(params)
        if r.data.tags["metalearner.arm"] == "grow_on_plateau-pbt":
            settings = {k: {v for _, v in history(client, r.info.run_id, f"controller.{k}")}
                        for k in ("factor", "min_improvement")}
            assert all(1.1 <= f <= 2.0 for f in settings["factor"]), settings  # inside the space, clamped
            assert all(0.0 <= m <= 0.05 for m in settings["min_improvement"]), settings
            perturbed += any(len(v) > 1 for v in settings.values())  # PBT changed a plugin setting mid-run
    assert perturbed >= 1
    windows = [v for r in runs if r.data.tags["metalearner.arm"] == "grow_on_plateau"
               for _, v in history(client, r.info.run_id, "window")]
    assert max(windows) > min(windows)  # the plugin moved the knobs on the workers


def test_the_plugin_sweeps_best_exports_and_resume_keeps_its_runtime_env(plugin_sweep, monkeypatch):
    from metalearner.report import export_best_controller, load_traces

    tmp, study, uri, res = plugin_sweep
    assert res.returncode == 0, res.stderr[-3000:]
    folder = Path(next(line.split("folder: ")[1] for line in res.stdout.splitlines() if "folder: " in line))
    parent_id = next(line.split("parent run ")[1].split()[0] for line in res.stdout.splitlines()
                     if line.startswith("sweep finished"))
    runs, traces = load_traces(uri, parent_id)
    doc = export_best_controller(runs, traces, tmp / "best.yaml", arm="grow_on_plateau-pbt")
    assert doc["controller"]["name"] == "grow_on_plateau:GrowOnPlateau" and doc["controller"]["factor"] > 1
    monkeypatch.chdir(tmp)
    spec = sweep_inputs(build_parser().parse_args(["sweep", "--resume", str(folder), "--num-cpus", "2"]))
    assert spec.runtime_env == {"py_modules": [str(study / "plugins" / "grow_on_plateau.py")]}
    cfg = load_run_config({**BASE, "controller": doc["controller"]})  # the export trains as it was
    assert cfg.controller["factor"] == doc["controller"]["factor"]



def test_the_example_plugin_resumes_exactly_and_grows_only_on_a_plateau(monkeypatch):
    """experiments/plugins/grow_on_plateau.py: falling losses leave the window alone, a flat
    loss grows it by ``factor`` per horizon; a state_dict taken midway continues identically."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments" / "plugins"))
    name = "grow_on_plateau:GrowOnPlateau"
    falling = build_controller(name, init=K0, patience=3, factor=2.0)
    assert {falling.observe(s, 10.0 / s).window for s in range(1, 13)} == {8}
    flat = build_controller(name, init=K0, patience=3, factor=2.0)
    assert [flat.observe(s, 1.0).window for s in range(1, 8)] == [8, 8, 8, 16, 16, 16, 32]
    losses = [2.0, 1.5, 1.2, 1.0] + [1.0] * 8  # falling, then flat
    a = build_controller(name, init=K0, patience=2, beta=0.0)
    for s, x in enumerate(losses[:6], 1):  # mid-horizon, before the first growth
        a.observe(s, x)
    b = build_controller(name, init=K0, patience=2, beta=0.0)
    b.load_state_dict(a.state_dict())
    rest = list(enumerate(losses[6:], 7))
    assert [a.observe(s, x) for s, x in rest] == [b.observe(s, x) for s, x in rest]
    assert a.state_dict() == b.state_dict() and a.knobs.window > K0.window  # it grew, on both
