"""MLflow: the one module that talks to MLflow (writes, and the queries of the report).

Write path. Every write of a process goes through one `MlflowWriter`: a single writer
thread fed by a queue. Metrics are buffered and sent with ``log_batch`` (at most 1000
per call), never one request per metric per step, and the training thread never waits
on the store. With a single writer per store, the embedded SQLite default cannot
raise "database is locked": in a sweep, Ray trials do not touch MLflow at all — they send
their trace chunks with ``tune.report`` and the driver's writer stores them.

Exactly one point per step per key: a `MlflowWriter` remembers the last step it stored
for each run and drops records at or below it (a trial restored from a checkpoint
repeats those steps exactly; a PBT exploit continues from the donor's step).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# tags that tie the runs of a sweep together (written by the sweep, read by the report)
KIND_TAG = "metalearner.kind"  # "sweep" | "trial" | "train"
ARM_TAG = "metalearner.arm"
PHASE_TAG = "metalearner.phase"  # "search" | "compare"
SEED_TAG = "metalearner.seed"
PARENT_TAG = "mlflow.parentRunId"
DIVERGED_TAG = "metalearner.diverged"  # set on a trial ended by train.max_nonfinite
STOPPED_EARLY_TAG = "metalearner.stopped_early"
_RUN_ID = re.compile(r"[0-9a-f]{32}")

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
WRITER_NICE = 10


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError as e:  # pragma: no cover - mlflow is a required dependency
        raise RuntimeError("mlflow is not installed: pip install metalearner (it depends on mlflow)") from e
    return mlflow


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working dir."""
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts go beside the database file (``mlartifacts/NAME``)
    instead of ``./mlruns`` in whatever folder the process happens to run in."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None  # a tracking server decides for itself
    db = Path(tracking_uri[len(prefix):])
    return (db.resolve().parent / "mlartifacts" / experiment).as_uri()


def params_to_strings(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        s = "null" if v is None else str(v)
        out[k] = s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."
    return out


class MlflowWriter:
    """The single writer of a process: all MLflow calls run on one background thread.

    Args:
        tracking_uri: MLflow tracking URI (SQLite file, tracking server, ...).
        flush_every: send buffered metrics once this many points are waiting.
        flush_seconds: ...or once the oldest waiting point is this old.
    """

    def __init__(self, tracking_uri: str, flush_every: int = MAX_METRICS_PER_BATCH,
                 flush_seconds: float = 2.0) -> None:
        mlflow = _mlflow()
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._Metric = mlflow.entities.Metric
        self._queue: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._pending: dict[str, list[Any]] = {}
        self._n_pending = 0
        self._oldest = 0.0
        self._last_step: dict[str, int] = {}
        self._lock = threading.Lock()
        self.points_written = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the thread
    def _loop(self) -> None:
        # Linux schedules threads individually: let the training threads win the cores;
        # the store's CPU cost (~0.2 ms per point in SQLite) then fills the gaps
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (AttributeError, OSError):  # not Linux, or not allowed
            pass
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - reported through the future
                log.warning("MLflow write failed: %s", e)
                self.errors.append(e)
                fut.set_exception(e)

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the writer thread (in order with every other write)."""
        fut: Future = Future()
        self._queue.put((fn, fut))
        return fut

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the writer thread and wait for its result."""
        return self.submit(fn).result()

    # ------------------------------------------------------------ runs
    def experiment_id(self, name: str) -> str:
        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp:
                return exp.experiment_id
            return self.client.create_experiment(name, artifact_location=artifact_location(self.tracking_uri, name))

        return self.call(get_or_create)

    def create_run(self, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                   parent_run_id: str | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        exp_id = self.experiment_id(experiment)
        run = self.call(lambda: self.client.create_run(exp_id, tags=tags, run_name=run_name))
        self._last_step[run.info.run_id] = 0
        return run.info.run_id

    def resume_run(self, run_id: str, key: str = "loss") -> int:
        """Reopen ``run_id``; returns the last step already stored for ``key``."""
        def last() -> int:
            self.client.update_run(run_id, status="RUNNING")
            hist = self.client.get_metric_history(run_id, key)
            return max((m.step for m in hist), default=0)

        step = self.call(last)
        self._last_step[run_id] = step
        return step

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        Param = _mlflow().entities.Param
        items = [Param(k, v) for k, v in params_to_strings(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i: i + MAX_PARAMS_PER_BATCH]
            self.submit(lambda c=chunk: self.client.log_batch(run_id, params=c))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        RunTag = _mlflow().entities.RunTag
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self.submit(lambda: self.client.log_batch(run_id, tags=items))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.submit(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def terminate(self, run_id: str, status: str = "FINISHED") -> None:
        self.flush(run_id)
        self.submit(lambda: self.client.set_terminated(run_id, status=status))

    # ------------------------------------------------------------ metrics
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int,
                    timestamp_ms: int | None = None) -> bool:
        """Buffer one step's metrics; False (and nothing stored) if ``step`` is not past
        the last step stored for ``run_id``."""
        with self._lock:
            if step <= self._last_step.get(run_id, 0):
                return False
            self._last_step[run_id] = step
            ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
            buf = self._pending.setdefault(run_id, [])
            if not self._n_pending:
                self._oldest = time.monotonic()
            for k, v in metrics.items():
                buf.append(self._Metric(k, float(v), ts, step))
            self._n_pending += len(metrics)
            due = self._n_pending >= self.flush_every or time.monotonic() - self._oldest > self.flush_seconds
        if due:
            self.flush()
        return True

    def log_extra_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Metrics outside the per-step trace (e.g. PBT's changed settings): no dedupe."""
        ts = int(time.time() * 1000)
        with self._lock:
            buf = self._pending.setdefault(run_id, [])
            for k, v in metrics.items():
                buf.append(self._Metric(k, float(v), ts, step))
            self._n_pending += len(metrics)

    def flush(self, run_id: str | None = None) -> None:
        """Send the buffered metrics (of one run, or all) to the writer thread."""
        with self._lock:
            ids = [run_id] if run_id is not None else list(self._pending)
            batches = [(rid, self._pending.pop(rid)) for rid in ids if self._pending.get(rid)]
            self._n_pending = sum(len(v) for v in self._pending.values())
        for rid, metrics in batches:
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                chunk = metrics[i: i + MAX_METRICS_PER_BATCH]
                self.submit(lambda r=rid, c=chunk: self._send(r, c))

    def _send(self, run_id: str, metrics: list[Any]) -> None:
        self.client.log_batch(run_id, metrics=metrics)
        self.points_written += len(metrics)

    def close(self) -> None:
        """Flush everything, wait for the writes, stop the thread."""
        self.flush()
        self.call(lambda: None)
        self._queue.put(None)
        self._thread.join(timeout=60)


class MlflowSink:
    """A `TraceSink` into one MLflow run (``metalearner train``)."""

    def __init__(self, writer: MlflowWriter, run_id: str) -> None:
        self.writer, self.run_id = writer, run_id

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str,
              tags: dict[str, str] | None = None, resume_run_id: str | None = None) -> MlflowSink:
        writer = MlflowWriter(tracking_uri)
        if resume_run_id:
            writer.resume_run(resume_run_id)
            return cls(writer, resume_run_id)
        return cls(writer, writer.create_run(experiment, run_name, tags))

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.log_params(self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.writer.log_metrics(self.run_id, metrics, step)

    def close(self, status: str = "FINISHED") -> None:
        self.writer.terminate(self.run_id, status)
        self.writer.close()
        if self.writer.errors:
            raise RuntimeError(f"MLflow writes failed: {self.writer.errors[0]}")


# ------------------------------------------------------------ reading back


class TrackingReader:
    """The queries of `metalearner.report`: sweeps, their children, metric histories.

    Args:
        tracking_uri: MLflow tracking URI.
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = _mlflow().MlflowClient(tracking_uri=tracking_uri)

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
        remote = self.tracking_uri.startswith(("http://", "https://", "databricks"))
        workers = max_workers or (8 if remote else 1)

        def fetch(job: tuple[str, str]) -> list[tuple[str, int, str, float, int]]:
            rid, key = job
            return [(rid, m.step, key, m.value, m.timestamp) for m in self.client.get_metric_history(rid, key)]

        if workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return [p for chunk in pool.map(fetch, jobs) for p in chunk]
        return [p for job in jobs for p in fetch(job)]

    def log_artifacts(self, run_id: str, files: Iterable[str | Path], artifact_path: str) -> None:
        for f in files:
            self.client.log_artifact(run_id, str(f), artifact_path)

    # ------------------------------------------------------------ the report's few writes, UI helpers
    def experiment_id(self, run: Any) -> str:
        """The experiment id of a run."""
        return str(run.info.experiment_id)

    def set_run_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set tags on a run (one ``log_batch``)."""
        RunTag = _mlflow().entities.RunTag
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_summary_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log summary metrics (finite values only) on a run at one step, in batches."""
        Metric = _mlflow().entities.Metric
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i: i + MAX_METRICS_PER_BATCH])

    def write_saved_view(self, experiment_id: str, key: str, value: str) -> bool:
        """Store a saved view as the experiment tag ``mlflow.sharedViewState.KEY``.

        Returns:
            True when stored; False (nothing raised) when the store refused it, e.g. a
            value longer than the store allows: the caller then prints the plain link.
        """
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key, value)
        except MlflowException as e:
            log.warning("saved view not stored (%s); the plain experiment link still works", e)
            return False
        return True

    def saved_view(self, experiment_id: str, key: str) -> str | None:
        """The stored value of a saved view, or None."""
        return self.client.get_experiment(experiment_id).tags.get(SHARED_VIEW_PREFIX + key)


# ------------------------------------------------------------ the MLflow UI (links, colours, saved view)
#
# What the UI does with these was verified against MLflow 3.17; none of it is a documented
# API, so each step is behind `ui_features` and falls back quietly: an unknown version gets
# the plain experiment link and no saved view.

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
        major, minor = _mlflow().__version__.split(".")[:2]
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


def run_colour(arm: str, phase: str, colours: dict[str, str]) -> str | None:
    """The colour of a trial: its arm's, grey for a search-phase trial, None if unknown."""
    if phase == "search":
        return SEARCH_GREY
    return colours.get(arm)


def ui_base_url(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, else where `mlflow ui` serves."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI_URL


def experiment_url(tracking_uri: str, experiment_id: str, view_key: str | None = None,
                   version: tuple[int, int] | None = None) -> str:
    """A link to an experiment's runs, on a saved view (chart mode) when ``view_key`` is given.

    Args:
        tracking_uri: the store (its UI address is `ui_base_url`).
        experiment_id: the experiment.
        view_key: the id of a saved view written by `TrackingReader.write_saved_view`.
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
