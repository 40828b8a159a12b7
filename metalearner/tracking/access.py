"""Pre-flight checks of the stores a run writes to, before any training or Ray start.

The CLI asks two questions here, and only here (the tracking layer is the one that talks
to MLflow and to MLflow's database):

- `check_server_access`: will a tracking server (``http(s)://``) take our writes? A server
  that refuses the credentials (HTTP 401) or the write (HTTP 403) is not an outage that the
  journal could wait out: the answer is the same in five minutes. It is asked with MLflow's
  own client, which sends ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (basic
  auth) or ``MLFLOW_TRACKING_TOKEN`` (bearer) as every later request does. A server that
  cannot be reached at all is left to the writer, which rides out outages.
- `check_metrics_db`: is ``--metrics-db`` a PostgreSQL backend store whose schema the bulk
  path (`metalearner.metrics_db`) was tested against?

Both raise `TrackingAccessError` with one line for the user; no message carries a
credential (URIs are shown without their user-info).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
WHAT_TO_SET = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) or MLFLOW_TRACKING_TOKEN "
               "(bearer token)")
# a tag this project never sets: deleting it is a write that changes nothing, and needs the
# permission that creating a run needs (EDIT on the experiment, on MLflow's basic-auth server)
PROBE_TAG = "metalearner.access-probe"
UNAUTHENTICATED, FORBIDDEN, NOT_FOUND = 401, 403, 404


class TrackingAccessError(RuntimeError):
    """A store refuses this run's writes, or is one the run cannot write to; the message is one line."""


def server_name(uri: str) -> str:
    """``uri`` as shown to the user: scheme, host, port and path, never user-info."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


def _status(e: BaseException) -> int | None:
    """The HTTP status of an MLflow client error, if it has one."""
    code = getattr(e, "get_http_status_code", None)
    try:
        return int(code()) if code is not None else None
    except Exception:  # noqa: BLE001 - an odd exception: no status
        return None


def _refused(uri: str, experiment: str, status: int, asked: str) -> TrackingAccessError:
    server = server_name(uri)
    given = [v for v in CREDENTIAL_VARS if os.environ.get(v)]
    if status == UNAUTHENTICATED:
        why = "refused the credentials given" if given else "needs credentials and none are set"
        return TrackingAccessError(f"--tracking-uri: the tracking server {server} {why} (HTTP 401); {WHAT_TO_SET}")
    who = "the user of MLFLOW_TRACKING_USERNAME" if given else "an anonymous user"
    return TrackingAccessError(f"--tracking-uri: the tracking server {server} denies {who} the permission to "
                               f"{asked} experiment {experiment!r} (HTTP 403); ask its admin for EDIT permission "
                               f"on it, or {WHAT_TO_SET} of a user who has it")


def check_server_access(tracking_uri: str, experiment: str) -> bool:
    """Ask a tracking server whether this run may write to ``experiment``, before training.

    An authenticated read (the experiment by name), then a write: creating the experiment
    when it does not exist yet (the run needs it anyway), else deleting `PROBE_TAG` from it
    (a write that changes nothing, with the permission a new run needs).

    Args:
        tracking_uri: the tracking URI; only ``http://`` and ``https://`` ones are asked.
        experiment: the MLflow experiment the run will write to.

    Returns:
        True when the server took the read and the write; False when it was not asked (not
        a server) or could not answer (unreachable, 5xx: an outage the writer rides out).

    Raises:
        TrackingAccessError: the server answered 401 (no or wrong credentials) or 403 (no
            permission).
    """
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return False
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    asked = "read"
    try:
        found: Any = client.get_experiment_by_name(experiment)
        if found is None:
            asked = "create"
            client.create_experiment(experiment)
            return True
        asked = "write to"
        try:
            client.delete_experiment_tag(found.experiment_id, PROBE_TAG)
        except Exception as e:
            if _status(e) != NOT_FOUND:  # "no such tag": the write was allowed
                raise
        return True
    except Exception as e:
        status = _status(e)
        if status in (UNAUTHENTICATED, FORBIDDEN):
            raise _refused(tracking_uri, experiment, status, asked) from None
        return False  # unreachable, a server error, a race on the create: the writer decides


def check_metrics_db(uri: str, connect_timeout: float = 5.0) -> None:
    """``--metrics-db``: a reachable PostgreSQL backend store whose schema the bulk path
    knows (`metalearner.metrics_db.MetricsDb.check_schema`: tables, columns, alembic
    revision, the primary keys its ``ON CONFLICT`` relies on).

    Args:
        uri: ``postgresql://USER@HOST:PORT/DB``.
        connect_timeout: seconds to wait for a connection.

    Raises:
        TrackingAccessError: the database is unreachable or not one the bulk path may write to.
    """
    from metalearner.metrics_db import MetricsDb, MetricsDbError, redact

    try:
        db = MetricsDb(uri, connect_timeout=connect_timeout)
        try:
            db.check_schema()
        finally:
            db.close()
    except MetricsDbError as e:
        raise TrackingAccessError(str(e)) from None
    except ConnectionError as e:
        raise TrackingAccessError(f"--metrics-db: got {redact(uri)!r}, expected a reachable database; {e}") from None
