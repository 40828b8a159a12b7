"""The names the tracking layer shares: where the store is, how its runs are tagged, the
limits of one request, and the lazy import of mlflow.

The writer (`metalearner.tracking.writer`), its delivery thread
(`metalearner.tracking.delivery`), the reader (`metalearner.tracking.reader`) and the UI
helpers (`metalearner.tracking.ui`) all build on this module; it imports none of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# tags that tie the runs of a sweep together (written by the sweep, read by the report)
KIND_TAG = "metalearner.kind"  # "sweep" | "trial" | "train"
ARM_TAG = "metalearner.arm"
PHASE_TAG = "metalearner.phase"  # "search" | "compare"
SEED_TAG = "metalearner.seed"
PARENT_TAG = "mlflow.parentRunId"
RUN_KEY_TAG = "metalearner.run_key"  # JOURNAL_ID/KEY: finds a run again after a crash or a lost response
DIVERGED_TAG = "metalearner.diverged"  # set on a trial ended by train.max_nonfinite
STOPPED_EARLY_TAG = "metalearner.stopped_early"
INTERRUPTED_TAG = "metalearner.interrupted"  # parent and unfinished children of an interrupted sweep (KILLED)
DEFAULT_OUTAGE_S = 300.0  # tracking.outage_s

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000


def mlflow_module() -> Any:
    """The ``mlflow`` package, imported on first use (so that importing the tracking
    layer costs nothing until it talks to a store)."""
    try:
        import mlflow
    except ImportError as e:  # pragma: no cover - mlflow is a required dependency
        raise RuntimeError("mlflow is not installed: pip install metalearner (it depends on mlflow)") from e
    return mlflow


def is_remote(tracking_uri: str) -> bool:
    """Whether ``tracking_uri`` is a tracking server (HTTP), not a local store."""
    return tracking_uri.startswith(("http://", "https://"))


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working dir."""
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts go beside the database file (``mlartifacts/NAME``)
    instead of ``./mlruns`` in whatever folder the process happens to run in."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None  # a tracking server decides for itself
    db = Path(tracking_uri[len(prefix):])
    return (db.resolve().parent / "mlartifacts" / experiment).as_uri()


def params_to_strings(params: dict[str, Any]) -> dict[str, str]:
    """MLflow's view of params: strings (None as ``null``), cut to `MAX_PARAM_CHARS`."""
    out = {}
    for k, v in params.items():
        s = "null" if v is None else str(v)
        out[k] = s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."
    return out
