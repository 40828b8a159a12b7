"""The MLflow UI: links, run colours (the one palette of a sweep, also for its plots and
terminal tables) and the version check behind the saved view.

What the UI does with these was verified against MLflow 3.17; none of it is a documented
API, so each step is behind `ui_features` and falls back quietly: an unknown version gets
the plain experiment link and no saved view. This module builds names, colours and links;
the writer (`metalearner.tracking.writer`) stores tags and views, the reader reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from metalearner.tracking.store import is_remote, mlflow_module

RUN_COLOR_TAG = "mlflow.runColor"  # "#rrggbb": the colour of a run in the UI's charts
NOTE_TAG = "mlflow.note.content"  # a run's description (markdown)
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # experiment tag holding a saved view
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
WORKFLOW_PARAM = "workflowType=machine_learning"  # lands on the runs table, not the GenAI overview
SEARCH_GREY = "#9e9e9e"
# matplotlib's tab10, so the PNG plots and the UI give an arm the same colour
ARM_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
               "#17becf", "#7f7f7f")
UI_VERIFIED = ((3, 17), (4, 0))  # [low, high): versions whose UI reads the saved view as written here


def mlflow_version() -> tuple[int, int]:
    """(major, minor) of the installed MLflow; (0, 0) when it cannot be read."""
    try:
        major, minor = mlflow_module().__version__.split(".")[:2]
        return int(major), int(re.match(r"\d+", minor).group())  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        return 0, 0


def ui_features(version: tuple[int, int] | None = None) -> dict[str, bool]:
    """Which UI conveniences to write for this MLflow version.

    Args:
        version: (major, minor); default the installed one.

    Returns:
        ``{"workflow_type": ..., "saved_view": ..., "run_color": ...}``: the URL parameter
        is harmless on any MLflow 3 (older UIs ignore it); the saved view and run colours
        only where their format was verified (``UI_VERIFIED``).
    """
    v = mlflow_version() if version is None else version
    verified = UI_VERIFIED[0] <= v < UI_VERIFIED[1]
    return {"workflow_type": v >= (3, 0), "saved_view": verified, "run_color": verified}


def arm_colours(arms: Iterable[str]) -> dict[str, str]:
    """One ``#rrggbb`` per arm, in the order given (the spec's order)."""
    return {a: ARM_PALETTE[i % len(ARM_PALETTE)] for i, a in enumerate(dict.fromkeys(arms))}


def sweep_arm_colours(order: str | Iterable[str], arms: Iterable[str] = ()) -> dict[str, str]:
    """The palette of a sweep, the same in the UI, the report's plots and the terminal: the
    arms in the spec's order (the parent run's tag ``metalearner.arms``, comma-separated,
    or the names), then any other arm of ``arms`` in name order.

    Args:
        order: the spec's arms, as the parent's ``metalearner.arms`` tag or a sequence.
        arms: the arms the runs name (those missing from ``order`` go last).

    Returns:
        arm -> ``#rrggbb`` (`arm_colours` of that order).
    """
    names = order.split(",") if isinstance(order, str) else list(order)
    return arm_colours([a for a in names if a] + sorted(set(arms)))


def run_colour(arm: str, phase: str, colours: dict[str, str], population: bool = False) -> str | None:
    """The colour of a trial: its arm's; grey for a search-phase trial (a candidate), unless
    it is a member of a population-based search (PBT/PB2), whose members are the arm's
    result (``population``); None if the arm has no colour."""
    if phase == "search" and not population:
        return SEARCH_GREY
    return colours.get(arm)


def ui_base_url(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, else where `mlflow ui` serves."""
    if is_remote(tracking_uri):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI_URL


def experiment_url(tracking_uri: str, experiment_id: str, view_key: str | None = None,
                   version: tuple[int, int] | None = None) -> str:
    """A link to an experiment's runs, on a saved view (chart mode) when ``view_key`` is given.

    Args:
        tracking_uri: the store (its UI address is `ui_base_url`).
        experiment_id: the experiment.
        view_key: the id of a saved view stored by `MlflowWriter.set_saved_view`.
        version: MLflow (major, minor); default the installed one.

    Returns:
        ``BASE/#/experiments/ID/runs?workflowType=machine_learning`` or, with a view,
        ``...runs?viewStateShareKey=KEY&compareRunsMode=CHART&workflowType=machine_learning``.
    """
    feats = ui_features(version)
    query = []
    if view_key and feats["saved_view"]:
        query += [f"viewStateShareKey={view_key}", "compareRunsMode=CHART"]
    if feats["workflow_type"]:
        query.append(WORKFLOW_PARAM)
    return f"{ui_base_url(tracking_uri)}/#/experiments/{experiment_id}/runs" + (f"?{'&'.join(query)}" if query else "")


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    if is_remote(uri):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def saved_view_fits(value: str) -> bool:
    """Whether the store takes ``value`` as an experiment tag (a saved view is one)."""
    try:
        from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH as limit
    except ImportError:  # pragma: no cover - moved in another MLflow: the store decides
        return True
    return len(value) <= limit
