"""The saved MLflow view, the printed links and the landing page: the format pinned, the
fallbacks checked, the answer line and the live review on a real store.

The saved-view format is not a documented MLflow API. These tests pin what
`metalearner.report.view` writes against what the installed MLflow 3.17 frontend reads
(the strings its bundle checks for), and check that other versions get the plain link.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metalearner import report
from metalearner.report.compare import Comparison
from metalearner.report.export import best_params
from metalearner.report.landing import NOTE_END, answer_line, plot_delta
from metalearner.report.live import LiveReview
from metalearner.report.stats import mde_sentence
from metalearner.report.view import (
    DELTA_SECTION,
    KNOB_SECTION,
    SETTINGS_SECTION,
    charted_keys,
    delta_key,
    grouped_by,
    read_saved_view,
    saved_view,
    search_filter,
    view_key,
    view_state,
)
from metalearner.tracking import (
    ARM_TAG,
    NOTE_TAG,
    PHASE_TAG,
    SEARCH_GREY,
    SEED_TAG,
    MlflowWriter,
    arm_colours,
    experiment_url,
    mlflow_version,
    run_colour,
    ui_features,
)

PID = "0123456789abcdef0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def bundle() -> str:
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(Path(f).read_text(errors="ignore") for f in glob.glob(str(js / "*.js")))


def test_the_envelope_is_what_the_ui_parses_under_a_key_fixed_per_sweep():
    key = view_key(PID)
    value = saved_view(view_state(PID, 12), key, created_ms=1_600_000_000_000, now_ms=1_700_000_000_000)
    env = json.loads(value)
    assert set(env) == {"name", "createdAt", "updatedAt", "state"}
    assert isinstance(env["name"], str) and (env["createdAt"], env["updatedAt"]) == (1_600_000_000_000,
                                                                                        1_700_000_000_000)
    assert isinstance(env["state"], str)  # the UI parses the state string itself
    assert read_saved_view(value) == view_state(PID, 12)
    # the key names the sweep, not the state: the link printed at the start opens every later view
    assert len(key) == 64 and view_key(PID) == key != view_key(PID[::-1])
    assert view_state(PID, 12, "trials") != view_state(PID, 12, "compare")
    with pytest.raises(ValueError, match="saved view: key: got"):
        saved_view(view_state(PID, 12), "../x")
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
    # differences drawn where 0 means static (not losses on bars from 0), after the knobs
    assert charted_keys(state)[2] == delta_key("val_loss") == "val_loss_delta_vs_static"
    assert [s["name"] for s in sections[:2]] == [KNOB_SECTION, DELTA_SECTION]
    assert "val_loss_final" not in charted_keys(state)
    # quality against compute, no click: each run's final metric against its attention compute
    (front,) = [c for c in charts if c["type"] == "SCATTER"]
    assert (front["xaxis"], front["yaxis"]) == ({"key": "attn_compute", "type": "METRIC"},
                                                {"key": "val_loss", "type": "METRIC"})
    assert "val_loss vs attn_compute" in charted_keys(state)
    for k in ("searchFilter", "selectedColumns", "groupBy", "useGroupedValuesInCharts", "compareRunSections",
              "compareRunCharts", "chartsSearchFilter"):
        assert k in state


def test_while_searches_run_the_view_shows_every_trial_and_the_settings_pbt_moves():
    state = view_state(PID, 4, "trials", settings=["controller.factor", "controller.beta"])
    assert state["searchFilter"] == search_filter(PID, "trials") == f"tags.`mlflow.parentRunId` = '{PID}'"
    keys = charted_keys(state)
    assert keys[:2] == ["window", "rope_base"] and delta_key("val_loss") not in keys
    assert keys[2:4] == ["controller.beta", "controller.factor"]  # the settings in force, per step
    assert SETTINGS_SECTION in [s["name"] for s in state["compareRunSections"]]
    assert SETTINGS_SECTION not in [s["name"] for s in view_state(PID, 4, "trials")["compareRunSections"]]
    with pytest.raises(ValueError, match="shows: got 'search'"):
        view_state(PID, 4, "search")


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
    assert rep.view_key == view_key(pid) and f"viewStateShareKey={rep.view_key}" in rep.url
    stored = client.get_experiment(exp).tags["mlflow.sharedViewState." + rep.view_key]
    state = read_saved_view(stored)
    assert state == view_state(pid, 5)  # what was written is what the UI reads back
    # the view's filter, run by MLflow itself, selects exactly this sweep's compare trials
    hits = client.search_runs([exp], state["searchFilter"])
    assert {r.info.run_id for r in hits} == two_sweeps["compare"]
    assert {r.data.tags[next(iter(grouped_by(state)))] for r in hits} == {"static", "ewma"}  # two groups
    assert all({"window", "rope_base", "val_loss", "loss"} <= set(r.data.metrics) for r in hits)
    # each ewma trial carries its difference from static on its seed (val_loss 3.0 - 2 + 0.1 seed, same for both)
    deltas = {r.data.tags[SEED_TAG]: r.data.metrics.get(delta_key("val_loss")) for r in hits
              if r.data.tags[ARM_TAG] == "ewma"}
    assert deltas == {"0": 0.0, "1": 0.0}
    # the landing page: the experiment's description opens on the overall answer, the chart is there
    described = client.get_experiment(exp).tags[NOTE_TAG]
    first = described.splitlines()[0]
    assert first.startswith("**no arm differs from static at n=2") and "cannot be detected" in first, first
    assert f"viewStateShareKey={rep.view_key}" in described.splitlines()[1]
    assert f"runs/{pid}/artifacts/report" in described and NOTE_END in described
    assert f"get-artifact?path=report%2Fdelta_vs_static.png&run_uuid={pid}" in described
    assert "report/delta_vs_static.png" in [a.path for a in client.list_artifacts(pid, "report")]
    parent_note = client.get_run(pid).data.tags[NOTE_TAG]
    assert parent_note.startswith("**no arm differs from static at n=2")  # not the first arm's line
    # a user's own words after the summary survive a second report
    client.set_experiment_tag(exp, NOTE_TAG, described + "\n\nmy notes")
    report.write_report(two_sweeps["uri"], pid, tmp_path)
    assert client.get_experiment(exp).tags[NOTE_TAG].endswith(NOTE_END + "\n\nmy notes")


def _comparison(rows: list[dict], sentence: str = "") -> Comparison:
    cols = ["arm", "phase", "verdict", "vs_static_delta", "vs_static_ci95", "mde", "final_val_loss_mean",
            "value_mean", "n_finished"]
    return Comparison(pd.DataFrame([{c: r.get(c, np.nan) for c in cols} for r in rows]), mde_sentence=sentence)


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_spec_opens_on_trials_its_first_phase_makes(path, tmp_path):
    """Which view a sweep of each shipped spec writes first: a spec that searches first shows
    every trial (its search makes them; PBT with confirm: false never makes others), one
    without a search the comparison's; the charts draw every trial and the settings PBT moves."""
    from metalearner.experiment import load_experiment
    from trainables.sweep import review_plan

    (tmp_path / "metadata.csv").write_text("file_name,transcription\na.wav,one\n")  # the speech spec's corpus, named
    spec = load_experiment(path, smoke=True, overrides=[f"task.data_dir={tmp_path}"] if "speech" in path.stem else [])
    first, n_runs, settings = review_plan(spec)
    searched = [a.search for a in spec.arms if a.search]
    assert first == ("trials" if searched else "compare")
    assert review_plan(spec, compared=True)[0] == "compare"  # a resumed sweep past its searches
    cells = len(spec.arms) * len(spec.seeds)
    assert n_runs >= cells + sum(s.num_samples for s in searched)
    pbt = [s for s in searched if s.population_based]
    assert settings == sorted({k for s in pbt for k in s.space})
    assert bool(settings) == (path.stem in ("pbt_ewma", "plugin_policy", "study_recall", "study_text"))
    state = view_state(PID, n_runs, first, settings)
    assert set(settings) <= set(charted_keys(state))


def test_the_answer_line_is_the_overall_answer_not_the_first_arm():
    sentence = mde_sentence(2, 0.7412, "val_loss", n_comparisons=3)
    base = {"arm": "static", "phase": "compare", "verdict": "baseline"}
    same = [base] + [{"arm": a, "phase": "compare", "verdict": "no clear difference", "vs_static_delta": 0.1,
                      "vs_static_ci95": 0.5, "mde": 0.74} for a in ("ewma", "schedule")]
    assert answer_line(_comparison(same, sentence)) == (
        "no arm differs from static at n=2; differences in val_loss under 0.741 cannot be detected")
    mixed = [base, {"arm": "ewma", "phase": "compare", "verdict": "better"},
             {"arm": "schedule", "phase": "compare", "verdict": "worse"},
             {"arm": "plateau", "phase": "compare", "verdict": "no clear difference"},
             {"arm": "dead", "phase": "compare", "verdict": "no verdict: all 2 runs failed"}]
    assert answer_line(_comparison(mixed, sentence)) == (
        "better than static: ewma; worse than static: schedule; 1 other arm does not differ at n=2; "
        "no verdict for dead; differences in val_loss under 0.741 cannot be detected")
    one_seed = mde_sentence(1, math.inf, "val_loss")
    assert answer_line(_comparison(same, one_seed)).endswith(
        "at n=1; no difference in val_loss can be detected (no variance estimate)")
    pbt_only = [{"arm": "tuned", "phase": "search", "final_val_loss_mean": 1.523},
                {"arm": "tuned", "phase": "search", "final_val_loss_mean": 1.59}]
    assert answer_line(_comparison(pbt_only)) == "no comparison: search trials only; the best reached val_loss 1.523 (tuned)"
    no_static = [{"arm": "a", "phase": "compare", "verdict": "no static arm", "value_mean": 2.0, "n_finished": 2},
                 {"arm": "b", "phase": "compare", "verdict": "no static arm", "value_mean": 1.5, "n_finished": 2}]
    assert answer_line(_comparison(no_static)) == "no static arm: nothing tested; best mean val_loss: b 1.5 (n=2)"


def test_the_difference_chart_is_drawn_around_zero_with_its_interval(tmp_path):
    rows = [{"arm": "static", "phase": "compare", "verdict": "baseline"},
            {"arm": "ewma", "phase": "compare", "verdict": "no clear difference", "vs_static_delta": -0.05,
             "vs_static_ci95": 0.2, "mde": 0.3},
            {"arm": "one-seed", "phase": "compare", "verdict": "no clear difference", "vs_static_delta": 0.02}]
    png = plot_delta(_comparison(rows), arm_colours(["static", "ewma"]), tmp_path / "d.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert plot_delta(_comparison(rows[1:]), {}, tmp_path / "none.png") is None  # no static: no chart
    assert not (tmp_path / "none.png").exists()


def test_best_controller_params_name_the_arm_and_come_back():
    params = best_params("ewma-tuned", {"name": "ewma", "factor": 1.02, "beta": 0.8, "base_factor": None})
    assert params == {"best.ewma-tuned.name": "ewma", "best.ewma-tuned.factor": 1.02, "best.ewma-tuned.beta": 0.8}
    assert report.best_of({k: str(v) for k, v in params.items()} | {"metric": "val_loss"}) == {
        "ewma-tuned": {"name": "ewma", "factor": 1.02, "beta": 0.8}}


@pytest.mark.skipif(not ui_features()["saved_view"], reason="the installed MLflow is not a verified version")
def test_the_live_review_keeps_one_link_and_rewrites_its_view_as_phases_begin(sqlite_uri):
    """A real store and writer: the link exists once the parent run does; the view shows every
    trial first, then the comparison's; the description says what runs, keeping a user's words."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    exp = client.create_experiment("live")
    client.set_experiment_tag(exp, NOTE_TAG, "what my team should know")
    writer = MlflowWriter(sqlite_uri)
    parent = writer.create_run("live", "live-1", {"metalearner.kind": "sweep"}, key="sweep")
    review = LiveReview(writer, "sweep", "live-1", 6, ["controller.factor"], about="the spec's words")
    url = review.open("trials", "starting", timeout=60)
    pid = writer.run_id(parent)
    assert url == experiment_url(sqlite_uri, exp, view_key(pid)) and review.key == view_key(pid)
    trial = writer.create_run("live", "t", {PHASE_TAG: "search", ARM_TAG: "pbt"}, parent=parent)
    review.show(doing="running: tuning pbt")
    writer.flush()
    assert writer.run_id(trial, timeout=60)

    def stored() -> tuple[dict, str]:
        for _ in range(300):  # the writer's thread delivers what it journaled
            tags = client.get_experiment(exp).tags
            if "running" in tags.get(NOTE_TAG, "") or "compare" in tags.get(NOTE_TAG, ""):
                return read_saved_view(tags["mlflow.sharedViewState." + view_key(pid)]), tags[NOTE_TAG]
            __import__("time").sleep(0.1)
        raise AssertionError(client.get_experiment(exp).tags)

    state, note = stored()
    assert state["searchFilter"] == search_filter(pid, "trials") and "controller.factor" in charted_keys(state)
    assert len(client.search_runs([exp], state["searchFilter"])) == 1
    assert note.startswith("**live-1: running: tuning pbt**") and "the spec's words" in note
    assert note.endswith(NOTE_END + "\n\nwhat my team should know")
    review.show("compare", "comparing")
    assert writer.close().complete
    tags = client.get_experiment(exp).tags
    assert read_saved_view(tags["mlflow.sharedViewState." + view_key(pid)])["searchFilter"] == search_filter(pid)
    assert tags[NOTE_TAG].startswith("**live-1: comparing**")
    assert [k for k in tags if k.startswith("mlflow.sharedViewState.")] == ["mlflow.sharedViewState." + view_key(pid)]
