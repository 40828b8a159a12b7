"""The delivery thread: sends what a `MlflowWriter` journaled to the store, exactly once.

One thread (and, for a tracking server, a small pool: several runs at once, each run's
records in journal order, one request at a time) takes journaled records past each run's
delivered watermark and sends them with batched ``log_batch`` calls (at most 1000 points
per call; with ``--metrics-db`` the trace points go into the server's PostgreSQL in bulk,
`metalearner.metrics_db`, and the server gets params and tags). Progress is recorded
durably (``delivered.json``), so a restart neither rewrites nor skips a point.

Where the records come from. While the thread keeps up, the writer hands it each batch it
has just journaled, as the parsed records themselves (`Delivery.hand_off`): nothing is
read back or parsed again. It reads the journal file only for what it has not been handed:
at start (what an earlier process left) and after falling ``max_queue`` points behind
(the rest wait in the file). The journal stays the source of truth either way.

Failures. An outage (refused connection, 5xx, a locked database, a timeout) is retried
with exponential backoff; at close, for up to ``outage_s``. A permanent rejection
(`is_permanent`) stops the delivery of that run and is recorded. After a restart or a
failure, the store's last step of each key is read before metrics are sent, and a run is
found again by its ``metalearner.run_key`` tag before it is created.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from metalearner.journal import METRIC_OPS, Journal, RunProgress, load_state, read_lines, save_state
from metalearner.metrics_db import MetricsDb, MetricsDbError
from metalearner.tracking.store import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    PARENT_TAG,
    RUN_KEY_TAG,
    artifact_location,
    mlflow_module,
)

log = logging.getLogger(__name__)

WRITER_NICE = 10
READ_CHUNK = 4 << 20  # bytes of journal the delivery thread reads at a time
BULK_POINTS = 5000  # points per transaction on the --metrics-db path (bench_tracking_load.py)
SUMMARY_OP = "s"  # summary metrics (the report's): sent as they are, never filtered by step


def is_permanent(e: BaseException) -> bool:
    """A failure that retrying cannot fix: the store rejected the request (HTTP 4xx other
    than 429: a bad request, and also 401/403, no or wrong credentials or no permission),
    or a file to upload is gone. Everything else (refused connections, 5xx, a locked
    database, timeouts) is an outage and is retried."""
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
    """The delivery thread's view of one run key."""

    key: str
    run_id: str | None = None
    seq: int = 0  # delivered watermark
    todo: deque = field(default_factory=deque)  # records taken from the journal, not delivered
    verify: bool = True  # ask the store what it holds before sending metrics (after a restart/failure)
    failed: str | None = None  # a permanent error: delivery of this run stopped
    create_tried: bool = False  # a create request was sent: the run may exist although no id came back


def _lower_priority() -> None:
    """Linux schedules threads individually: let the training threads win the cores."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed
        pass


def _cost(rec: dict[str, Any]) -> int:
    """What a record counts against ``max_queue``: its points, or 1."""
    return len(rec.get("v", ())) or 1


class Delivery:
    """The thread that delivers one journal (see the module docstring).

    Args:
        tracking_uri: the store.
        client: its ``MlflowClient``.
        journal: the open journal (its file and folder; the writer appends to it).
        journaled_before: the last record number an earlier process journaled (its runs
            may exist in the store already).
        outage_s: how long `close` keeps retrying through an outage.
        max_queue: undelivered points held in memory.
        backoff_cap: the longest wait between retries, in seconds.
        connections: runs delivered at once.
        metrics_db: the bulk path for trace points, or None.
    """

    def __init__(self, tracking_uri: str, client: Any, journal: Journal, journaled_before: int, outage_s: float, max_queue: int,
                 backoff_cap: float, connections: int, metrics_db: MetricsDb | None) -> None:
        self.client = client
        self.journal = journal
        self.tracking_uri = tracking_uri
        self.outage_s, self.max_queue, self.backoff_cap = outage_s, max_queue, backoff_cap
        self.connections = connections
        self.metrics_db = metrics_db
        self.state = load_state(journal.folder)
        self.state.tracking_uri = self.tracking_uri
        self.runs: dict[str, _Run] = {k: _Run(k, p.run_id, p.seq) for k, p in self.state.runs.items()}
        self.journaled_before = journaled_before
        self._intake = threading.Lock()  # the file offset taken into memory, and the handed-off records
        # bytes of the journal taken (read, or handed off): a new journal holds only its header
        self._offset = 0 if journal.records_at_open else journal.size
        self._handed: list[dict[str, Any]] = []
        self.in_memory = 0
        self._delivered = 0
        self._dirty = False
        self._exp_ids: dict[str, str] = {}
        self._progress_lock = threading.Lock()  # delivery workers: watermarks and counters
        self._experiment_lock = threading.Lock()  # delivery workers: experiment ids
        self.pool: ThreadPoolExecutor | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._outage_since: float | None = None
        self.points_written = 0
        self.errors: list[str] = []  # this session's permanent failures (and a give-up at close)
        self.last_error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ the producer's side
    def hand_off(self, records: list[dict[str, Any]], append: Callable[[], tuple[int, int]]) -> None:
        """Journal ``records`` with ``append`` (it returns the bytes [start, end) of the
        file they now occupy) and take them as they are, when the thread has taken
        everything before them and has room; otherwise they wait in the file, to be read
        there. The thread does not read the file meanwhile. Call it under the producer's
        lock, so that records are handed off in journal order."""
        with self._intake:
            start, end = append()
            if self._offset == start and self.in_memory < self.max_queue:
                self._handed.extend(records)
                self._offset = end
        self.wake()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def run_id(self, key: str) -> str | None:
        run = self.runs.get(key)
        return run.run_id if run is not None else None

    def failed(self, key: str) -> str | None:
        """Why the delivery of run ``key`` stopped for good (`is_permanent`), or None."""
        run = self.runs.get(key)
        return run.failed if run is not None else None

    def close(self) -> None:
        """Deliver what is journaled (through an outage of up to ``outage_s``), then stop."""
        self._closing = True
        self.wake()
        self.thread.join()

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            self._deliver_until_closed()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            if self.metrics_db is not None:
                self.metrics_db.close()

    def _deliver_until_closed(self) -> None:
        _lower_priority()
        backoff = 0.0
        while True:
            self._take()
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
            idle = self._all_taken() and (not progress or not self._todo())
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

    def _all_taken(self) -> bool:
        with self._intake:
            if self._handed:
                return False
            try:
                return self._offset >= self.journal.path.stat().st_size
            except OSError:
                return True

    def _todo(self) -> bool:
        return any(r.todo and not r.failed for r in self.runs.values())

    def _take(self) -> None:
        """Move journaled records past each run's watermark into memory: those handed off,
        then (bounded by ``max_queue``) those only the file holds."""
        with self._intake:
            handed, self._handed = self._handed, []
        for rec in handed:
            self._queue(rec)
        while self.in_memory < self.max_queue:
            with self._intake:  # no hand-off while the file is read past the offset
                if self._handed:
                    return  # the writer caught the thread up: take those first, next pass
                recs, offset = read_lines(self.journal.path, self._offset, READ_CHUNK)
                if offset == self._offset:
                    return
                self._offset = offset
            for rec in recs:
                if rec.get("op") != "journal":
                    self._queue(rec)
            # records read past the bound stay in memory; the next read waits for room

    def _queue(self, rec: dict[str, Any]) -> None:
        run = self.runs.setdefault(rec["run"], _Run(rec["run"]))
        if rec["n"] <= run.seq:
            return  # delivered before a restart
        run.todo.append(rec)
        with self._progress_lock:
            self.in_memory += _cost(rec)

    def _save_state(self) -> None:
        self._dirty = False
        self.state.errors = list(self.errors)
        try:
            save_state(self.journal.folder, self.state)
        except OSError as e:  # the disk is the source of truth: this is not a warning
            self.errors.append(f"cannot save delivery state in {self.journal.folder}: {e}")

    # ------------------------------------------------------------ one pass
    def _deliver_all(self) -> bool:
        """One pass over the runs with work, up to ``connections`` of them at once (each
        run by one worker: its records stay in journal order); True if anything was
        delivered. Raises the first outage error after every run of the pass has ended."""
        before = self._delivered
        runs = [r for r in list(self.runs.values()) if r.todo and not r.failed]
        if self.connections > 1 and len(runs) > 1:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(self.connections, thread_name_prefix="mlflow-deliver",
                                               initializer=_lower_priority)
            outages = [e for e in self.pool.map(self._deliver_run, runs) if e is not None]
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
            if not is_permanent(e):
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
            self.in_memory -= cost
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
            elif op == "exptag":  # an experiment's tag (a saved view): needs no run
                for name, value in rec["tags"].items():
                    self.client.set_experiment_tag(rec["experiment_id"], name, value)
            elif run.run_id is None:
                raise RuntimeError(f"journal: run {run.key} has records before its creation")
            elif op == "reopen":
                self.client.update_run(run.run_id, status="RUNNING")
            elif op == "untag":
                self._untag(run.run_id, rec["tags"])
            elif op == "end":
                self.client.set_terminated(run.run_id, status=rec["status"])
            elif op == "artifact":
                self.client.log_artifact(run.run_id, rec["path"], rec.get("artifact_path"))
            else:
                self._send_batch(run)
                continue
            run.todo.popleft()
            self._done(run, rec["n"], 1)

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
            parent = self.runs.get(rec["parent"])
            pid = parent.run_id if parent else rec["parent"]  # a key of this journal, or a run id
            if parent is not None and pid is None:
                return None
            tags[PARENT_TAG] = pid
        exp_id = self.experiment_id(rec["experiment"])
        if run.create_tried or rec["n"] <= self.journaled_before:  # a lost response, or an earlier process
            found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{tags[RUN_KEY_TAG]}'",
                                            max_results=1)
            if found:  # created before a crash or a lost response
                return found[0].info.run_id
        run.create_tried = True
        created = self.client.create_run(exp_id, tags=tags, run_name=rec.get("name")).info.run_id
        run.verify = False  # a run made just now holds nothing
        return created

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created if missing (blocks on the store)."""
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
        entities = mlflow_module().entities
        bulk = self.metrics_db is not None
        limit = BULK_POINTS if bulk else MAX_METRICS_PER_BATCH
        points: list[tuple[str, float, int, int]] = []  # (key, value, timestamp, step)
        summary: list[Any] = []  # summary metrics: through the server, never filtered
        params: list[Any] = []
        tags: list[Any] = []
        taken: list[dict[str, Any]] = []
        for rec in run.todo:
            op = rec["op"]
            if op not in ("params", "tags", SUMMARY_OP, *METRIC_OPS):
                break
            size = len(rec.get("v") or rec.get("params") or rec.get("tags") or ())
            if taken and (len(points) + len(summary) + len(params) + len(tags) + size > limit
                          or (op == "params" and len(params) + size > MAX_PARAMS_PER_BATCH)
                          or (op == "tags" and len(tags) + size > MAX_PARAMS_PER_BATCH)
                          or (op == "params" and any(p.key in rec["params"] for p in params))):
                break
            if op == "params":
                params += [entities.Param(k, v) for k, v in rec["params"].items()]
            elif op == "tags":
                tags += [entities.RunTag(k, v) for k, v in rec["tags"].items()]
            elif op == SUMMARY_OP:
                summary += [entities.Metric(k, v, rec["ts"], rec["step"]) for k, v in rec["v"].items()]
            else:
                ts, step = rec["ts"], rec["step"]
                points += [(k, v, ts, step) for k, v in rec["v"].items()]
            taken.append(rec)
        if run.verify and points:
            stored = {k: max((m.step for m in self.client.get_metric_history(run.run_id, k)), default=0)
                      for k in {p[0] for p in points}}
            points = [p for p in points if p[3] > stored[p[0]]]
        run.verify = False
        metrics = summary + ([] if bulk else [entities.Metric(*p) for p in points])
        for i in range(0, max(len(params), 1), MAX_PARAMS_PER_BATCH):  # params alone may exceed one batch
            chunk = params[i: i + MAX_PARAMS_PER_BATCH]
            if chunk or (i == 0 and (tags or metrics)):
                self.client.log_batch(run.run_id, metrics=metrics if i == 0 else [], params=chunk,
                                      tags=tags if i == 0 else [])
        if bulk and points:
            self.metrics_db.log_points(run.run_id, points)
        for _ in taken:
            run.todo.popleft()
        self._done(run, taken[-1]["n"], sum(_cost(r) for r in taken), len(points) + len(summary))
