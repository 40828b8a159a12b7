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
