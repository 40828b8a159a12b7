"""The check every shipped spec's smoke sweep makes: the sweep's saved MLflow view, read
from the store under the sweep's fixed key and its filter run through MLflow's own
``MlflowClient.search_runs``, finds at least one run (the link never opens on an empty
page).

Two moments: the end (`assert_view_finds_runs`, after the sweep, or after its report), and
the end of each search phase (`ViewProbe`, handed to ``SweepRunner(on_event=...)``: the
runner calls it in its own thread when the phase's outcome is read, before anything else
happens). A sweep run through the command line (a subprocess) is checked at its end; its
search phases are then checked through the filter the view has while searches run
(`search_filter(pid, "trials")`: every trial of the sweep, a set that only grows).
"""

from __future__ import annotations

import re
import time

import mlflow

from metalearner.report.view import read_saved_view, search_filter, view_key
from metalearner.tracking import SHARED_VIEW_PREFIX, ui_features


def saved_state(uri: str, parent_run_id: str, timeout: float = 30.0) -> tuple[str, dict | None]:
    """(experiment id, the sweep's saved view state or None when none is written yet),
    waiting up to ``timeout`` s for the sweep's writer to deliver it."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    deadline = time.monotonic() + timeout
    while True:
        value = client.get_experiment(exp_id).tags.get(SHARED_VIEW_PREFIX + view_key(parent_run_id))
        if value is not None or time.monotonic() > deadline:
            return exp_id, read_saved_view(value) if value is not None else None
        time.sleep(0.2)


def assert_view_finds_runs(uri: str, parent_run_id: str, searched: bool = False, timeout: float = 30.0) -> list:
    """The saved view's filter, run by MLflow, matches >= 1 trial of this sweep (and no run
    of another); with ``searched``, the view the sweep had while it searched does too.

    Returns:
        The runs the view's filter matches (or [] where the installed MLflow gets no view).
    """
    if not ui_features()["saved_view"]:
        return []
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id, state = saved_state(uri, parent_run_id, timeout)
    assert state is not None, f"no saved view {view_key(parent_run_id)} for sweep {parent_run_id}"
    deadline = time.monotonic() + timeout
    while True:  # the runs are written by the sweep's journaled writer: wait for its delivery
        hits = client.search_runs([exp_id], state["searchFilter"], max_results=1000)
        if hits or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert hits, f"the view's filter {state['searchFilter']!r} matches no run"
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_run_id for r in hits)
    if searched:
        during = client.search_runs([exp_id], search_filter(parent_run_id, "trials"), max_results=1000)
        assert any(r.data.tags.get("metalearner.phase") in ("search", "compare") for r in during)
    return hits


class ViewProbe:
    """``SweepRunner(on_event=ViewProbe(uri))``: at the end of every search phase, the view
    finds >= 1 run and shows every trial of the sweep (no comparison trial exists yet).

    Attributes:
        checked: (phase key, runs the view found) per search phase checked.
        url: the link the sweep told.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.checked: list[tuple[str, int]] = []
        self.url = ""

    def __call__(self, event) -> None:
        if event.kind == "link":
            self.url = event.url
        if event.kind == "phase_end" and event.phase.startswith("search:") and ui_features()["saved_view"]:
            hits = assert_view_finds_runs(self.uri, event.parent_run_id)
            _, state = saved_state(self.uri, event.parent_run_id)
            assert state["searchFilter"] == search_filter(event.parent_run_id, "trials"), state["searchFilter"]
            self.checked.append((event.phase, len(hits)))


def parent_of(stdout: str) -> str:
    """The parent run id a ``metalearner sweep`` printed ("sweep finished in N s; parent run ID")."""
    m = re.search(r"^sweep finished in \d+ s; parent run ([0-9a-f]{32})", stdout, re.M)
    assert m, stdout[-2000:]
    return m.group(1)
