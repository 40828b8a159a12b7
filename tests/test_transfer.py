"""Transfer (issue 20): a controller exported by one sweep, trained as a fixed arm of another.

One real pipeline in smoke size, shared by the assertions: ``experiments/run_study3.sh
--smoke-test`` runs the small model's sweep (study_long_small.yaml), copies its
``best_ewma-tuned.yaml`` and runs the large model's sweep (study_long.yaml) with that file
as ``--arm ewma-transferred=FILE``, on a real local Ray and a real SQLite MLflow store.
Then the inputs that must exit 2 before Ray starts, and the specs' shape."""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from _view import assert_view_finds_runs

from metalearner.config import ConfigError, load_run_config
from metalearner.experiment import load_experiment
from metalearner.model.hf_model import resolve_hf_config

ROOT = Path(__file__).resolve().parent.parent
SMALL, LONG = ROOT / "experiments/study_long_small.yaml", ROOT / "experiments/study_long.yaml"
ARMS = ["static", "static-w32", "skyladder", "ewma-tuned"]


@pytest.fixture(scope="module")
def study3(tmp_path_factory, empty_store):
    """The driver in smoke mode: (store folder, its SQLite URI, the finished process)."""
    store = tmp_path_factory.mktemp("study3")
    shutil.copyfile(empty_store, store / "mlflow.db")  # MLflow's schema made once per test process
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run(["bash", str(ROOT / "experiments/run_study3.sh"), "--smoke-test", str(store)], cwd=store,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return store, f"sqlite:///{store / 'mlflow.db'}", res


def _trials(uri, experiment):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`metalearner.kind` = 'trial'", max_results=100)


def test_the_transferred_arm_trains_exactly_the_exported_controller(study3):
    store, uri, _ = study3
    exported = store / "ewma_small_best.yaml"
    controller = yaml.safe_load(exported.read_text())["controller"]
    small = next(store.glob("ray/study_long_small-2*"))
    assert controller == yaml.safe_load((small / "best_ewma-tuned.yaml").read_text())["controller"]
    assert controller["name"] == "ewma" and {"factor", "beta", "threshold"} <= set(controller)

    (run,) = [r for r in _trials(uri, "study_long") if r.data.tags["metalearner.arm"] == "ewma-transferred"]
    assert run.info.status == "FINISHED" and run.data.tags["metalearner.phase"] == "compare"
    params = run.data.params
    assert params["controller.name"] == "ewma"
    for key, value in controller.items():  # every setting of the file, as the run logged it
        if key != "name":
            assert float(params[f"controller.{key}"]) == pytest.approx(value, rel=1e-12), key
    # where it came from: the file and the sha256 of its bytes
    assert run.data.tags["metalearner.controller_file"] == str(exported)
    assert run.data.tags["metalearner.controller_sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    # the other arms are no file's
    others = [r for r in _trials(uri, "study_long") if r.data.tags["metalearner.arm"] != "ewma-transferred"]
    assert others and not any("metalearner.controller_file" in r.data.tags for r in others)


def test_both_specs_ran_every_arm_in_smoke_mode_and_the_timings_were_kept(study3):
    store, uri, res = study3
    for experiment, arms in (("study_long_small", ARMS), ("study_long", [*ARMS, "ewma-pareto", "ewma-transferred"])):
        runs = _trials(uri, experiment)
        compare = {r.data.tags["metalearner.arm"] for r in runs if r.data.tags["metalearner.phase"] == "compare"}
        assert compare == set(arms), (experiment, compare)
        assert all(r.info.status == "FINISHED" for r in runs), experiment
        assert {r.data.params["train.seq_len"] for r in runs} == {"512"}
        (parent,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
        assert len(assert_view_finds_runs(uri, parent, searched=True)) == len(arms)  # the saved view: the comparison
    lines = (store / "timings.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == ["sweep study_long_small", "sweep study_long"], lines
    # the large sweep's saved spec pins the file's content for a resume
    saved = yaml.safe_load(next(store.glob("ray/study_long-2*/experiment.yaml")).read_text())
    (arm,) = [a for a in saved["arms"] if a["name"] == "ewma-transferred"]
    assert arm["controller_sha256"] == hashlib.sha256((store / "ewma_small_best.yaml").read_bytes()).hexdigest()


# ---------------------------------------------------------------- bad controller files


BAD_FILES = {
    "missing.yaml": None,
    "spec.yaml": "name: x\narms: []\n",
    "noname.yaml": "controller: {factor: 1.01}\n",
    "unknown.yaml": "controller: {name: nosuch}\n",
    "range.yaml": "controller: {name: ewma, factor: 0.5}\n",
    "key.yaml": "controller: {name: ewma, bogus: 1}\n",
    "yaml.yaml": "controller: [unclosed\n",
}
MESSAGES = {
    "missing.yaml": "expected an existing YAML file",
    "spec.yaml": "expected a controller file {controller: {name: ..., <settings>}}",
    "noname.yaml": "controller.name is None, expected the controller's name",
    "unknown.yaml": "controller.name: got 'nosuch'",
    "range.yaml": "controller.factor: got 0.5, expected a float > 1",
    "key.yaml": "controller.bogus: unknown parameter for controller 'ewma'",
    "yaml.yaml": "is not valid YAML",
}


def _bad(tmp_path, name):
    if BAD_FILES[name] is not None:
        (tmp_path / name).write_text(BAD_FILES[name])
    return tmp_path / name


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_controller_file_is_one_line_naming_the_arm_and_the_file(tmp_path, name):
    path = _bad(tmp_path, name)
    with pytest.raises(ConfigError) as err:  # as a spec arm
        load_experiment(LONG, smoke=True, arms=[f"moved={path}"])
    msg = str(err.value)
    assert msg.startswith(("--arm moved: ", "arms[5].controller_file: ")) and str(path) in msg, msg
    assert MESSAGES[name] in msg and "\n" not in msg, msg


def test_a_bad_arm_exits_2_before_ray_starts(cli, tmp_path):
    path = _bad(tmp_path, "range.yaml")
    res = cli("sweep", LONG, "--smoke-test", "--arm", f"moved={path}", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
              "--storage", tmp_path / "ray", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert f"arms[5].controller_file: {path}: controller.factor: got 0.5" in res.stderr, res.stderr
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray").exists()  # nothing started


@pytest.mark.parametrize("item,message", [
    ("static=best.yaml", "--arm: got the name 'static', which the spec's arms already have"),
    ("best.yaml", "--arm: got 'best.yaml', expected NAME=FILE"),
    ("no name=best.yaml", "--arm NAME: got 'no name', expected 1-64 letters"),
])
def test_a_bad_arm_flag_names_the_flag(item, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(LONG, arms=[item])
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("arm,message", [
    ({"name": "t", "controller_file": "best.yaml", "controller": {"name": "static"}},
     "arms[1].controller_file: got it with 'controller', expected one of them"),
    ({"name": "t", "controller_file": "best.yaml", "search": {"space": {"controller.beta": {"uniform": [0.5, 0.9]}}}},
     "arms[1].search: got a search with controller_file, expected none"),
    ({"name": "t", "controller_file": "best.yaml", "controller_sha256": "0" * 64},
     "arms[1].controller_sha256: got 0000"),
    ({"name": "t", "controller_sha256": "0" * 64, "controller": {"name": "static"}},
     "arms[1].controller_sha256: got it without controller_file"),
])
def test_controller_file_arms_in_a_spec(tmp_path, monkeypatch, arm, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "best.yaml").write_text("controller: {name: ewma, factor: 1.02, beta: 0.8, threshold: 0.001}\n")
    spec = {"name": "t", "task": {"name": "recall", "distance": 16, "n_pairs": 4}, "model": {"preset": "tiny"},
            "train": {"steps": 4, "seq_len": 32}, "arms": [{"name": "s", "controller": {"name": "static"}}]}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({**spec, "arms": [*spec["arms"],
                                                                       {"name": "t", "controller_file": "best.yaml"}]}))
    ok = load_experiment(tmp_path / "ok.yaml")  # a relative path is the working folder's, made absolute
    assert ok.arms[1].controller == {"name": "ewma", "factor": 1.02, "beta": 0.8, "threshold": 0.001}
    assert ok.raw["arms"][1]["controller_file"] == str(tmp_path / "best.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "arms": [*spec["arms"], arm]}))
    with pytest.raises(ConfigError) as err:
        load_experiment(tmp_path / "bad.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_an_arm_flag_on_a_spec_without_arms_keeps_its_single_arm(tmp_path):
    (tmp_path / "best.yaml").write_text("controller: {name: ewma, factor: 1.02}\n")
    spec = load_experiment(ROOT / "experiments/tune_ewma_asha.yaml", smoke=True, arms=[f"t={tmp_path / 'best.yaml'}"])
    assert [(a.name, a.search is not None, a.controller) for a in spec.arms] == [
        ("tuned", True, {"name": "ewma"}), ("t", False, {"name": "ewma", "factor": 1.02})]


def test_a_resume_refuses_a_controller_file_that_changed(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text("controller: {name: ewma, factor: 1.02}\n")
    saved = tmp_path / "experiment.yaml"  # what a sweep saves: the raw spec, the file's sha256 pinned
    saved.write_text(yaml.safe_dump(load_experiment(LONG, smoke=True, arms=[f"moved={best}"]).raw))
    assert load_experiment(saved).arms[-1].tags()["metalearner.controller_sha256"]
    best.write_text("controller: {name: ewma, factor: 1.03}\n")
    with pytest.raises(ConfigError, match=r"^arms\[5\]\.controller_sha256: got [0-9a-f]{64}, but .* now has sha256"):
        load_experiment(saved)


# ---------------------------------------------------------------- the specs


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
def test_the_long_study_specs(smoke):
    small, large = load_experiment(SMALL, smoke=smoke), load_experiment(LONG, smoke=smoke)
    assert [a.name for a in small.arms] == ARMS and [a.name for a in large.arms] == [*ARMS, "ewma-pareto"]
    assert [o.metric for o in large.arms[-1].search.objectives] == ["val_loss", "attn_compute"]
    for spec in (small, large):
        assert spec.base["train"]["seq_len"] >= 512  # a context where windows cost
        assert len(spec.seeds) == (1 if smoke else 5)
        assert spec.arms[0].controller == {"name": "static", "min_window": 512}  # full window from step 1
    if not smoke:  # the larger model is >= 10x the small one, at the same context and training
        assert {k: v for k, v in small.base["train"].items()} == large.base["train"]
        n = [resolve_hf_config(s.base["model"]["hf"], 256, 512).n_params for s in (small, large)]
        assert n[1] >= 10 * n[0], n
        cfg = load_run_config(large.run_config(large.arms[2], 0))
        assert cfg.controller["warmup_steps"] < cfg.train.steps  # the SkyLadder ramp ends before training does
