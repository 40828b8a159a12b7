"""Experiment specs: every shipped spec validates; invalid specs fail with one line."""

from pathlib import Path

import pytest
import yaml

from metalearner.config import ConfigError
from metalearner.experiment import load_experiment

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_experiments_validate(path, smoke, tmp_path):
    raw = yaml.safe_load(path.read_text())
    assert "smoke" in raw, f"{path.name} has no smoke block"
    overrides = []
    if raw.get("task", {}).get("name") == "speech":
        # the spec points at data the user makes first; validate it against a stand-in folder
        (tmp_path / "metadata.csv").write_text("file_name,transcription\n")
        overrides = [f"task.data_dir={tmp_path}"]
    spec = load_experiment(path, smoke=smoke, overrides=overrides)
    assert spec.name == path.stem and spec.arms


def _write(tmp_path, data):
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {"name": "t", "task": {"name": "recall", "distance": 16, "n_pairs": 4}, "model": {"preset": "tiny"},
        "train": {"steps": 20, "seq_len": 32}}


def _search(space, searcher="random", scheduler="fifo"):
    return {**BASE, "controller": {"name": "ewma"},
            "search": {"space": space, "searcher": searcher, "scheduler": {"name": scheduler}}}


@pytest.mark.parametrize("data,field", [
    ({**BASE, "colour": 1}, "colour"),
    ({**BASE, "train": {"steps": "x"}}, "train.steps"),
    (_search({"controller.factor": {"uniform": [1.05, 1.01]}}), "search.space.controller.factor"),
    (_search({"controller.factor": {"uniform": [1.01, 1.01]}}), "search.space.controller.factor"),
    (_search({"controller.factor": {"loguniform": [0.9, 1.1]}}), "search.space.controller.factor"),
    (_search({"controller.factor": {"choice": [1.0, 1.1]}}), "search.space.controller.factor"),
    (_search({"controller.beta": {"uniform": [0.5, 1.5]}}), "search.space.controller.beta"),
    (_search({"controller.beta": {"choice": [0.9, 1.0]}}), "search.space.controller.beta"),
    (_search({"controller.factor": {"normal": [1, 2]}}), "search.space.controller.factor"),
    (_search({}), "search.space"),
    (_search({"controller.factor": {"uniform": [1.01, 1.1]}}, searcher="optuna", scheduler="pbt"), "search.searcher"),
    (_search({"controller.factor": {"uniform": [1.01, 1.1]}}, searcher="bayes"), "search.searcher"),
    (_search({"controller.factor": {"uniform": [1.01, 1.1]}}, scheduler="median"), "search.scheduler.name"),
    ({**BASE, "search": {"space": {"controller.factor": {"uniform": [1.01, 1.1]}},
                         "scheduler": {"name": "asha", "grace_period": 10**6}}}, "search.scheduler.grace_period"),
    ({**BASE, "seeds": []}, "seeds"),
    ({**BASE, "task": {"name": "text", "files": ["/no/such.txt"]}}, "task.files"),
    ({**BASE, "arms": [{"name": "a", "controller": {"name": "ewma", "factor": 0.5}}]}, "arms[0].controller.factor"),
    ({**BASE, "arms": [{"name": "a", "controller": {"name": "static"}}, {"name": "a", "controller": {"name": "static"}}]},
     "arms[1].name"),
])
def test_invalid_specs_name_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError) as e:
        load_experiment(_write(tmp_path, data))
    assert str(e.value).startswith(field), str(e.value)


def test_smoke_block_applies_to_every_search(tmp_path):
    data = {**BASE, "arms": [
        {"name": "s", "controller": {"name": "static"}},
        {"name": "t", "controller": {"name": "ewma"},
         "search": {"space": {"controller.factor": {"uniform": [1.01, 1.1]}}, "num_samples": 8}}],
        "smoke": {"train.steps": 4, "search.num_samples": 1}}
    spec = load_experiment(_write(tmp_path, data), smoke=True)
    assert spec.arms[1].search.num_samples == 1 and spec.base["train"]["steps"] == 4
    spec = load_experiment(_write(tmp_path, data), smoke=False, overrides=["train.steps=9"])
    assert spec.arms[1].search.num_samples == 8 and spec.base["train"]["steps"] == 9


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="experiment"):
        load_experiment(tmp_path / "nope.yaml")


def _pbt(space, **extra):
    return {**BASE, "controller": {"name": "ewma"}, **extra,
            "search": {"space": space, "scheduler": {"name": "pbt"}}}


@pytest.mark.parametrize("space", [
    {"controller.beta": {"uniform": [0.5, 1.0]}},  # PBT clamps onto 1.0
    {"controller.beta": {"loguniform": [0.5, 1.0]}},
    {"controller.beta": {"choice": [0.9, 1.0]}},
    {"controller.factor": {"uniform": [1.0, 1.1]}},  # a factor must be > 1 at the low end too
    {"controller.threshold": {"uniform": [-0.1, 0.1]}},
    {"controller.min_window": {"randint": [1, 1000]}},  # the high end passes train.seq_len
    {"train.seed": {"choice": [1, 2]}},
    {"train.steps": {"uniform": [10, 20]}},  # floats for an int setting
])
def test_every_value_a_space_can_yield_must_be_valid(tmp_path, space):
    with pytest.raises(ConfigError) as e:
        load_experiment(_write(tmp_path, _pbt(space)))
    (key,) = space
    assert str(e.value).startswith(f"search.space.{key}"), str(e.value)


def test_open_ranges_inside_the_bounds_load(tmp_path):
    spec = load_experiment(_write(tmp_path, _pbt({"controller.beta": {"uniform": [0.5, 0.99]},
                                                  "controller.min_window": {"randint": [1, 33]}})))
    assert spec.arms[0].search.space["controller.beta"] == {"uniform": [0.5, 0.99]}


@pytest.mark.parametrize("data,field", [
    ({**BASE, "metric": "accuracy"}, "metric"),
    ({**BASE, "mode": "max"}, "mode"),  # val_loss is minimised
    ({**BASE, "metric": "recall_acc", "mode": "min"}, "mode"),
    ({**BASE, "train": {**BASE["train"], "seed": 3}}, "train.seed"),
    ({**BASE, "train": {**BASE["train"], "checkpoint_every": 15, "report_every": 10}}, "train.checkpoint_every"),
    ({**BASE, "name": "../evil"}, "name"),
    ({**BASE, "arms": [{"name": "a/b", "controller": {"name": "static"}}]}, "arms[0].name"),
    ({**BASE, "seeds": [1, 1]}, "seeds"),
    ({**BASE, "seeds": 0}, "seeds"),
    ({**BASE, "task": None}, "task"),
    ({**BASE, "seed": "x"}, "seed"),
    ({**BASE, "stop": {"time_budget_s": float("inf")}}, "stop.time_budget_s"),
    ({**BASE, "resources": {"cpus_per_trial": float("nan")}}, "resources.cpus_per_trial"),
])
def test_spec_rules_name_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError) as e:
        load_experiment(_write(tmp_path, data))
    assert str(e.value).startswith(field), str(e.value)


def test_metric_may_be_a_task_metric_with_its_direction(tmp_path):
    spec = load_experiment(_write(tmp_path, {**BASE, "metric": "recall_acc", "mode": "max", "seeds": 2}))
    assert (spec.metric, spec.mode, spec.seeds) == ("recall_acc", "max", [0, 1])


def test_task_metric_modes_match_the_tasks():
    from metalearner.experiment import TASK_METRIC_MODES
    from metalearner.tasks import RecallTask, TextTask
    from metalearner.tasks.speech import SpeechTask

    for name, cls in (("recall", RecallTask), ("text", TextTask), ("speech", SpeechTask)):
        assert set(TASK_METRIC_MODES[name]) == set(getattr(cls, "eval_metric_names", ())), name


@pytest.mark.parametrize("searcher,scheduler,module,extra", [
    ("hyperopt", "fifo", "hyperopt", "metalearner[hyperopt]"),
    ("random", "pb2", "sklearn", "metalearner[pb2]"),
])
def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch, searcher, scheduler, module, extra):
    import sys

    from metalearner.experiment import check_extras

    data = {**BASE, "controller": {"name": "ewma"},
            "search": {"space": {"controller.factor": {"uniform": [1.01, 1.1]}}, "searcher": searcher,
                       "scheduler": {"name": scheduler}}}
    spec = load_experiment(_write(tmp_path, data))
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ConfigError) as e:
        check_extras(spec)
    assert extra in str(e.value) and repr(module) in str(e.value)
    monkeypatch.undo()
    if __import__("importlib").util.find_spec(module) is not None:
        check_extras(spec)  # installed: nothing to say


def test_not_utf8_spec(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_bytes(b"name: t\ndescription: \xff\n")
    with pytest.raises(ConfigError, match="^experiment: got .* expected UTF-8 text"):
        load_experiment(p)


def test_train_seed_is_allowed_only_where_it_is_honoured(tmp_path):
    spec = load_experiment(_write(tmp_path, {**BASE, "train": {**BASE["train"], "seed": 3}, "seeds": [3]}))
    assert spec.run_config(spec.arms[0], 3)["train"]["seed"] == 3
    with pytest.raises(ConfigError, match="^train.seed"):
        load_experiment(_write(tmp_path, {**BASE, "train": {**BASE["train"], "seed": 3}, "seeds": [3, 4]}))
