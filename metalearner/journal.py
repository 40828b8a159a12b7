"""The tracking journal: every MLflow write of a process, durable before it counts.

A journal is a folder (``EXPERIMENT_DIR/tracking`` for a sweep) holding:

- ``journal.jsonl``: append-only JSON lines, one record per write, fsync'd per batch.
  Each record has a global sequence number ``n``, an ``op`` and the local ``run`` key:
  ``run`` (create; experiment, name, tags, parent key, or a known ``run_id``),
  ``reopen``, ``params``, ``tags``, ``m`` (one step of trace metrics: ``step``, ``ts``,
  ``v`` = {key: value}), ``x`` (metrics outside the trace, same shape), ``artifact``,
  ``untag`` (delete the tags named in ``tags``), ``end`` (terminate with ``status``),
  ``s`` (summary metrics, e.g. the report's, same shape as ``m``, sent as they are),
  ``exptag`` (tags ``tags`` of experiment ``experiment_id``, under a key of its own).
  The first line is a header (``op`` = ``journal``).
- ``delivered.json``: what reached the store, rewritten atomically: per run key its MLflow
  ``run_id`` and the highest sequence number delivered (``seq``), plus delivery errors.
- ``lock``: held (flock) by the one process that writes or delivers this journal.

Invariant the producer keeps: within a run, each metric key's steps strictly increase in
journal order. Delivery is in journal order per run, so "delivered" is a watermark per
run, and a point of key k at step s is in the store iff s <= the store's last step of k.

A crash can leave a torn last line; it is cut off when the journal is opened for writing
and ignored when read. Standard library only: this module must not import mlflow.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_DIR = "tracking"  # inside an experiment folder
JOURNAL_FILE = "journal.jsonl"
STATE_FILE = "delivered.json"
LOCK_FILE = "lock"
VERSION = 1
METRIC_OPS = ("m", "x")  # per-step metrics: each key's steps increase within a run
POINT_OPS = (*METRIC_OPS, "s")  # every record that carries metric values


class JournalError(RuntimeError):
    """A journal that cannot be used (busy, corrupt, missing); the message names the file."""


def find_journal(path: str | Path) -> Path | None:
    """The journal folder of ``path``: ``path/tracking`` (an experiment or checkpoint
    folder) or ``path`` itself; None if neither holds a journal."""
    p = Path(path)
    for cand in (p / JOURNAL_DIR, p):
        if (cand / JOURNAL_FILE).is_file():
            return cand
    return None


def sync_target(journal_dir: Path) -> Path:
    """The folder to name in ``metalearner sync``: the experiment folder of a
    ``tracking`` journal, else the journal folder itself."""
    return journal_dir.parent if journal_dir.name == JOURNAL_DIR else journal_dir


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path, offset: int = 0, max_bytes: int = -1) -> tuple[list[dict[str, Any]], int]:
    """Complete records of ``path`` from byte ``offset`` (reading at most ``max_bytes``,
    -1: to the end); returns (records, offset after the last complete line). A last line
    without its newline is not complete (torn, or being written) and is left for later.

    Raises:
        JournalError: a complete line that is not a JSON object (naming file and offset).
    """
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(max_bytes)
        if max_bytes > 0 and b"\n" not in data:  # one record longer than the chunk
            data += fh.readline()
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    out = []
    pos = 0
    for line in data[: end + 1].splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            raise JournalError(f"{path}: byte {offset + pos}: got {line[:80]!r}, expected a JSON record")
        out.append(rec)
        pos += len(line)
    return out, offset + end + 1


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no newline, or not JSON) off ``path``; returns the bytes cut."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as fh:
        data = fh.read()
    keep = data.rfind(b"\n") + 1  # end of the last complete line
    # the last complete line may itself be torn garbage from an older crash: check it
    while keep:
        start = data.rfind(b"\n", 0, keep - 1) + 1
        try:
            ok = isinstance(json.loads(data[start:keep]), dict)
        except ValueError:
            ok = False
        if ok:
            break
        keep = start
    cut = len(data) - keep
    if cut:
        with open(path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return cut


@dataclass
class RunProgress:
    """What reached the store for one run key."""

    run_id: str | None = None
    seq: int = 0  # highest record number delivered


@dataclass
class State:
    """``delivered.json``: delivery progress, durable across restarts."""

    runs: dict[str, RunProgress] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    tracking_uri: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "tracking_uri": self.tracking_uri, "errors": self.errors,
                "runs": {k: {"run_id": p.run_id, "seq": p.seq} for k, p in self.runs.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        runs = {k: RunProgress(v.get("run_id"), int(v.get("seq", 0))) for k, v in data.get("runs", {}).items()}
        return cls(runs=runs, errors=list(data.get("errors", [])), tracking_uri=data.get("tracking_uri", ""))


def load_state(folder: Path) -> State:
    path = folder / STATE_FILE
    if not path.is_file():
        return State()
    try:
        return State.from_json(json.loads(path.read_text()))
    except (ValueError, AttributeError) as e:
        raise JournalError(f"{path}: got unreadable delivery state ({e}), expected JSON") from None


def save_state(folder: Path, state: State) -> None:
    """Write ``delivered.json`` atomically (temp file, fsync, rename, fsync the folder)."""
    tmp = folder / (STATE_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(state.to_json(), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / STATE_FILE)
    _fsync_dir(folder)


@dataclass
class Pending:
    """What a journal holds that the store does not (yet)."""

    points: int = 0  # metric values not delivered
    records: int = 0  # records of any kind not delivered (points' records included)
    runs: int = 0  # runs with something undelivered
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.records and not self.errors


def undelivered(records: list[dict[str, Any]], state: State) -> Iterator[dict[str, Any]]:
    """The records of ``records`` past their run's delivered watermark."""
    for rec in records:
        if rec.get("op") == "journal":
            continue
        prog = state.runs.get(rec["run"])
        if prog is None or rec["n"] > prog.seq:
            yield rec


def pending(folder: str | Path) -> Pending:
    """Count what the journal in ``folder`` holds beyond ``delivered.json`` (no lock taken:
    call it when no writer is running, e.g. after a sweep has closed its writer)."""
    folder = Path(folder)
    records, _ = read_lines(folder / JOURNAL_FILE)
    state = load_state(folder)
    out = Pending(errors=list(state.errors))
    runs = set()
    for rec in undelivered(records, state):
        out.records += 1
        runs.add(rec["run"])
        if rec["op"] in POINT_OPS:
            out.points += len(rec.get("v", {}))
    out.runs = len(runs)
    return out


class Journal:
    """The append side of a journal folder, locked to this process.

    Args:
        folder: the journal folder (created if missing).
        tracking_uri: written in the header of a new journal.

    Raises:
        JournalError: another process holds the journal, or it is corrupt.
    """

    def __init__(self, folder: str | Path, tracking_uri: str = "") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / JOURNAL_FILE
        self._lock_fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise JournalError(f"{self.folder}: got a journal in use by another process, expected it free "
                               "(is a sweep or a sync still running?)") from None
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.repaired_bytes = 0 if new else repair_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.next_seq = 1
        self.header: dict[str, Any] = {}
        self.records_at_open: list[dict[str, Any]] = []
        self.size = 0  # bytes in the file: this process is its only writer
        if new:
            self.header = {"op": "journal", "version": VERSION, "id": uuid.uuid4().hex,
                           "tracking_uri": tracking_uri, "created": time.time()}
            self._write([self.header])
        else:
            recs, _ = read_lines(self.path)
            if not recs or recs[0].get("op") != "journal":
                raise JournalError(f"{self.path}: got no header line, expected a metalearner tracking journal")
            self.header = recs[0]
            self.records_at_open = recs[1:]
            if self.records_at_open:
                self.next_seq = max(r["n"] for r in self.records_at_open) + 1
            self.size = self.path.stat().st_size

    @property
    def id(self) -> str:
        return str(self.header["id"])

    def _write(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r, separators=(",", ":"), allow_nan=True).encode() + b"\n" for r in records)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
        self.size += len(data)

    def append(self, records: list[dict[str, Any]]) -> tuple[int, int]:
        """Number ``records`` (in place), append them, fsync. Not thread-safe: the writer
        calls it under its own lock.

        Returns:
            (start, end): the bytes of the file the records now occupy.
        """
        start = self.size
        if records:
            for rec in records:
                rec["n"] = self.next_seq
                self.next_seq += 1
            self._write(records)
        return start, self.size

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            try:
                os.close(fd)  # closing the lock file releases the flock
            except OSError:
                pass
        self._fd = self._lock_fd = -1
