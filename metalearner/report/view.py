"""The MLflow UI view a sweep's link opens on: its trials' traces, grouped by arm.

MLflow 3.17's experiment page can restore a "saved view" from an experiment tag
``mlflow.sharedViewState.<id>`` whose value is the envelope
``{"name", "createdAt", "updatedAt", "state"}`` with ``state`` the JSON *string* of the
page's search facets and UI state (fields of ``ExperimentPageSearchFacetsState`` and
``ExperimentPageUIState`` in MLflow's frontend). The link
``#/experiments/<id>/runs?viewStateShareKey=<id>&compareRunsMode=CHART&workflowType=machine_learning``
then opens the chart view as stored here; the page reads the tag each time it loads, so
a view rewritten under the same id (`view_key`, fixed per sweep) changes what the printed
link opens. On load the page ignores the state's ``runsPinned``, ``runsHidden``,
``runsExpanded``, ``runsVisibilityMap`` and ``autoRefreshEnabled``. None of this is a
documented API: the shapes below were read from the 3.17 frontend bundle,
`tests/test_compare_view.py` pins them, and `metalearner.tracking.ui_features` turns the
view off for versions not checked.

A view shows one of two sets of a sweep's trials (`SHOWS`): ``"trials"``, every trial of
the sweep (while only searches have run, and for a sweep that never compares: PBT with
``confirm: false``), or ``"compare"``, the trials of the equal-steps comparison (once
they exist). Neither filters down to nothing once its trials exist.

Strings and dicts only: this module builds the value; `metalearner.tracking` stores it.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable

from metalearner.tracking import ARM_TAG, PARENT_TAG, PHASE_TAG, SEED_TAG

VIEW_NAME = "metalearner: the sweep's trials by arm"
SHOWS = ("trials", "compare")  # every trial of the sweep | the comparison's trials
KNOB_SECTION = "Knobs per step (coloured by arm)"
DELTA_SECTION = "Difference from static (per seed; 0 = static)"
SETTINGS_SECTION = "Controller settings in force (PBT/PB2)"
LOSS_SECTION = "Loss per step"
FRONT_SECTION = "Quality against attention compute (each run: final value vs compute; Pareto front bottom-left)"
COMPUTE_KEY = "attn_compute"  # a trial's attention compute so far (query-key pairs; its last point is the total)
# the metric keys the view charts, in order: (key, log scale)
KNOB_CHARTS = (("window", False), ("rope_base", True))
LOSS_CHARTS = (("val_loss", False), ("loss", False))
DELTA_SUFFIX = "_delta_vs_static"  # a compare trial's metric minus static's on the same seed (the report logs it)


def delta_key(metric: str) -> str:
    """The per-trial metric the report logs on each compare trial: its value minus static's."""
    return f"{metric}{DELTA_SUFFIX}"


def view_key(parent_run_id: str) -> str:
    """The saved view's id: fixed for a sweep, so the link printed at its start keeps working."""
    return hashlib.sha256(f"metalearner-review/{parent_run_id}".encode()).hexdigest()


def _uid(seed: str, name: str) -> str:
    """A stable uuid for a chart or section (same sweep, same ids)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"metalearner/{seed}/{name}"))


def _line_chart(key: str, section: str, log_scale: bool, seed: str, n_runs: int) -> dict:
    return {
        "uuid": _uid(seed, f"line/{key}"), "type": "LINE", "runsCountToCompare": max(n_runs, 10),
        "metricSectionId": section, "deleted": False, "isGenerated": False, "metricKey": key,
        "selectedMetricKeys": [key], "lineSmoothness": 0, "xAxisScaleType": "linear",
        "scaleType": "log" if log_scale else "linear", "xAxisKey": "step", "selectedXAxisMetricKey": "",
        "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": False,
        "useGlobalLineSmoothing": False, "displayPoints": False,
        "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None},
    }


def _bar_chart(key: str, section: str, seed: str, n_runs: int) -> dict:
    return {"uuid": _uid(seed, f"bar/{key}"), "type": "BAR", "runsCountToCompare": max(n_runs, 10),
            "metricSectionId": section, "deleted": False, "isGenerated": False, "metricKey": key}


def _scatter_chart(x: str, y: str, section: str, seed: str, n_runs: int) -> dict:
    """A scatter of each run's latest ``y`` against its latest ``x`` (MLflow 3.17's SCATTER card)."""
    return {"uuid": _uid(seed, f"scatter/{x}/{y}"), "type": "SCATTER", "runsCountToCompare": max(n_runs, 10),
            "metricSectionId": section, "deleted": False, "isGenerated": False,
            "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"}}


def _section(name: str, seed: str, generated: bool = False) -> dict:
    return {"uuid": _uid(seed, f"section/{name}"), "name": name, "display": True, "isReordered": False,
            "deleted": False, "isGenerated": generated}


def search_filter(parent_run_id: str, shows: str = "compare") -> str:
    """The view's filter, in MLflow's search syntax (what `MlflowClient.search_runs` takes).

    Args:
        parent_run_id: the sweep's parent run.
        shows: one of `SHOWS`.
    """
    if shows not in SHOWS:
        raise ValueError(f"shows: got {shows!r}, expected one of {SHOWS}")
    this_sweep = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    return f"tags.`{PHASE_TAG}` = 'compare' AND {this_sweep}" if shows == "compare" else this_sweep


def view_state(parent_run_id: str, n_runs: int, shows: str = "compare", settings: Iterable[str] = (),
               metric: str = "val_loss", differences: bool = True, arm_tag: str = ARM_TAG) -> dict:
    """The experiment page's state: a sweep's trials grouped by arm, knob traces first.

    Args:
        parent_run_id: the sweep's parent run (its ids seed the chart uuids).
        n_runs: how many trials the charts must draw (the UI's default is 10).
        shows: which trials, one of `SHOWS`.
        settings: controller settings a population-based scheduler changes (metric keys
            such as ``controller.factor``), charted per step.
        metric: the spec's metric: the compare view charts its difference from static per trial.
        differences: whether the compare view has that chart (the report logs the metric:
            a running sweep's view leaves it out rather than show an empty section).
        arm_tag: the tag to group by.

    Returns:
        The state dict (search facets and UI state in one, as the UI serializes them).
    """
    seed = parent_run_id
    knobs, losses = _section(KNOB_SECTION, seed), _section(LOSS_SECTION, seed)
    delta, tuned = _section(DELTA_SECTION, seed), _section(SETTINGS_SECTION, seed)
    # the UI keeps its two generated sections last; without them it drops ours on reload
    model, system = _section("Model metrics", seed, True), _section("System metrics", seed, True)
    charts = [_line_chart(k, knobs["uuid"], log, seed, n_runs) for k, log in KNOB_CHARTS]
    sections = [knobs]
    if shows == "compare" and differences:  # bars from 0 where 0 means "as static": the difference is what is drawn
        charts.append(_bar_chart(delta_key(metric), delta["uuid"], seed, n_runs))
        sections.append(delta)
    keys = sorted(dict.fromkeys(settings))
    if keys:
        charts += [_line_chart(k, tuned["uuid"], False, seed, n_runs) for k in keys]
        sections.append(tuned)
    front = _section(FRONT_SECTION, seed)  # the Pareto picture, no click: every run's (compute, final metric)
    charts.append(_scatter_chart(COMPUTE_KEY, metric, front["uuid"], seed, n_runs))
    sections.append(front)
    charts += [_line_chart(k, losses["uuid"], log, seed, n_runs) for k, log in LOSS_CHARTS]
    sections += [losses, model, system]
    return {
        # ExperimentPageSearchFacetsState
        "searchFilter": search_filter(parent_run_id, shows),
        "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        # ExperimentPageUIState
        "selectedColumns": [f"tags.`{arm_tag}`", f"tags.`{PHASE_TAG}`", f"tags.`{SEED_TAG}`",
                            f"metrics.`{metric}`", "metrics.`steps_completed`", "params.`controller.name`"],
        "runsExpanded": {}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "viewMaximized": False, "runListHidden": False, "isAccordionReordered": True,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": arm_tag}]},
        "groupsExpanded": {}, "autoRefreshEnabled": True,
        "useGroupedValuesInCharts": False,  # draw every trial (coloured by its arm), not the mean
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
        "chartsSearchFilter": "",
    }


def saved_view(state: dict, key: str, name: str = VIEW_NAME, created_ms: int | None = None,
               now_ms: int | None = None) -> str:
    """The saved-view envelope, as the UI reads it from the experiment tag.

    Args:
        state: from `view_state`.
        key: the view's id (`view_key`); checked to be one the tag name and the link carry.
        name: the view's name in the UI.
        created_ms: when the view was first written (ms since the epoch); default ``now_ms``.
        now_ms: this update's time; default now.

    Returns:
        JSON ``{"name", "createdAt", "updatedAt", "state"}`` with ``state`` a JSON string.
    """
    if not (key and all(c in "0123456789abcdef" for c in key)):
        raise ValueError(f"saved view: key: got {key!r}, expected lowercase hex (view_key)")
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    created = now if created_ms is None else int(created_ms)
    return json.dumps({"name": name, "createdAt": created, "updatedAt": now,
                       "state": json.dumps(state, separators=(",", ":"))}, separators=(",", ":"))


def read_saved_view(value: str) -> dict:
    """Parse an envelope back to its state dict, checking what the UI checks.

    Raises:
        ValueError: when the envelope is not ``{name: str, createdAt: number, state: str}``.
    """
    env = json.loads(value)
    if not (isinstance(env, dict) and isinstance(env.get("name"), str)
            and isinstance(env.get("createdAt"), (int, float)) and isinstance(env.get("state"), str)):
        raise ValueError(f"saved view: got {value[:80]!r}, expected an object with a string name, "
                         "number createdAt and string state")
    return json.loads(env["state"])


def charted_keys(state: dict) -> list[str]:
    """The metric keys the view's charts draw, in order (a scatter: ``"Y vs X"``)."""
    return [c["metricKey"] if "metricKey" in c else f"{c['yaxis']['key']} vs {c['xaxis']['key']}"
            for c in state.get("compareRunCharts", []) if not c.get("deleted")]


def grouped_by(state: dict) -> Iterable[str]:
    """The tags the view groups runs by."""
    return [k["groupByData"] for k in (state.get("groupBy") or {}).get("groupByKeys", []) if k.get("mode") == "tag"]
