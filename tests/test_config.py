"""Run-config validation, overrides and flattening."""

import pytest

from metalearner.config import ConfigError, apply_overrides, flatten, load_run_config, parse_override


def test_defaults_resolve():
    cfg = load_run_config({})
    assert cfg.task.name == "text" and cfg.controller["name"] == "ewma" and cfg.train.steps == 300


def test_round_trip_through_dict():
    cfg = load_run_config({"task": {"name": "recall", "distance": 32}, "model": {"preset": "tiny", "d_model": 48},
                           "controller": {"name": "ewma", "factor": 1.02}})
    again = load_run_config(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("data,field", [
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"steps": "many"}}, "train.steps"),
    ({"train": {"stepz": 5}}, "train.stepz"),
    ({"train": {"lr": -1.0}}, "train.lr"),
    ({"train": {"device": "tpu"}}, "train.device"),
    ({"task": {"name": "vision"}}, "task.name"),
    ({"task": {"name": "recall", "distance": 4}}, "task.distance"),
    ({"task": {"name": "text", "files": ["/nonexistent/a.txt"]}}, "task.files"),
    ({"model": {"preset": "huge"}}, "model.preset"),
    ({"model": {"d_model": 30, "n_heads": 4}}, "model."),
    ({"model": {"colour": "red"}}, "model.colour"),
    ({"controller": {"name": "pid"}}, "controller.name"),
    ({"controller": {"name": "ewma", "factor": 0.99}}, "controller.factor"),
    ({"controller": {"name": "ewma", "beta": 1.0}}, "controller.beta"),
    ({"controller": {"name": "ewma", "threshold": -0.1}}, "controller.threshold"),
    ({"trainer": {}}, "trainer"),
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        load_run_config(data)
    msg = str(e.value)
    assert msg.startswith(field), msg
    assert "\n" not in msg


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_override("train.steps=100") == ("train.steps", 100)
    assert parse_override("controller.factor=1.01") == ("controller.factor", 1.01)
    assert parse_override("task.files=a.txt,b.txt") == ("task.files", "a.txt,b.txt")
    data = apply_overrides({"train": {"steps": 5}}, ["train.steps=7", "controller.name=static"])
    assert data == {"train": {"steps": 7}, "controller": {"name": "static"}}
    with pytest.raises(ConfigError, match="--set"):
        parse_override("train.steps")


def test_comma_separated_list_coerces(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x" * 5000)
    b.write_text("y" * 5000)
    cfg = load_run_config(apply_overrides({}, [f"task.files={a},{b}"]))
    assert cfg.task.files == [str(a), str(b)]


def test_flatten_uses_dots():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
