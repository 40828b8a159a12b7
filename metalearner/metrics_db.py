"""The bulk metrics path: trace points written straight into the tracking server's PostgreSQL.

A team's ``mlflow server`` turns each point of a ``log_batch`` into an ORM object and
inserts it through SQLAlchemy: about 3,000 points/s per server core (measured:
benchmarks/bench_tracking_load.py). A sweep of a thousand trials makes far more. With
``--metrics-db postgresql://USER@HOST:PORT/DB`` (the server's own backend database), the
writer still creates runs and sends params, tags and status through the server, but sends
each batch of trace points as two SQL statements on its own connection: one multi-row
``INSERT`` into MLflow's ``metrics`` table (``ON CONFLICT DO NOTHING``: a point redelivered
after a crash is not stored twice, as MLflow's own ``log_batch`` skips it), and one upsert of
``latest_metrics`` with MLflow's rule (the newest by step, then timestamp, then value).

The rows are exactly those MLflow's SQLAlchemy store writes (NaN stored as 0 with
``is_nan``, ±inf as ±max float), so the UI, the REST API and ``metalearner compare`` read
them as usual. The price is a tie to MLflow's table layout. Before the sweep starts, `MetricsDb.check_schema`
refuses a schema it was not tested against: the alembic revision of MLflow's migrations
(`TESTED_REVISIONS`), the columns it writes (and that no other column of those tables needs
a value), and the primary keys its ``ON CONFLICT`` clauses rely on (`PRIMARY_KEYS`: without
``metrics``' key a redelivered point would be stored twice). Every run it writes to must be
an active run of that database (else the path is wrong: an error, never a silent write
elsewhere). The rest of the project reaches this module only through the tracking layer
(`metalearner.tracking.access.check_metrics_db`, the writer's bulk route).

Needs ``psycopg2`` (``pip install 'metalearner[server]'``).
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

# the columns written, per table; any other column must be nullable or have a default
METRICS_COLUMNS = ("key", "value", "timestamp", "step", "is_nan", "run_uuid")
TABLES = {"metrics": METRICS_COLUMNS, "latest_metrics": METRICS_COLUMNS, "runs": ("run_uuid", "lifecycle_stage")}
# the alembic revisions of MLflow's schema this path was tested against (tests/test_cluster.py:
# the same rows as MLflow's own store writes), and the MLflow release whose head each is
TESTED_REVISIONS = {"dc11669786a5": "MLflow 3.17"}
# the primary keys the ON CONFLICT clauses rely on (column order does not matter)
PRIMARY_KEYS = {"metrics": ("key", "timestamp", "step", "run_uuid", "value", "is_nan"),
                "latest_metrics": ("key", "run_uuid")}
MAX_FLOAT = 1.7976931348623157e308  # MLflow's stand-in for ±inf
APPLICATION_NAME = "metalearner-metrics"  # how the writer's connections show in pg_stat_activity

# each batch: COPY into a session-private staging table (no parsing of a huge INSERT), then one
# INSERT ... SELECT that skips rows already stored (a redelivery), as MLflow's log_batch does
_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS metalearner_points (LIKE metrics INCLUDING DEFAULTS) "
          "ON COMMIT DELETE ROWS")
_COPY = "COPY metalearner_points (key, value, timestamp, step, is_nan, run_uuid) FROM STDIN"
_INSERT = ("INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) "
           "SELECT key, value, timestamp, step, is_nan, run_uuid FROM metalearner_points ON CONFLICT DO NOTHING")
# the newest point of each key of the batch (picked here, MLflow's rule: the largest (step,
# timestamp, value)) replaces latest_metrics' row if it is newer than that row
_LATEST = """
INSERT INTO latest_metrics AS l (key, value, timestamp, step, is_nan, run_uuid) VALUES %s
ON CONFLICT (key, run_uuid) DO UPDATE
   SET value = EXCLUDED.value, timestamp = EXCLUDED.timestamp, step = EXCLUDED.step, is_nan = EXCLUDED.is_nan
 WHERE (EXCLUDED.step, EXCLUDED.timestamp, EXCLUDED.value) > (l.step, l.timestamp, l.value)
"""
# each primary key of the tables, its columns in key order (from the catalog: pg_index)
_KEYS = """
SELECT c.relname, a.attname FROM pg_index i
  JOIN pg_class c ON c.oid = i.indrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
  CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
 WHERE i.indisprimary AND c.relname = ANY(%s)
 ORDER BY c.relname, k.ord
"""
_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class MetricsDbError(RuntimeError):
    """The metrics database is unusable for this path (schema, address, run)."""


def _psycopg2() -> Any:
    try:
        import psycopg2
        import psycopg2.extras
    except ImportError:
        raise MetricsDbError("--metrics-db needs psycopg2: pip install 'metalearner[server]'") from None
    return psycopg2


def check_uri(uri: str) -> str:
    """The URI as libpq takes it; ``postgresql+psycopg2://`` (SQLAlchemy's spelling, as
    given to ``mlflow server --backend-store-uri``) is accepted too."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise MetricsDbError(f"--metrics-db: got {redact(uri)!r}, expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, "
                             "the tracking server's backend store")
    return uri.replace(parts.scheme + "://", "postgresql://", 1)


def redact(uri: str) -> str:
    """``uri`` without its password (for messages)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return uri.replace(f":{parts.password}@", ":***@", 1)


def sanitize(value: float) -> tuple[float, bool]:
    """(stored value, is_nan) as MLflow's SQLAlchemy store writes them."""
    if math.isnan(value):
        return 0.0, True
    if math.isinf(value):
        return (MAX_FLOAT if value > 0 else -MAX_FLOAT), False
    return float(value), False


class MetricsDb:
    """Writes trace points into MLflow's tables; one connection per delivery thread.

    Args:
        uri: the tracking server's backend database, ``postgresql://USER@HOST:PORT/DB``.
        connect_timeout: seconds to wait for a connection.
    """

    def __init__(self, uri: str, connect_timeout: float = 10.0) -> None:
        self.uri = check_uri(uri)
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._active: set[str] = set()  # run ids checked to be active runs of this database

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            psycopg2 = _psycopg2()
            try:
                conn = psycopg2.connect(self.uri, connect_timeout=max(1, int(self.connect_timeout)),
                                        application_name=APPLICATION_NAME)
            except psycopg2.OperationalError as e:
                raise ConnectionError(f"metrics database {redact(self.uri)}: {str(e).strip().splitlines()[0]}") from e
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def check_schema(self) -> None:
        """Refuse a database that is not an MLflow backend store of the layout this path
        writes: a table or column missing, another column that would need a value, an
        alembic revision it was not tested against, a primary key that differs.

        Raises:
            MetricsDbError: naming the table and what was found against what was expected.
        """
        conn = self._conn()
        with conn.cursor() as cur:
            cur.execute("SELECT table_name, column_name, is_nullable, column_default FROM information_schema.columns "
                        "WHERE table_schema = current_schema() AND table_name = ANY(%s)",
                        ([*TABLES, "alembic_version"],))
            rows = cur.fetchall()
            revisions = None
            if any(table == "alembic_version" for table, *_ in rows):
                cur.execute("SELECT version_num FROM alembic_version")
                revisions = sorted(r[0] for r in cur.fetchall())
            cur.execute(_KEYS, (list(PRIMARY_KEYS),))
            keys: dict[str, list[str]] = {}
            for table, column in cur.fetchall():
                keys.setdefault(table, []).append(column)
        conn.rollback()
        self._check_columns(rows)
        self._check_revision(revisions)
        self._check_keys(keys)

    def _check_columns(self, rows: list[tuple[str, str, str, Any]]) -> None:
        have: dict[str, dict[str, tuple[str, Any]]] = {}
        for table, column, nullable, default in rows:
            have.setdefault(table, {})[column] = (nullable, default)
        where = redact(self.uri)
        for table, columns in TABLES.items():
            if table not in have:
                raise MetricsDbError(f"--metrics-db: {where} has no table {table!r}, expected the tracking server's "
                                     "MLflow backend store (its --backend-store-uri)")
            missing = [c for c in columns if c not in have[table]]
            if missing:
                raise MetricsDbError(f"--metrics-db: table {table!r} of {where} has no column {missing[0]!r}: an MLflow "
                                     "schema this version of metalearner does not know; leave --metrics-db out")
            extra = [c for c, (nullable, default) in have[table].items()
                     if c not in columns and nullable == "NO" and default is None and table != "runs"]
            if extra:
                raise MetricsDbError(f"--metrics-db: table {table!r} of {where} needs a value for column {extra[0]!r}: "
                                     "an MLflow schema this version of metalearner does not know; leave --metrics-db out")

    def _check_revision(self, revisions: list[str] | None) -> None:
        where = redact(self.uri)
        tested = ", ".join(f"{rev} ({release})" for rev, release in TESTED_REVISIONS.items())
        if revisions is None:
            raise MetricsDbError(f"--metrics-db: {where} has no table 'alembic_version', expected an MLflow backend "
                                 f"store at a schema revision this bulk path was tested against: {tested}")
        if len(revisions) != 1 or revisions[0] not in TESTED_REVISIONS:
            found = ", ".join(revisions) or "none"
            raise MetricsDbError(f"--metrics-db: the MLflow schema of {where} is at alembic revision {found}, expected "
                                 f"one this bulk path was tested against: {tested}; leave --metrics-db out (the "
                                 "server takes every point)")

    def _check_keys(self, keys: dict[str, list[str]]) -> None:
        where = redact(self.uri)
        for table, expected in PRIMARY_KEYS.items():
            found = keys.get(table, [])
            if sorted(found) != sorted(expected):
                raise MetricsDbError(f"--metrics-db: table {table!r} of {where} has primary key "
                                     f"({', '.join(found) or 'none'}), expected ({', '.join(expected)}), which its "
                                     "ON CONFLICT relies on; leave --metrics-db out")

    def _check_run(self, cur: Any, run_id: str) -> None:
        if run_id in self._active:
            return
        cur.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = %s", (run_id,))
        row = cur.fetchone()
        if row is None:
            raise MetricsDbError(f"--metrics-db: run {run_id} is not in {redact(self.uri)}: that database is not the "
                                 "tracking server's backend store")
        if row[0] != "active":
            raise MetricsDbError(f"run {run_id} is {row[0]}: points are not written to a deleted run")
        self._active.add(run_id)

    def log_points(self, run_id: str, points: Sequence[tuple[str, float, int, int]]) -> int:
        """Store ``points`` = (key, value, timestamp ms, step) of run ``run_id`` in one
        transaction; returns how many rows were new (a redelivered point is skipped)."""
        if not points:
            return 0
        lines = []
        newest: dict[str, tuple[Any, ...]] = {}
        for key, value, ts, step in points:
            stored, is_nan = sanitize(value)
            row = (key, stored, int(ts), int(step), is_nan, run_id)
            lines.append(f"{key.translate(_ESCAPE)}\t{stored!r}\t{row[2]}\t{row[3]}\t{'t' if is_nan else 'f'}\t{run_id}\n")
            best = newest.get(key)
            if best is None or (row[3], row[2], row[1]) > (best[3], best[2], best[1]):
                newest[key] = row
        psycopg2 = _psycopg2()
        conn = self._conn()
        try:
            with conn.cursor() as cur:
                self._check_run(cur, run_id)
                if not getattr(self._local, "staged", False):
                    cur.execute(_STAGE)
                    self._local.staged = True
                cur.copy_expert(_COPY, io.StringIO("".join(lines)))
                cur.execute(_INSERT)
                new = cur.rowcount
                psycopg2.extras.execute_values(cur, _LATEST, list(newest.values()))
            conn.commit()
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:  # the server went away, a deadlock
            self._drop(conn)
            raise ConnectionError(f"metrics database {redact(self.uri)}: {str(e).strip().splitlines()[0]}") from e
        except psycopg2.Error as e:  # the database refused the rows: retrying cannot help
            self._drop(conn)
            raise MetricsDbError(f"metrics database {redact(self.uri)} refused points of run {run_id}: "
                                 f"{str(e).strip().splitlines()[0]}") from e
        except BaseException:
            self._drop(conn)
            raise
        return new

    def _drop(self, conn: Any) -> None:
        """Forget this thread's connection after a failure (the next call reconnects)."""
        self._local.conn = None
        self._local.staged = False
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

