"""The saved MLflow view and the printed links: the format pinned, the fallbacks checked.

The saved-view format is not a documented MLflow API. These tests pin what
`metalearner.report.view` writes against what the installed MLflow 3.17 frontend reads
(the strings its bundle checks for), and check that other versions get the plain link.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

import pytest

from metalearner import report
from metalearner.report.view import (
    KNOB_SECTION,
    charted_keys,
    grouped_by,
    read_saved_view,
    saved_view,
    view_state,
)
from metalearner.tracking import (
    ARM_TAG,
    PHASE_TAG,
    SEARCH_GREY,
    SEED_TAG,
    arm_colours,
    experiment_url,
    mlflow_version,
    run_colour,
    ui_features,
)

PID = "0123456789abcdef0123456789abcdef"


def bundle() -> str:
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(Path(f).read_text(errors="ignore") for f in glob.glob(str(js / "*.js")))


def test_the_envelope_is_what_the_ui_parses():
    key, value = saved_view(view_state(PID, 12), now_ms=1_700_000_000_000)
    env = json.loads(value)
    assert set(env) == {"name", "createdAt", "updatedAt", "state"}
    assert isinstance(env["name"], str) and env["createdAt"] == env["updatedAt"] == 1_700_000_000_000
    assert isinstance(env["state"], str)  # the UI parses the state string itself
    assert key == hashlib.sha256(env["state"].encode()).hexdigest()  # named as the UI names its shared views
    assert read_saved_view(value) == view_state(PID, 12)
    assert saved_view(view_state(PID, 12), now_ms=1)[0] == key  # the key depends on the state only
    assert saved_view(view_state(PID, 13))[0] != key != saved_view(view_state(PID[::-1], 12))[0]
    with pytest.raises(ValueError, match="saved view: got"):
        read_saved_view(json.dumps({"name": "x", "createdAt": 1, "state": {"not": "a string"}}))


def test_the_state_opens_on_knob_traces_of_every_compare_trial_grouped_by_arm():
    state = view_state(PID, 40)
    assert charted_keys(state)[:2] == ["window", "rope_base"]
    assert list(grouped_by(state)) == [ARM_TAG]
    assert state["groupBy"] == {"aggregateFunction": "average",
                                "groupByKeys": [{"mode": "tag", "groupByData": ARM_TAG}]}
    assert state["useGroupedValuesInCharts"] is False  # the trials, not a mean per arm
    assert state["runsHiddenMode"] == "SHOW_ALL"
    charts = state["compareRunCharts"]
    assert all(c["runsCountToCompare"] >= 40 for c in charts)  # the UI's default draws 10 runs
    lines = [c for c in charts if c["type"] == "LINE"]
    assert [c["scaleType"] for c in lines[:2]] == ["linear", "log"]  # rope_base on a log axis
    sections = state["compareRunSections"]
    assert sections[0]["name"] == KNOB_SECTION and charts[0]["metricSectionId"] == sections[0]["uuid"]
    # the UI keeps its generated sections last; ours stay first
    assert [s["name"] for s in sections[-2:]] == ["Model metrics", "System metrics"]
    assert state["isAccordionReordered"] is True
    assert f"'{PID}'" in state["searchFilter"] and "'compare'" in state["searchFilter"]
    for k in ("searchFilter", "selectedColumns", "groupBy", "useGroupedValuesInCharts", "compareRunSections",
              "compareRunCharts", "chartsSearchFilter"):
        assert k in state


@pytest.mark.skipif(not ui_features()["saved_view"], reason="the installed MLflow is not a verified version")
def test_the_installed_frontend_still_reads_these_names():
    js = bundle()
    for name in ("mlflow.sharedViewState.", "viewStateShareKey", "compareRunsMode", "workflowType",
                 "useGroupedValuesInCharts", "chartsSearchFilter", "compareRunSections", "groupByKeys",
                 "runsHiddenMode", "mlflow.runColor", "Invalid saved-view envelope", "createdAt", "updatedAt"):
        assert name in js, name


def test_links_carry_the_workflow_type_and_fall_back_quietly():
    uri = "sqlite:////tmp/x/mlflow.db"
    assert experiment_url(uri, "7", "k" * 64, version=(3, 17)) == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=" + "k" * 64
        + "&compareRunsMode=CHART&workflowType=machine_learning")
    assert experiment_url(uri, "7", version=(3, 17)).endswith("#/experiments/7/runs?workflowType=machine_learning")
    # a version whose UI was not checked: the plain link, still on the model-training page
    assert experiment_url(uri, "7", "k" * 64, version=(3, 12)).endswith("/runs?workflowType=machine_learning")
    assert experiment_url(uri, "7", "k" * 64, version=(4, 0)).endswith("/runs?workflowType=machine_learning")
    assert experiment_url(uri, "7", "k" * 64, version=(2, 22)).endswith("#/experiments/7/runs")
    assert experiment_url("http://tracking:5000/", "7", version=(3, 17)).startswith("http://tracking:5000/#/")
    assert ui_features((3, 17)) == {"workflow_type": True, "saved_view": True, "run_color": True}
    assert not ui_features((3, 16))["saved_view"] and not ui_features((3, 16))["run_color"]
    assert mlflow_version() >= (3, 0)


def test_one_colour_per_arm_and_grey_for_search_trials():
    colours = arm_colours(["static", "schedule", "ewma", "static"])
    assert list(colours) == ["static", "schedule", "ewma"]
    assert len(set(colours.values())) == 3 and all(c.startswith("#") and len(c) == 7 for c in colours.values())
    assert run_colour("ewma", "compare", colours) == colours["ewma"]
    assert run_colour("ewma", "search", colours) == SEARCH_GREY
    assert run_colour("unknown", "compare", colours) is None


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    """A real SQLite store: this sweep (static and ewma x seeds 0, 1 in the compare phase, one
    ewma search trial) and an older sweep with a compare trial of its own, both in one experiment."""
    import mlflow
    from mlflow.entities import Metric, Param

    tmp = tmp_path_factory.mktemp("view")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("view-sweep", artifact_location=(tmp / "artifacts").as_uri())

    def trial(parent: str, arm: str, phase: str, seed: int) -> str:
        tags = {"mlflow.parentRunId": parent, "metalearner.kind": "trial", ARM_TAG: arm, PHASE_TAG: phase,
                SEED_TAG: str(seed)}
        rid = client.create_run(exp, run_name=f"{arm}-{phase}-{seed}", tags=tags).info.run_id
        points = [(k, v, s) for s in (1, 2) for k, v in
                  (("loss", 3.0 - s), ("window", 8.0), ("rope_base", 1e4), ("val_loss", 3.0 - s + 0.1 * seed))]
        client.log_batch(rid, metrics=[Metric(k, v, 0, s) for k, v, s in points],
                         params=[Param("controller.name", arm), Param("train.steps", "2")])
        client.set_terminated(rid)
        return rid

    older = client.create_run(exp, tags={"metalearner.kind": "sweep"}, run_name="older", start_time=1).info.run_id
    trial(older, "static", "compare", 0)
    pid = client.create_run(exp, tags={"metalearner.kind": "sweep"}, run_name="this", start_time=2).info.run_id
    compare = {trial(pid, arm, "compare", seed) for arm in ("static", "ewma") for seed in (0, 1)}
    trial(pid, "ewma", "search", 1000)
    return {"uri": uri, "client": client, "exp": exp, "parent": pid, "compare": compare}


@pytest.mark.skipif(not ui_features()["saved_view"], reason="the installed MLflow is not a verified version")
def test_the_saved_view_round_trips_through_mlflow_and_selects_this_sweeps_compare_trials(two_sweeps, tmp_path):
    client, exp, pid = two_sweeps["client"], two_sweeps["exp"], two_sweeps["parent"]
    rep = report.write_report(two_sweeps["uri"], pid, tmp_path)
    assert rep.view_key and f"viewStateShareKey={rep.view_key}" in rep.url
    stored = client.get_experiment(exp).tags["mlflow.sharedViewState." + rep.view_key]
    state = read_saved_view(stored)
    assert state == view_state(pid, 4)  # what was written is what the UI reads back
    assert rep.view_key == hashlib.sha256(json.loads(stored)["state"].encode()).hexdigest()
    # the view's filter, run by MLflow itself, selects exactly this sweep's compare trials
    hits = client.search_runs([exp], state["searchFilter"])
    assert {r.info.run_id for r in hits} == two_sweeps["compare"]
    assert {r.data.tags[next(iter(grouped_by(state)))] for r in hits} == {"static", "ewma"}  # two groups
    assert all(set(charted_keys(state)[:4]) <= set(r.data.metrics) for r in hits)  # charts of logged keys
