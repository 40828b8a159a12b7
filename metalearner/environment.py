"""Process environment that the entry points set: the CLI's ``main`` and the sweep runner
where it starts Ray (workers inherit it). Never set at import; standard library only.
"""

from __future__ import annotations

import os

# the speech task reads a local audiofolder: nothing of Hugging Face's may go to the network
HF_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Ray Tune: our MLflow callback is the logger that matters (no CSV/TensorBoard loggers),
# no warnings about experiment-state syncing, the classic (quiet) console output
TUNE_QUIET = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
}


def set_defaults(*envs: dict[str, str]) -> None:
    """Set each variable of ``envs`` unless the user's environment already sets it."""
    for env in envs:
        for key, value in env.items():
            os.environ.setdefault(key, value)
# the MLflow writer retries through outages itself (tracking.outage_s, with backoff), so
# each request fails fast instead of MLflow's own minutes-long retry loop inside one call
MLFLOW_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
