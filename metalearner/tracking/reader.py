"""The queries of `metalearner.report`: sweeps, their children, metric histories, saved views.

Reads only: every write to MLflow, the report's included, goes through the journaled
`metalearner.tracking.writer.MlflowWriter`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from metalearner.tracking.store import KIND_TAG, PARENT_TAG, is_remote, mlflow_module
from metalearner.tracking.ui import SHARED_VIEW_PREFIX

_RUN_ID = re.compile(r"[0-9a-f]{32}")


class TrackingReader:
    """The queries of `metalearner.report`: sweeps, their children, metric histories.

    Args:
        tracking_uri: MLflow tracking URI.
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = mlflow_module().MlflowClient(tracking_uri=tracking_uri)

    def find_sweep(self, name_or_run_id: str) -> Any:
        """The sweep's parent `mlflow.entities.Run`.

        Args:
            name_or_run_id: a run id (32 hex chars; must be a sweep parent) or an experiment
                name (its most recently started sweep parent run is returned).

        Raises:
            ValueError: one line, when nothing matches or the run is not a sweep.
        """
        from mlflow.exceptions import MlflowException

        key, uri = str(name_or_run_id).strip(), self.tracking_uri
        if _RUN_ID.fullmatch(key):
            try:
                run = self.client.get_run(key)
            except MlflowException:
                run = None
            if run is not None:
                kind = run.data.tags.get(KIND_TAG)
                if kind != "sweep":
                    raise ValueError(f"compare: run {key} is not a sweep parent run "
                                     f"(tag {KIND_TAG}={kind!r}, expected 'sweep') in {uri}")
                return run
        exp = self.client.get_experiment_by_name(key)
        if exp is None:
            raise ValueError(f"compare: no experiment or sweep run named {key!r} in {uri}")
        runs = self.client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ValueError(f"compare: experiment {key!r} has no sweep run (tag {KIND_TAG}='sweep') in {uri}")
        return runs[0]

    def experiment_name(self, run: Any) -> str:
        return self.client.get_experiment(run.info.experiment_id).name

    def trials(self, parent_run_id: str) -> list[Any]:
        """Every trial run (tag ``metalearner.kind`` = ``trial``, or none) under a parent run."""
        parent = self.client.get_run(parent_run_id)
        children = self._search_all([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
        return [r for r in children if r.data.tags.get(KIND_TAG, "trial") == "trial"]

    def _search_all(self, experiment_ids: list[str], filter_string: str) -> list[Any]:
        out: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                           page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def metric_points(self, jobs: Iterable[tuple[str, str]],
                      max_workers: int | None = None) -> list[tuple[str, int, str, float, int]]:
        """Every stored point of each (run id, key) in ``jobs``, duplicates included.

        Args:
            jobs: (run id, metric key) pairs.
            max_workers: threads fetching histories; default 8 for a tracking server, 1 for
                a local store (SQLite reads gain nothing from threads).

        Returns:
            (run_id, step, key, value, timestamp_ms) tuples, in the store's order per job.
        """
        jobs = list(jobs)
        remote = is_remote(self.tracking_uri) or self.tracking_uri.startswith("databricks")
        workers = max_workers or (8 if remote else 1)

        def fetch(job: tuple[str, str]) -> list[tuple[str, int, str, float, int]]:
            rid, key = job
            return [(rid, m.step, key, m.value, m.timestamp) for m in self.client.get_metric_history(rid, key)]

        if workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return [p for chunk in pool.map(fetch, jobs) for p in chunk]
        return [p for job in jobs for p in fetch(job)]

    def experiment_id(self, run: Any) -> str:
        """The experiment id of a run."""
        return str(run.info.experiment_id)

    def experiment_tags(self, experiment_id: str) -> dict[str, str]:
        """An experiment's tags (its description is ``mlflow.note.content``)."""
        return dict(self.client.get_experiment(experiment_id).tags)

    def saved_view(self, experiment_id: str, key: str) -> str | None:
        """The stored value of a saved view, or None."""
        return self.client.get_experiment(experiment_id).tags.get(SHARED_VIEW_PREFIX + key)
