"""The tracking layer: the only code that talks to MLflow (and, through the writer, to the
``--metrics-db`` bulk path). One job per module:

- `store`: where the store is, run tags, request limits, the lazy ``import mlflow``;
- `writer`: `MlflowWriter`, the journaled write API of a process (every write: traces,
  params, tags, artifacts, the report's summary and saved view), `MlflowSink` (the
  `TraceSink` of ``metalearner train``) and `sync_journal`;
- `delivery`: the thread that sends what the writer journaled, exactly once;
- `reader`: `TrackingReader`, the queries of the report (reads only);
- `ui`: links, run colours (the sweep's one palette) and the version check behind the saved view;
- `lineage`: a PBT/PB2 perturbation as the receiving run's tags (written by the sweep's
  callback, read back by the report).

The names below are re-exported, so ``from metalearner.tracking import X`` is the face.
"""

from metalearner.tracking.delivery import is_permanent
from metalearner.tracking.reader import TrackingReader
from metalearner.tracking.store import (
    ARM_TAG,
    DEFAULT_OUTAGE_S,
    DIVERGED_TAG,
    INTERRUPTED_TAG,
    KIND_TAG,
    MAX_METRICS_PER_BATCH,
    PARENT_TAG,
    PHASE_TAG,
    RUN_KEY_TAG,
    SEED_TAG,
    STOPPED_EARLY_TAG,
    artifact_location,
    params_to_strings,
    resolve_tracking_uri,
)
from metalearner.tracking.ui import (
    ARM_PALETTE,
    NOTE_TAG,
    RUN_COLOR_TAG,
    SEARCH_GREY,
    SHARED_VIEW_PREFIX,
    UI_VERIFIED,
    WORKFLOW_PARAM,
    arm_colours,
    experiment_url,
    mlflow_version,
    run_colour,
    ui_base_url,
    ui_command,
    ui_features,
)
from metalearner.tracking.writer import MlflowSink, MlflowWriter, TrackingIncomplete, sync_journal

__all__ = [
    "ARM_PALETTE", "ARM_TAG", "DEFAULT_OUTAGE_S", "DIVERGED_TAG", "INTERRUPTED_TAG", "KIND_TAG",
    "MAX_METRICS_PER_BATCH", "NOTE_TAG", "PARENT_TAG", "PHASE_TAG", "RUN_COLOR_TAG", "RUN_KEY_TAG",
    "SEARCH_GREY", "SEED_TAG", "SHARED_VIEW_PREFIX", "STOPPED_EARLY_TAG", "UI_VERIFIED", "WORKFLOW_PARAM",
    "MlflowSink", "MlflowWriter", "TrackingIncomplete", "TrackingReader", "arm_colours", "artifact_location",
    "experiment_url", "is_permanent", "mlflow_version", "params_to_strings", "resolve_tracking_uri",
    "run_colour", "sync_journal", "ui_base_url", "ui_command", "ui_features",
]
