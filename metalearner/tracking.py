"""MLflow: the one module that talks to MLflow (writes, and the queries of the report).

Write path. Every write of a process goes through one `MlflowWriter`: producers append
records to a durable journal (`metalearner.journal`, fsync'd per batch) and never wait on
the store, run creation included; one writer thread delivers the journal with batched
``log_batch`` calls (at most 1000 points per call; to a tracking server, several runs at
once over parallel requests, each run in journal order), retrying through outages, and records
its progress durably, so a restart neither rewrites nor skips a point; ``metalearner
sync`` delivers what an outage left. With a single writer per store, the embedded SQLite
default cannot raise "database is locked": in a sweep, Ray trials do not touch MLflow at
all — they send their trace chunks to the sweep's inbox (`trainables.channel`) and the
driver's writer stores them. With ``--metrics-db`` (the server's PostgreSQL), the trace
points skip the server and go into its tables in bulk (`metalearner.metrics_db`).

Exactly one point per step per key: a `MlflowWriter` remembers the last step journaled
for each run (also across restarts: it is read back from the journal) and drops records
at or below it (a trial restored from a checkpoint repeats those steps exactly; a PBT
exploit continues from the donor's step).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metalearner.journal import (
    JOURNAL_FILE,
    METRIC_OPS,
    Journal,
    Pending,
    RunProgress,
    load_state,
    pending,
    read_lines,
    save_state,
)
from metalearner.metrics_db import MetricsDb, MetricsDbError

log = logging.getLogger(__name__)

# tags that tie the runs of a sweep together (written by the sweep, read by the report)
KIND_TAG = "metalearner.kind"  # "sweep" | "trial" | "train"
ARM_TAG = "metalearner.arm"
PHASE_TAG = "metalearner.phase"  # "search" | "compare"
SEED_TAG = "metalearner.seed"
PARENT_TAG = "mlflow.parentRunId"
RUN_KEY_TAG = "metalearner.run_key"  # JOURNAL_ID/KEY: finds a run again after a crash or a lost response
DEFAULT_OUTAGE_S = 300.0  # tracking.outage_s
DIVERGED_TAG = "metalearner.diverged"  # set on a trial ended by train.max_nonfinite
STOPPED_EARLY_TAG = "metalearner.stopped_early"
INTERRUPTED_TAG = "metalearner.interrupted"  # parent and unfinished children of an interrupted sweep (KILLED)
_RUN_ID = re.compile(r"[0-9a-f]{32}")

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
WRITER_NICE = 10
READ_CHUNK = 4 << 20  # bytes of journal the delivery thread reads at a time
SERVER_CONNECTIONS = 8  # runs delivered in parallel to a tracking server (bench_tracking_load.py)
BULK_POINTS = 5000  # points per transaction on the --metrics-db path (bench_tracking_load.py)


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


class TrackingIncomplete(RuntimeError):
    """Raised by `MlflowSink.close` when journaled writes did not all reach the store.

    Attributes:
        pending: what is left (`metalearner.journal.Pending`).
        journal_dir: the journal that ``metalearner sync`` delivers later.
    """

    def __init__(self, pending: Pending, journal_dir: Path) -> None:
        self.pending, self.journal_dir = pending, journal_dir
        super().__init__(f"{pending.points} trace point(s) ({pending.records} record(s)) not in the tracking store")


def _permanent(e: BaseException) -> bool:
    """A failure that retrying cannot fix: the store rejected the request (HTTP 4xx other
    than 429), or a file to upload is gone. Everything else (refused connections, 5xx,
    a locked database, timeouts) is an outage and is retried."""
    if isinstance(e, (FileNotFoundError, MetricsDbError)):
        return True
    code = getattr(e, "get_http_status_code", None)
    if code is None:
        return False
    try:
        status = int(code())
    except Exception:  # noqa: BLE001 - an odd exception: treat as transient
        return False
    return 400 <= status < 500 and status != 429


@dataclass
class _Run:
    """The writer thread's view of one run key."""

    key: str
    run_id: str | None = None
    seq: int = 0  # delivered watermark
    todo: deque = field(default_factory=deque)  # records read from the journal, not delivered
    verify: bool = True  # ask the store what it holds before sending metrics (after a restart/failure)
    failed: str | None = None  # a permanent error: delivery of this run stopped
    create_tried: bool = False  # a create request was sent: the run may exist although no id came back


def _lower_priority() -> None:
    """Linux schedules threads individually: let the training threads win the cores."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed
        pass


class MlflowWriter:
    """The single writer of a process: producers journal, one thread delivers.

    Producers (the Tune callback on the driver, the training thread of ``metalearner
    train``) never wait on the store: each write is a record appended to the journal
    (fsync'd once per `flush`), and that is all they do. Run creation too: `create_run`
    returns a local *run key* at once; the writer thread creates the MLflow run, maps the
    key to its run id (``delivered.json``) and then sends the run's records with batched
    ``log_batch`` calls, in journal order. The thread reads the journal file itself (at
    most ``max_queue`` undelivered points in memory; the rest wait in the file), so a
    producer is never blocked and nothing is dropped when the store is down.

    A failed delivery is retried with exponential backoff (0.5 s doubling, at most
    ``backoff_cap`` s). `close` waits for everything to be delivered, or until the
    current outage has lasted ``outage_s``; what is left stays in the journal for
    ``metalearner sync``. Redelivery is exact: a run is found again by its
    ``metalearner.run_key`` tag before it is created, and after a restart or a failure the
    store's last step of each key is read before metrics are sent, so that nothing is
    written twice or skipped.

    Args:
        tracking_uri: MLflow tracking URI (SQLite file, tracking server, ...).
        journal_dir: the journal folder (``EXPERIMENT_DIR/tracking``); an existing journal
            is continued. None: a temporary folder, removed when everything is delivered.
        outage_s: how long `close` keeps retrying through an outage.
        flush_every: producer side: journal buffered records once this many points wait.
        flush_seconds: ...or once the oldest waiting record is this old.
        max_queue: undelivered points the delivery thread holds in memory.
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
        mlflow = _mlflow()
        self.tracking_uri = tracking_uri
        self._temp = journal_dir is None
        self.journal_dir = Path(tempfile.mkdtemp(prefix="metalearner-journal-") if journal_dir is None else journal_dir)
        self.journal = Journal(self.journal_dir, tracking_uri)  # first: a busy journal touches no store
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.outage_s = float(outage_s)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.max_queue = max_queue
        self.backoff_cap = backoff_cap
        remote = tracking_uri.startswith(("http://", "https://"))
        self.metrics_db = MetricsDb(metrics_db) if metrics_db else None
        self.connections = max(1, connections or (SERVER_CONNECTIONS if remote else 1))
        self._lock = threading.Lock()  # producer side: buffer, journal appends, step watermarks
        self._buffer: list[dict[str, Any]] = []
        self._n_buffered = 0
        self._oldest = 0.0
        self._last_step: dict[str, int] = {}  # run key -> last trace step journaled
        self._last_key_step: dict[tuple[str, str], int] = {}  # (run key, metric) -> last step journaled
        self._keys: dict[str, dict[str, Any]] = {}  # run key -> its create record
        self._status: dict[str, str] = {}  # run key -> RUNNING, or the status of its last "end"
        self._param_names: dict[str, set[str]] = {}  # run key -> param names journaled (the first value wins)
        for rec in self.journal.records_at_open:
            self._note(rec)
        # delivery side (the thread)
        self.state = load_state(self.journal_dir)
        self.state.tracking_uri = tracking_uri
        self._runs: dict[str, _Run] = {k: _Run(k, p.run_id, p.seq) for k, p in self.state.runs.items()}
        self._offset = 0
        self._in_memory = 0
        self._delivered = 0
        self._dirty = False
        self._exp_ids: dict[str, str] = {}
        self._progress_lock = threading.Lock()  # delivery workers: watermarks and counters
        self._experiment_lock = threading.Lock()  # delivery workers: experiment ids
        self._pool: ThreadPoolExecutor | None = None
        # records up to this number were journaled by an earlier process: their runs may exist already
        self._journaled_before = max((r["n"] for r in self.journal.records_at_open), default=0)
        self._wake = threading.Condition()
        self._closing = False
        self._outage_since: float | None = None
        self.points_written = 0
        self.errors: list[str] = []  # this session's permanent failures (and a give-up at close)
        self.last_error: BaseException | None = None
        self.delivery: Pending | None = None
        self._thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producer side
    def _note(self, rec: dict[str, Any]) -> None:
        """Keep the producer's watermarks in step with a journaled record."""
        op, key = rec["op"], rec["run"]
        if op in ("run", "reopen"):
            if op == "run":
                self._keys[key] = rec
            self._status[key] = "RUNNING"
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

    def _add(self, rec: dict[str, Any], points: int = 0) -> None:
        with self._lock:
            if not self._buffer:
                self._oldest = time.monotonic()
            self._buffer.append(rec)
            self._note(rec)
            self._n_buffered += points
            due = self._n_buffered >= self.flush_every or time.monotonic() - self._oldest > self.flush_seconds
        if due:
            self.flush()

    def has_run(self, key: str) -> bool:
        """Whether ``key`` names a run of this journal."""
        with self._lock:
            return key in self._keys

    def create_run(self, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                   parent: str | None = None, key: str | None = None) -> str:
        """Journal a new run; returns its run key at once (the run is created in MLflow by
        the writer thread). A ``key`` that the journal already holds reopens that run.

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

    def resume_run(self, run_id: str, key: str | None = None, metric: str = "loss") -> str:
        """Adopt an MLflow run made elsewhere (e.g. by an earlier ``metalearner train``
        without this journal) and reopen it; blocks to read its last stored step of
        ``metric``, from which `log_metrics` continues. Returns the run key."""
        key = key or self.key_of(run_id) or run_id
        if not self.has_run(key):
            hist = self.client.get_metric_history(run_id, metric)
            with self._lock:
                self._last_step[key] = max((m.step for m in hist), default=0)
            self._add({"op": "run", "run": key, "run_id": run_id})
        self._add({"op": "reopen", "run": key})
        return key

    def key_of(self, run_id: str) -> str | None:
        """The run key of this journal that was delivered as MLflow run ``run_id``."""
        return next((k for k, p in list(self.state.runs.items()) if p.run_id == run_id), None)

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

    def last_step(self, key: str) -> int:
        """The last trace step journaled for run ``key`` (0 if none)."""
        with self._lock:
            return self._last_step.get(key, 0)

    def run_id(self, key: str, timeout: float = 0.0) -> str | None:
        """The MLflow run id of ``key``, once the writer thread has created the run;
        waits up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        while True:
            run = self._runs.get(key)
            if run is not None and run.run_id:
                return run.run_id
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return None
            with self._wake:
                self._wake.notify_all()
            time.sleep(0.05)

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

    def terminate(self, key: str, status: str = "FINISHED") -> None:
        self._add({"op": "end", "run": key, "status": status})
        self.flush()

    def log_metrics(self, key: str, metrics: dict[str, float], step: int,
                    timestamp_ms: int | None = None) -> bool:
        """Journal one step's trace metrics; False (and nothing journaled) if ``step`` is
        not past the last step journaled for run ``key`` (a restored trial repeats steps)."""
        with self._lock:
            if step <= self._last_step.get(key, 0):
                return False
            self._last_step[key] = step  # claimed now: concurrent producers cannot both pass
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        self._add({"op": "m", "run": key, "step": int(step), "ts": ts, "v": {k: float(v) for k, v in metrics.items()}},
                  len(metrics))
        return True

    def log_extra_metrics(self, key: str, metrics: dict[str, float], step: int) -> None:
        """Metrics outside the per-step trace (e.g. PBT's changed settings); a key's point
        at or below its last journaled step is dropped (each key's steps increase)."""
        with self._lock:
            keep = {k: float(v) for k, v in metrics.items() if step > self._last_key_step.get((key, k), 0)}
        if keep:
            self._add({"op": "x", "run": key, "step": int(step), "ts": int(time.time() * 1000), "v": keep}, len(keep))

    def flush(self, key: str | None = None) -> None:
        """Journal (append + fsync) every buffered record and wake the writer thread.
        ``key`` is accepted for the callers that flush one run: the journal is one file."""
        with self._lock:
            batch, self._buffer, self._n_buffered = self._buffer, [], 0
            if batch:
                self.journal.append(batch)
        if batch:
            with self._wake:
                self._wake.notify_all()

    # ------------------------------------------------------------ delivery thread
    def _loop(self) -> None:
        try:
            self._deliver_until_closed()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self.metrics_db is not None:
                self.metrics_db.close()

    def _deliver_until_closed(self) -> None:
        _lower_priority()
        backoff = 0.0
        while True:
            self._read_journal()
            progress = False
            try:
                progress = self._deliver_all()
                self._outage_since, backoff = None, 0.0
            except Exception as e:  # noqa: BLE001 - an outage: retried below, counted at close
                self.last_error = e
                now = time.monotonic()
                if self._outage_since is None:
                    self._outage_since = now
                    log.warning("MLflow store unreachable, retrying for up to %.0f s: %s", self.outage_s, e)
                if self._closing and now - self._outage_since >= self.outage_s:
                    self._give_up(e)
                    self._save_state()
                    return
                backoff = min(self.backoff_cap, backoff * 2 if backoff else 0.5)
            if self._dirty:
                self._save_state()
            idle = self._all_read() and (not progress or not self._todo())
            if self._closing and not backoff and idle:
                return
            with self._wake:
                if backoff:
                    self._wake.wait(backoff)
                elif idle and not self._closing:
                    self._wake.wait(1.0)

    def _give_up(self, e: BaseException) -> None:
        msg = (f"tracking store {self.tracking_uri} unreachable for {self.outage_s:.0f} s "
               f"(tracking.outage_s); last error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        self.errors.append(msg)
        self._dirty = True
        log.error(msg)

    def _all_read(self) -> bool:
        try:
            return self._offset >= self.journal.path.stat().st_size
        except OSError:
            return True

    def _todo(self) -> bool:
        return any(r.todo and not r.failed for r in self._runs.values())

    def _read_journal(self) -> None:
        """Move journaled records past each run's watermark into memory (bounded)."""
        while self._in_memory < self.max_queue and not self._all_read():
            recs, offset = read_lines(self.journal.path, self._offset, READ_CHUNK)
            if offset == self._offset:
                return
            self._offset = offset
            for rec in recs:
                if rec.get("op") == "journal":
                    continue
                run = self._runs.setdefault(rec["run"], _Run(rec["run"]))
                if rec["n"] <= run.seq:
                    continue  # delivered before a restart
                run.todo.append(rec)
                self._in_memory += len(rec.get("v", ())) or 1
            # records read past the bound stay in memory; the next read waits for room

    def _deliver_all(self) -> bool:
        """One pass over the runs with work, up to ``connections`` of them at once (each
        run by one worker: its records stay in journal order); True if anything was
        delivered. Raises the first outage error after every run of the pass has ended."""
        before = self._delivered
        runs = [r for r in list(self._runs.values()) if r.todo and not r.failed]
        if self.connections > 1 and len(runs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.connections, thread_name_prefix="mlflow-deliver",
                                                initializer=_lower_priority)
            outages = [e for e in self._pool.map(self._deliver_run, runs) if e is not None]
        else:
            outages = []
            for run in runs:
                err = self._deliver_run(run)
                if err is not None:
                    outages.append(err)
                    break  # the store is down: the next pass retries after the backoff
        if outages:
            raise outages[0]
        return self._delivered != before

    def _deliver_run(self, run: _Run) -> BaseException | None:
        """Deliver one run's records; returns an outage error (retried), None otherwise.
        A permanent rejection stops this run's delivery and is recorded."""
        try:
            self._deliver(run)
        except Exception as e:  # noqa: BLE001 - sorted below
            run.verify = True  # the last request may or may not have landed
            if not _permanent(e):
                return e
            run.failed = f"run {run.key}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.errors.append(run.failed)
            self._dirty = True
            log.error("MLflow rejected a write, delivery of run %s stopped: %s", run.key, e)
        return None

    def _done(self, run: _Run, n: int, cost: int, points: int = 0) -> None:
        run.seq = n
        with self._progress_lock:
            self._delivered += 1
            self._dirty = True
            self.state.runs[run.key] = RunProgress(run.run_id, n)
            self._in_memory -= cost
            self.points_written += points

    def _deliver(self, run: _Run) -> None:
        while run.todo:
            rec = run.todo[0]
            op = rec["op"]
            if op == "run":
                if run.run_id is None:
                    run.run_id = rec.get("run_id") or self._create(run, rec)
                    if run.run_id is None:
                        return  # its parent does not exist yet
                run.todo.popleft()
                self._done(run, rec["n"], 1)
            elif run.run_id is None:
                raise RuntimeError(f"journal: run {run.key} has records before its creation")
            elif op == "reopen":
                self.client.update_run(run.run_id, status="RUNNING")
                run.todo.popleft()
                self._done(run, rec["n"], 1)
            elif op == "untag":
                self._untag(run.run_id, rec["tags"])
                run.todo.popleft()
                self._done(run, rec["n"], 1)
            elif op == "end":
                self.client.set_terminated(run.run_id, status=rec["status"])
                run.todo.popleft()
                self._done(run, rec["n"], 1)
            elif op == "artifact":
                self.client.log_artifact(run.run_id, rec["path"], rec.get("artifact_path"))
                run.todo.popleft()
                self._done(run, rec["n"], 1)
            else:
                self._send_batch(run)

    def _untag(self, run_id: str, names: list[str]) -> None:
        """Delete the tags ``names`` that run ``run_id`` has (MLflow refuses to delete a
        missing one, and a redelivery after a lost response finds them gone)."""
        have = self.client.get_run(run_id).data.tags
        for name in names:
            if name in have:
                self.client.delete_tag(run_id, name)

    def _create(self, run: _Run, rec: dict[str, Any]) -> str | None:
        tags = dict(rec.get("tags") or {})
        if rec.get("parent"):
            parent = self._runs.get(rec["parent"])
            pid = parent.run_id if parent else rec["parent"]  # a key of this journal, or a run id
            if parent is not None and pid is None:
                return None
            tags[PARENT_TAG] = pid
        exp_id = self._experiment_id(rec["experiment"])
        if run.create_tried or rec["n"] <= self._journaled_before:  # a lost response, or an earlier process
            found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{tags[RUN_KEY_TAG]}'",
                                            max_results=1)
            if found:  # created before a crash or a lost response
                return found[0].info.run_id
        run.create_tried = True
        created = self.client.create_run(exp_id, tags=tags, run_name=rec.get("name")).info.run_id
        run.verify = False  # a run made just now holds nothing
        return created

    def _experiment_id(self, name: str) -> str:
        with self._experiment_lock:  # two workers must not both create it
            if name not in self._exp_ids:
                exp = self.client.get_experiment_by_name(name)
                self._exp_ids[name] = exp.experiment_id if exp else self.client.create_experiment(
                    name, artifact_location=artifact_location(self.tracking_uri, name))
            return self._exp_ids[name]

    def _send_batch(self, run: _Run) -> None:
        """One ``log_batch`` of the run's leading params/tags/metrics records; with
        ``metrics_db``, the points of up to `BULK_POINTS` go to the database instead and
        the server gets the params and tags alone."""
        entities = _mlflow().entities
        bulk = self.metrics_db is not None
        limit = BULK_POINTS if bulk else MAX_METRICS_PER_BATCH
        points: list[tuple[str, float, int, int]] = []  # (key, value, timestamp, step)
        params: list[Any] = []
        tags: list[Any] = []
        taken: list[dict[str, Any]] = []
        for rec in run.todo:
            op = rec["op"]
            if op not in ("params", "tags", *METRIC_OPS):
                break
            size = len(rec.get("v") or rec.get("params") or rec.get("tags") or ())
            if taken and (len(points) + len(params) + len(tags) + size > limit
                          or (op == "params" and len(params) + size > MAX_PARAMS_PER_BATCH)
                          or (op == "tags" and len(tags) + size > MAX_PARAMS_PER_BATCH)
                          or (op == "params" and any(p.key in rec["params"] for p in params))):
                break
            if op == "params":
                params += [entities.Param(k, v) for k, v in rec["params"].items()]
            elif op == "tags":
                tags += [entities.RunTag(k, v) for k, v in rec["tags"].items()]
            else:
                ts, step = rec["ts"], rec["step"]
                points += [(k, v, ts, step) for k, v in rec["v"].items()]
            taken.append(rec)
        if run.verify and points:
            stored = {k: max((m.step for m in self.client.get_metric_history(run.run_id, k)), default=0)
                      for k in {p[0] for p in points}}
            points = [p for p in points if p[3] > stored[p[0]]]
        run.verify = False
        metrics = [] if bulk else [entities.Metric(*p) for p in points]
        for i in range(0, max(len(params), 1), MAX_PARAMS_PER_BATCH):  # params alone may exceed one batch
            chunk = params[i: i + MAX_PARAMS_PER_BATCH]
            if chunk or (i == 0 and (tags or metrics)):
                self.client.log_batch(run.run_id, metrics=metrics if i == 0 else [], params=chunk,
                                      tags=tags if i == 0 else [])
        if bulk and points:
            self.metrics_db.log_points(run.run_id, points)
        for _ in taken:
            run.todo.popleft()
        self._done(run, taken[-1]["n"], sum(len(r.get("v", ())) or 1 for r in taken), len(points))

    def _save_state(self) -> None:
        self._dirty = False
        self.state.errors = list(self.errors)
        try:
            save_state(self.journal_dir, self.state)
        except OSError as e:  # the disk is the source of truth: this is not a warning
            self.errors.append(f"cannot save delivery state in {self.journal_dir}: {e}")

    # ------------------------------------------------------------ the end
    def close(self) -> Pending:
        """Journal what is buffered, wait for delivery (through an outage of up to
        ``outage_s``), stop the thread. Returns what is still pending (nothing when all
        went well; a temporary journal is then removed)."""
        if self.delivery is not None:
            return self.delivery
        self.flush()
        self._closing = True
        with self._wake:
            self._wake.notify_all()
        self._thread.join()
        self.journal.close()
        self.delivery = pending(self.journal_dir)
        if self._temp and self.delivery.complete:
            shutil.rmtree(self.journal_dir, ignore_errors=True)
        return self.delivery


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
