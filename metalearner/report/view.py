"""The MLflow UI view a sweep opens on: traces of the comparison trials, grouped by arm.

MLflow 3.17's experiment page can restore a "saved view" from an experiment tag
``mlflow.sharedViewState.<id>`` whose value is the envelope
``{"name", "createdAt", "updatedAt", "state"}`` with ``state`` the JSON *string* of the
page's search facets and UI state (fields of ``ExperimentPageSearchFacetsState`` and
``ExperimentPageUIState`` in MLflow's frontend). The link
``#/experiments/<id>/runs?viewStateShareKey=<id>&compareRunsMode=CHART&workflowType=machine_learning``
then opens the chart view as stored here. None of this is a documented API: the shapes
below were read from the 3.17 frontend bundle, `tests/test_compare_view.py` pins them,
and `metalearner.tracking.ui_features` turns the view off for versions not checked.

Strings and dicts only: this module builds the value; `metalearner.tracking` stores it.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable

from metalearner.tracking import ARM_TAG, PHASE_TAG, SEED_TAG

VIEW_NAME = "metalearner: comparison traces by arm"
KNOB_SECTION = "Knobs per step (comparison trials, coloured by arm)"
LOSS_SECTION = "Loss per step"
# the metric keys the view charts, in order: (key, log scale)
KNOB_CHARTS = (("window", False), ("rope_base", True))
LOSS_CHARTS = (("val_loss", False), ("loss", False))
SUMMARY_CHARTS = ("val_loss_final",)


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


def _section(name: str, seed: str, generated: bool = False) -> dict:
    return {"uuid": _uid(seed, f"section/{name}"), "name": name, "display": True, "isReordered": False,
            "deleted": False, "isGenerated": generated}


def view_state(parent_run_id: str, n_runs: int, arm_tag: str = ARM_TAG) -> dict:
    """The experiment page's state: compare-phase trials, grouped by arm, knob traces first.

    Args:
        parent_run_id: the sweep's parent run (its ids seed the chart uuids).
        n_runs: how many trials the charts must draw (the UI's default is 10).
        arm_tag: the tag to group by.

    Returns:
        The state dict (search facets and UI state in one, as the UI serializes them).
    """
    knobs, losses = _section(KNOB_SECTION, parent_run_id), _section(LOSS_SECTION, parent_run_id)
    # the UI keeps its two generated sections last; without them it drops ours on reload
    model, system = _section("Model metrics", parent_run_id, True), _section("System metrics", parent_run_id, True)
    charts = [_line_chart(k, knobs["uuid"], log, parent_run_id, n_runs) for k, log in KNOB_CHARTS]
    charts += [_line_chart(k, losses["uuid"], log, parent_run_id, n_runs) for k, log in LOSS_CHARTS]
    charts += [_bar_chart(k, losses["uuid"], parent_run_id, n_runs) for k in SUMMARY_CHARTS]
    return {
        # ExperimentPageSearchFacetsState
        "searchFilter": f"tags.`{PHASE_TAG}` = 'compare' AND tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        # ExperimentPageUIState
        "selectedColumns": [f"tags.`{arm_tag}`", f"tags.`{SEED_TAG}`", "metrics.`val_loss_final`",
                            "metrics.`steps_completed`", "params.`controller.name`"],
        "runsExpanded": {}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": [knobs, losses, model, system],
        "viewMaximized": False, "runListHidden": False, "isAccordionReordered": True,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": arm_tag}]},
        "groupsExpanded": {}, "autoRefreshEnabled": False,
        "useGroupedValuesInCharts": False,  # draw every trial (coloured by its arm), not the mean
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
        "chartsSearchFilter": "",
    }


def saved_view(state: dict, name: str = VIEW_NAME, now_ms: int | None = None) -> tuple[str, str]:
    """The saved-view envelope and its key.

    Args:
        state: from `view_state`.
        name: the view's name in the UI.
        now_ms: creation time (ms since the epoch); default now.

    Returns:
        ``(key, value)``: key = sha256 of the state string (as the UI names its own
        shared views), value = JSON ``{"name", "createdAt", "updatedAt", "state"}``.
    """
    state_json = json.dumps(state, separators=(",", ":"))
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    key = hashlib.sha256(state_json.encode()).hexdigest()
    return key, json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": state_json},
                           separators=(",", ":"))


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
    """The metric keys the view's charts draw, in order."""
    return [c["metricKey"] for c in state.get("compareRunCharts", []) if not c.get("deleted")]


def grouped_by(state: dict) -> Iterable[str]:
    """The tags the view groups runs by."""
    return [k["groupByData"] for k in (state.get("groupBy") or {}).get("groupByKeys", []) if k.get("mode") == "tag"]
