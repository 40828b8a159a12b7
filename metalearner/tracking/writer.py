"""The single writer of a process: every write to MLflow, journaled before it counts.

Producers (the sweep's Tune callback on the driver, ``metalearner train``'s training
thread, the report) never wait on the store: each write is a record appended to the
durable journal (`metalearner.journal`, fsync'd per batch), and that is all they do. Run
creation too: `MlflowWriter.create_run` returns a local *run key* at once. The delivery
thread (`metalearner.tracking.delivery`) sends what was journaled, retrying through
outages; ``metalearner sync`` (`sync_journal`) delivers what an outage left. With a single
writer per store, the embedded SQLite default cannot raise "database is locked".

Exactly one point per step per key is kept here, and only here: `MlflowWriter.log_rows`
remembers the last step journaled for each run (also across restarts: it is read back
from the journal) and drops rows at or below it (a trial restored from a checkpoint
repeats those steps exactly; a PBT exploit continues from the donor's step). The delivery
thread keeps the same promise against the store after a restart or a lost response.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from metalearner.journal import JOURNAL_FILE, METRIC_OPS, Journal, Pending, pending, read_lines
from metalearner.metrics_db import MetricsDb
from metalearner.tracking.delivery import SUMMARY_OP, Delivery
from metalearner.tracking.store import (
    DEFAULT_OUTAGE_S,
    MAX_METRICS_PER_BATCH,
    RUN_KEY_TAG,
    is_remote,
    mlflow_module,
    params_to_strings,
    resolve_tracking_uri,
)
from metalearner.tracking.ui import SHARED_VIEW_PREFIX, saved_view_fits

SERVER_CONNECTIONS = 8  # runs delivered in parallel to a tracking server (bench_tracking_load.py)


class TrackingIncomplete(RuntimeError):
    """Raised by `MlflowSink.close` when journaled writes did not all reach the store.

    Attributes:
        pending: what is left (`metalearner.journal.Pending`).
        journal_dir: the journal that ``metalearner sync`` delivers later.
    """

    def __init__(self, pending: Pending, journal_dir: Path) -> None:
        self.pending, self.journal_dir = pending, journal_dir
        super().__init__(f"{pending.points} trace point(s) ({pending.records} record(s)) not in the tracking store")


class MlflowWriter:
    """The single writer of a process: producers journal, one thread delivers.

    Each write is a record appended to the journal (fsync'd once per `flush`); the
    delivery thread creates the MLflow run of a run key, maps the key to its run id
    (``delivered.json``) and sends the run's records in journal order. `close` waits for
    everything to be delivered, or until the current outage has lasted ``outage_s``; what
    is left stays in the journal for ``metalearner sync``.

    Args:
        tracking_uri: MLflow tracking URI (SQLite file, tracking server, ...).
        journal_dir: the journal folder (``EXPERIMENT_DIR/tracking``); an existing journal
            is continued. None: a temporary folder, removed when everything is delivered.
        outage_s: how long `close` keeps retrying through an outage.
        flush_every: producer side: journal buffered records once this many points wait.
        flush_seconds: ...or once the oldest waiting record is this old.
        max_queue: undelivered points the delivery thread holds in memory.
        backoff_cap: the longest wait between retries, in seconds.
        connections: runs delivered at once, each over its own request (a run's records
            stay in order, one request at a time). None: `SERVER_CONNECTIONS` for a
            tracking server, 1 for a local store (SQLite gains nothing from threads).
        metrics_db: the tracking server's PostgreSQL backend (``--metrics-db``): trace
            points go there in bulk (`metalearner.metrics_db`), everything else through
            the server. None: all through the server.
    """

    def __init__(self, tracking_uri: str, journal_dir: str | Path | None = None, outage_s: float = DEFAULT_OUTAGE_S,
                 flush_every: int = MAX_METRICS_PER_BATCH, flush_seconds: float = 2.0,
                 max_queue: int = 100_000, backoff_cap: float = 10.0, connections: int | None = None,
                 metrics_db: str | None = None) -> None:
        mlflow = mlflow_module()
        self.tracking_uri = tracking_uri
        self._temp = journal_dir is None
        self.journal_dir = Path(tempfile.mkdtemp(prefix="metalearner-journal-") if journal_dir is None else journal_dir)
        self.journal = Journal(self.journal_dir, tracking_uri)  # first: a busy journal touches no store
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.outage_s = float(outage_s)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()  # producer side: buffer, journal appends, step watermarks
        self._buffer: list[dict[str, Any]] = []
        self._n_buffered = 0
        self._oldest = 0.0
        self._last_step: dict[str, int] = {}  # run key -> last trace step journaled
        self._last_key_step: dict[tuple[str, str], int] = {}  # (run key, metric) -> last step journaled
        self._keys: dict[str, dict[str, Any]] = {}  # run key -> its create record
        self._status: dict[str, str] = {}  # run key -> RUNNING, or the status of its last "end"
        self._param_names: dict[str, set[str]] = {}  # run key -> param names journaled (the first value wins)
        self._tags: dict[str, dict[str, str]] = {}  # run key -> its tags as journaled (set and not removed)
        for rec in self.journal.records_at_open:
            self._note(rec)
        connections = max(1, connections or (SERVER_CONNECTIONS if is_remote(tracking_uri) else 1))
        # records up to this number were journaled by an earlier process: their runs may exist already
        before = max((r["n"] for r in self.journal.records_at_open), default=0)
        self.delivery = Delivery(tracking_uri, self.client, self.journal, before, self.outage_s, max_queue,
                                 backoff_cap, connections, MetricsDb(metrics_db) if metrics_db else None)
        self.left: Pending | None = None  # what `close` left in the journal

    @property
    def points_written(self) -> int:
        """Metric values delivered by this process."""
        return self.delivery.points_written

    @property
    def errors(self) -> list[str]:
        """This session's permanent failures (and a give-up at close)."""
        return self.delivery.errors

    # ------------------------------------------------------------ journaling
    def _note(self, rec: dict[str, Any]) -> None:
        """Keep the producer's watermarks in step with a journaled record."""
        op, key = rec["op"], rec["run"]
        if op in ("run", "reopen"):
            if op == "run":
                self._keys[key] = rec
                self._tags[key] = dict(rec.get("tags") or {})
            self._status[key] = "RUNNING"
        elif op == "tags":
            self._tags.setdefault(key, {}).update(rec["tags"])
        elif op == "untag":
            for name in rec["tags"]:
                self._tags.get(key, {}).pop(name, None)
        elif op == "end":
            self._status[key] = rec["status"]
        elif op == "params":
            self._param_names.setdefault(key, set()).update(rec["params"])
        elif op in METRIC_OPS:
            step = int(rec["step"])
            if op == "m":
                self._last_step[key] = max(self._last_step.get(key, 0), step)
            for k in rec["v"]:
                self._last_key_step[(key, k)] = step

    def _buffer_locked(self, rec: dict[str, Any], points: int) -> bool:
        """Buffer ``rec`` (the caller holds the lock); True when a flush is due."""
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append(rec)
        self._note(rec)
        self._n_buffered += points
        return self._n_buffered >= self.flush_every or time.monotonic() - self._oldest > self.flush_seconds

    def _add(self, rec: dict[str, Any], points: int = 0) -> None:
        with self._lock:
            due = self._buffer_locked(rec, points)
        if due:
            self.flush()

    def flush(self, key: str | None = None) -> None:
        """Journal (append + fsync) every buffered record and hand it to the delivery
        thread. ``key`` is accepted for the callers that flush one run: the journal is one file."""
        with self._lock:
            batch, self._buffer, self._n_buffered = self._buffer, [], 0
            if batch:
                self.delivery.hand_off(batch, lambda: self.journal.append(batch))

    # ------------------------------------------------------------ runs
    def has_run(self, key: str) -> bool:
        """Whether ``key`` names a run of this journal."""
        with self._lock:
            return key in self._keys

    def create_run(self, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                   parent: str | None = None, key: str | None = None) -> str:
        """Journal a new run; returns its run key at once (the run is created in MLflow by
        the delivery thread). A ``key`` that the journal already holds reopens that run.

        Args:
            experiment: MLflow experiment name (created if missing).
            run_name: MLflow run name.
            tags: run tags.
            parent: run key of the parent run (its id becomes ``mlflow.parentRunId``).
            key: the run key; default a fresh one.
        """
        key = key or uuid.uuid4().hex[:16]
        if self.has_run(key):
            self._add({"op": "reopen", "run": key})
            return key
        tags = {**(tags or {}), RUN_KEY_TAG: f"{self.journal.id}/{key}"}
        self._add({"op": "run", "run": key, "experiment": experiment, "name": run_name, "tags": tags,
                   "parent": parent})
        return key

    def adopt_run(self, run_id: str, key: str | None = None) -> str:
        """Journal writes to an MLflow run made elsewhere (e.g. the report's, to a sweep's
        runs), leaving its status alone; returns its run key (default: the run id)."""
        key = key or self.key_of(run_id) or run_id
        if not self.has_run(key):
            self._add({"op": "run", "run": key, "run_id": run_id})
        return key

    def resume_run(self, run_id: str, key: str | None = None, metric: str = "loss") -> str:
        """Adopt an MLflow run made elsewhere (e.g. by an earlier ``metalearner train``
        without this journal) and reopen it; blocks to read its last stored step of
        ``metric``, from which `log_metrics` continues. Returns the run key."""
        key = key or self.key_of(run_id) or run_id
        if not self.has_run(key):
            hist = self.client.get_metric_history(run_id, metric)
            with self._lock:
                self._last_step[key] = max((m.step for m in hist), default=0)
            self.adopt_run(run_id, key)
        self._add({"op": "reopen", "run": key})
        return key

    def key_of(self, run_id: str) -> str | None:
        """The run key of this journal that was delivered as MLflow run ``run_id``."""
        return next((k for k, p in list(self.delivery.state.runs.items()) if p.run_id == run_id), None)

    def run_status(self, key: str) -> str | None:
        """The status journaled for run ``key``: RUNNING (created or reopened, not ended),
        the status of its last `terminate`, or None for a key the journal does not hold.
        Read from the journal (durable), so a resumed process sees what a dead one left."""
        with self._lock:
            return self._status.get(key)

    def run_keys(self) -> list[str]:
        """Every run key of this journal, in creation order."""
        with self._lock:
            return list(self._keys)

    def journaled_tags(self, key: str) -> dict[str, str]:
        """The tags journaled for run ``key`` (at its creation or since, less those
        removed), also by an earlier process of this journal; a copy. The tags an adopted
        run had in the store before are not read."""
        with self._lock:
            return dict(self._tags.get(key, {}))

    def last_step(self, key: str) -> int:
        """The last trace step journaled for run ``key`` (0 if none)."""
        with self._lock:
            return self._last_step.get(key, 0)

    def run_id(self, key: str, timeout: float = 0.0) -> str | None:
        """The MLflow run id of ``key``, once the delivery thread has created the run;
        waits up to ``timeout`` seconds for it (journaling what is buffered first), and not
        at all once the store has refused it for good (e.g. a 401/403: no, or wrong,
        credentials)."""
        deadline = time.monotonic() + timeout
        if timeout > 0 and self.delivery.run_id(key) is None:
            self.flush()  # a create still in the producer's buffer would never be delivered while we wait
        while True:
            rid = self.delivery.run_id(key)
            if rid:
                return rid
            if time.monotonic() >= deadline or not self.delivery.thread.is_alive() or self.delivery.failed(key):
                return None
            self.delivery.wake()
            time.sleep(0.05)

    def terminate(self, key: str, status: str = "FINISHED") -> None:
        self._add({"op": "end", "run": key, "status": status})
        self.flush()

    # ------------------------------------------------------------ params, tags, files
    def log_params(self, key: str, params: dict[str, Any]) -> None:
        """Journal run ``key``'s params, less the names it already has: MLflow keeps a
        param's first value and refuses a change (a 400 that would stop the run's
        delivery), e.g. a trial of a resumed PBT sweep re-sending its mutated settings."""
        with self._lock:
            seen = self._param_names.setdefault(key, set())
            new = {k: v for k, v in params_to_strings(params).items() if k not in seen}
            seen.update(new)  # claimed now: concurrent producers cannot both send a name
        if new:
            self._add({"op": "params", "run": key, "params": new})

    def set_tags(self, key: str, tags: dict[str, Any]) -> None:
        self._add({"op": "tags", "run": key, "tags": {k: str(v) for k, v in tags.items()}})

    def delete_tags(self, key: str, names: Iterable[str]) -> None:
        """Journal the removal of tags ``names`` from run ``key`` (those it does not have
        are skipped at delivery), e.g. ``metalearner.interrupted`` when a sweep resumes."""
        self._add({"op": "untag", "run": key, "tags": sorted(set(names))})

    def log_artifact(self, key: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._add({"op": "artifact", "run": key, "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_saved_view(self, experiment_id: str, view_key: str, value: str) -> bool:
        """Journal a saved view of the MLflow UI: the experiment tag
        ``mlflow.sharedViewState.VIEW_KEY`` (under a key of its own, so that a refusal
        stops nothing else).

        Returns:
            True when journaled; False (nothing journaled) for a value longer than the
            store allows: the caller then prints the plain link.
        """
        if not saved_view_fits(value):
            return False
        self.set_experiment_tags(experiment_id, {SHARED_VIEW_PREFIX + view_key: value})
        return True

    def set_experiment_tags(self, experiment_id: str, tags: dict[str, Any]) -> None:
        """Journal tags of an experiment (e.g. its description, ``mlflow.note.content``),
        under a key of their own, so that a refusal stops nothing else."""
        self._add({"op": "exptag", "run": f"experiment:{experiment_id}", "experiment_id": experiment_id,
                   "tags": {k: str(v) for k, v in tags.items()}})

    # ------------------------------------------------------------ metrics
    def log_rows(self, key: str, rows: Iterable[dict[str, Any]], timestamp_ms: int | None = None) -> int | None:
        """Journal trace rows of run ``key``, each one step: ``{"step": s, metric: value,
        ...}`` in increasing steps (values that are None are left out). The one place that
        keeps exactly one point per step: rows at or below the last step journaled for the
        run are dropped (a trial restored from a checkpoint, or a killed worker's orphan
        chunk, repeats steps).

        Returns:
            The first step journaled, None when every row was dropped.
        """
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        first = None
        due = False
        with self._lock:  # claimed under the lock: concurrent producers cannot both pass
            for row in rows:
                step = int(row["step"])
                if step <= self._last_step.get(key, 0):
                    continue
                values = {k: float(v) for k, v in row.items() if k != "step" and v is not None}
                due = self._buffer_locked({"op": "m", "run": key, "step": step, "ts": ts, "v": values},
                                          len(values)) or due
                first = step if first is None else first
        if due:
            self.flush()
        return first

    def log_metrics(self, key: str, metrics: dict[str, float], step: int,
                    timestamp_ms: int | None = None) -> bool:
        """Journal one step's trace metrics (`log_rows` of one row); False (and nothing
        journaled) if ``step`` is not past the last step journaled for run ``key``."""
        return self.log_rows(key, [{**metrics, "step": step}], timestamp_ms) is not None

    def log_extra_metrics(self, key: str, metrics: dict[str, float], step: int) -> None:
        """Metrics outside the per-step trace (e.g. PBT's changed settings); a key's point
        at or below its last journaled step is dropped (each key's steps increase)."""
        with self._lock:
            keep = {k: float(v) for k, v in metrics.items() if step > self._last_key_step.get((key, k), 0)}
        if keep:
            self._add({"op": "x", "run": key, "step": int(step), "ts": int(time.time() * 1000), "v": keep}, len(keep))

    def log_summary(self, key: str, metrics: dict[str, float], step: int = 0) -> None:
        """Summary metrics (the report's, per arm) at one step: finite values only, sent
        as they are (a later report logs them again, its values the latest)."""
        keep = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if keep:
            self._add({"op": SUMMARY_OP, "run": key, "step": int(step), "ts": int(time.time() * 1000), "v": keep},
                      len(keep))

    # ------------------------------------------------------------ the end
    def close(self) -> Pending:
        """Journal what is buffered, wait for delivery (through an outage of up to
        ``outage_s``), stop the thread. Returns what is still pending (nothing when all
        went well; a temporary journal is then removed)."""
        if self.left is not None:
            return self.left
        self.flush()
        self.delivery.close()
        self.journal.close()
        self.left = pending(self.journal_dir)
        if self._temp and self.left.complete:
            shutil.rmtree(self.journal_dir, ignore_errors=True)
        return self.left


class MlflowSink:
    """A `TraceSink` into one MLflow run (``metalearner train``), through a journaled
    `MlflowWriter`. The run is created before training starts (`start` waits for its id,
    up to the outage allowance), since ``--checkpoint-dir`` records it."""

    def __init__(self, writer: MlflowWriter, key: str) -> None:
        self.writer, self.key = writer, key

    @property
    def run_id(self) -> str | None:
        return self.writer.run_id(self.key)

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str,
              tags: dict[str, str] | None = None, resume_run_id: str | None = None,
              journal_dir: str | Path | None = None) -> MlflowSink:
        writer = MlflowWriter(tracking_uri, journal_dir=journal_dir)
        if resume_run_id:
            key = writer.resume_run(resume_run_id)
        else:
            key = writer.create_run(experiment, run_name, tags)
        writer.flush()
        if writer.run_id(key, timeout=writer.outage_s) is None:
            left = writer.close()
            raise TrackingIncomplete(left, writer.journal_dir)
        return cls(writer, key)

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.log_params(self.key, params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.writer.log_metrics(self.key, metrics, step)

    def close(self, status: str = "FINISHED") -> None:
        """Terminate the run and deliver everything.

        Raises:
            TrackingIncomplete: writes are left in the journal (``metalearner sync`` delivers them).
        """
        self.writer.terminate(self.key, status)
        left = self.writer.close()
        if not left.complete:
            raise TrackingIncomplete(left, self.writer.journal_dir)


def sync_journal(journal_dir: str | Path, tracking_uri: str | None = None,
                 outage_s: float = DEFAULT_OUTAGE_S) -> tuple[Pending, int]:
    """Deliver what a journal holds (``metalearner sync``): creates missing runs, sends
    params, tags and metrics past each run's watermark, terminates runs with their
    journaled status. Returns (what is still pending, points written).

    Args:
        journal_dir: the journal folder.
        tracking_uri: the store; default the one the journal was written for.
        outage_s: how long to retry an unreachable store.
    """
    header, _ = read_lines(Path(journal_dir) / JOURNAL_FILE)
    uri = tracking_uri or (header[0].get("tracking_uri") if header else None) or resolve_tracking_uri(None)
    writer = MlflowWriter(uri, journal_dir=journal_dir, outage_s=outage_s)
    left = writer.close()
    return left, writer.points_written
