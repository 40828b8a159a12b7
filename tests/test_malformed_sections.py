"""Config sections of the wrong type, at the library level: `load_run_config` (a run config)
and `parse_experiment` (a spec) raise one `ConfigError` line that starts with the section's
name, never a TypeError/AttributeError from deeper down. (The same inputs through the real
command line are the table-driven suite of the CLI tests.)"""

import copy

import pytest

from metalearner.config import ConfigError, load_run_config
from metalearner.experiment import parse_experiment

WRONG = [5, 1.5, True, "text", [1, 2], [{"name": "x"}]]
WRONG_IDS = ["int", "float", "bool", "str", "list", "list-of-maps"]


def assert_one_line_naming(error, field):
    msg = str(error.value)
    assert "\n" not in msg, msg
    assert msg.startswith(field) and msg[len(field)] in ":. [", msg


@pytest.mark.parametrize("value", WRONG, ids=WRONG_IDS)
@pytest.mark.parametrize("section", ["task", "model", "train", "controller"])
def test_run_config_section_of_the_wrong_type(section, value):
    with pytest.raises(ConfigError) as e:
        load_run_config({section: value})
    assert_one_line_naming(e, section)


@pytest.mark.parametrize("value", [5, "x", [1]], ids=["int", "str", "list"])
def test_run_config_that_is_not_a_mapping(value):
    with pytest.raises(ConfigError) as e:
        load_run_config(value)
    assert "\n" not in str(e.value)


BASE = {"name": "malformed", "task": {"name": "recall", "n_pairs": 4, "distance": 16},
        "model": {"preset": "tiny"}, "train": {"steps": 10, "seq_len": 32}}
SEARCH = {"searcher": "random", "num_samples": 2, "space": {"controller.factor": {"uniform": [1.01, 1.5]}}}


def base_for(path):
    """A valid spec that has the section ``path`` points into."""
    data = copy.deepcopy({**BASE, "controller": {"name": "ewma"}})
    if path[0] == "search":
        data["search"] = copy.deepcopy(SEARCH)
    if path[0] == "arms":
        data.pop("controller")
        data["arms"] = [{"name": "a", "controller": {"name": "ewma"}, "search": copy.deepcopy(SEARCH)}]
    return data


def spec_with(path, value):
    """``base_for(path)`` with ``value`` put at ``path`` (a tuple of keys/indexes)."""
    data = base_for(path)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


SPEC_CASES = [
    (("task",), "task"),
    (("model",), "model"),
    (("train",), "train"),
    (("controller",), "controller"),
    (("resources",), "resources"),
    (("stop",), "stop"),
    (("search",), "search"),
    (("search", "scheduler"), "search.scheduler"),
    (("search", "space"), "search.space"),
    (("arms",), "arms"),
    (("arms", 0), "arms[0]"),
    (("arms", 0, "controller"), "arms[0].controller"),
    (("arms", 0, "search"), "arms[0].search"),
    (("arms", 0, "search", "space"), "arms[0].search.space"),
]


@pytest.mark.parametrize("value", [5, "x", [1, 2]], ids=["int", "str", "list"])
@pytest.mark.parametrize("path,field", SPEC_CASES, ids=[f for _, f in SPEC_CASES])
def test_spec_section_of_the_wrong_type(path, field, value):
    with pytest.raises(ConfigError) as e:
        parse_experiment(spec_with(path, value))
    assert_one_line_naming(e, field)


@pytest.mark.parametrize("value", [{"a": 1}, "x", 3.5, [0, "1"], [-1], [True]],
                         ids=["map", "str", "float", "mixed", "negative", "bool"])
def test_seeds_of_the_wrong_type(value):
    with pytest.raises(ConfigError) as e:
        parse_experiment({**BASE, "seeds": value})
    assert_one_line_naming(e, "seeds")


def test_the_specs_the_cases_start_from_are_valid():
    """Each case differs from a valid spec in the one section it breaks."""
    for path, _ in SPEC_CASES:
        spec = parse_experiment(base_for(path))
        assert spec.name == "malformed" and spec.arms
