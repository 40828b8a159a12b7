"""Start a local MLflow tracking server over PostgreSQL, for trying out the team set-up.

    python scripts/tracking_server.py --dir /tmp/mlflow-team [--port 5000] [--pg-port 5433]

It makes a PostgreSQL cluster in ``DIR/pgdata`` (``initdb``; as root the server runs as
the ``postgres`` user, which PostgreSQL requires), starts ``postgres`` on 127.0.0.1, makes
the ``mlflow`` database, then ``mlflow server`` with that backend and ``DIR/artifacts`` as
its artifact store (served through the server: ``--artifacts-destination``). It prints the
tracking URI and runs until Ctrl-C, then ends both servers by their process groups. With
``--auth`` the server is MLflow's basic-auth app (users and permissions; see the README's
team-server section). The real thing is PostgreSQL as your team runs it plus MLflow's own
CLI (see the README).

Needs PostgreSQL's server programs (Debian: ``apt-get install postgresql``; found on PATH or
in ``/usr/lib/postgresql/*/bin``) and ``pip install 'metalearner[server]'`` (psycopg2).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PG_USER = "postgres"


def pg_program(name: str) -> str:
    """The path of a PostgreSQL server program (``initdb``, ``postgres``)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise FileNotFoundError(f"{name}: not found on PATH or in /usr/lib/postgresql/*/bin, expected PostgreSQL's "
                                "server programs (Debian: apt-get install postgresql)")
    return found


def _as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the postgres user then."""
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what}: nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def start_postgres(folder: Path, port: int, timeout: float = 60) -> subprocess.Popen:
    """``initdb`` + ``postgres`` on 127.0.0.1:``port`` in ``folder``, and the ``mlflow``
    database. Returns the server process (its own process group; end it with `stop`)."""
    data, sockets = folder / "pgdata", folder / "pgsock"
    for d in (folder, sockets):
        d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, PG_USER)
        shutil.chown(sockets, PG_USER)
    if not (data / "PG_VERSION").exists():
        made = subprocess.run(_as_pg_user([pg_program("initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust",
                                           "-E", "UTF8"]), capture_output=True, text=True)
        if made.returncode != 0:  # e.g. a parent folder the postgres user cannot enter
            raise RuntimeError(f"initdb -D {data}: exit code {made.returncode}, expected 0: "
                               f"{(made.stderr or made.stdout).strip().splitlines()[-1:]}")
    log = open(folder / "postgres.log", "a")
    proc = subprocess.Popen(_as_pg_user([pg_program("postgres"), "-D", str(data), "-p", str(port),
                                         "-h", "127.0.0.1", "-k", str(sockets)]),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(port, proc, "postgres", timeout)
    except BaseException:
        stop(proc)
        raise
    import psycopg2

    deadline = time.time() + timeout
    while True:
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres")
            break
        except psycopg2.OperationalError:  # listening, still starting up
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = 'mlflow'")
        if cur.fetchone() is None:
            cur.execute("CREATE DATABASE mlflow")
    conn.close()
    return proc


def auth_config(folder: Path, default_permission: str = "READ") -> Path:
    """An ini file for ``mlflow server --app-name basic-auth`` (``MLFLOW_AUTH_CONFIG_PATH``):
    users and permissions in ``folder/basic_auth.db`` (SQLite), ``default_permission`` for
    what a user has not been granted (READ, EDIT, MANAGE or NO_PERMISSIONS). The admin's
    password is not in it: the server takes it from ``MLFLOW_AUTH_ADMIN_PASSWORD`` the first
    time it starts."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "basic_auth.ini"
    path.write_text(f"[mlflow]\ndefault_permission = {default_permission}\n"
                    f"database_uri = sqlite:///{folder / 'basic_auth.db'}\nadmin_username = admin\n")
    return path


def start_mlflow(folder: Path, port: int, pg_port: int | None = None, workers: int = 1, timeout: float = 120,
                 app_name: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` over the PostgreSQL of `start_postgres`
    (``pg_port``; without it, SQLite in ``folder/mlflow.db``), artifacts in
    ``folder/artifacts``. Returns once it answers ``/health``; the process has its own
    process group.

    Args:
        app_name: ``basic-auth`` for MLflow's authentication (then ``env`` must hold
            ``MLFLOW_FLASK_SERVER_SECRET_KEY``, ``MLFLOW_AUTH_CONFIG_PATH`` (`auth_config`)
            and, on the first start, ``MLFLOW_AUTH_ADMIN_PASSWORD``).
        env: variables for the server's process, on top of this one's environment.
    """
    folder.mkdir(parents=True, exist_ok=True)
    backend = (f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{pg_port}/mlflow" if pg_port is not None
               else f"sqlite:///{folder / 'mlflow.db'}")
    log = open(folder / "mlflow.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), *(["--app-name", app_name] if app_name else []),
         # uvicorn restarts a worker that misses a 5 s health check: on a busy host a worker
         # still importing MLflow misses it, forever
         *(["--uvicorn-opts", "--timeout-worker-healthcheck 120"] if workers > 1 else [])],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    try:
        _wait_port(port, proc, "mlflow server", timeout)
        _wait_health(port, proc, timeout)
    except BaseException:
        stop(proc)  # never leave a half-started server behind
        raise
    return proc


def _wait_health(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Until the server's (unauthenticated) ``/health`` answers 200: listening is not ready."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before answering /health")
        if time.time() > deadline:
            raise TimeoutError(f"mlflow server on 127.0.0.1:{port}: /health not 200 after {timeout:.0f} s")
        time.sleep(0.5)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 outside Ray's worker-port range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """End a server started here, with its children, by its process group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="folder for the database and the artifacts")
    ap.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default 5000)")
    ap.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL's port (default 5433)")
    ap.add_argument("--workers", type=int, default=2, help="MLflow server workers (default 2)")
    ap.add_argument("--auth", action="store_true",
                    help="MLflow's basic-auth app (needs mlflow[auth], $MLFLOW_FLASK_SERVER_SECRET_KEY and, on the "
                         "first start, $MLFLOW_AUTH_ADMIN_PASSWORD; users in DIR/basic_auth.db)")
    args = ap.parse_args()
    folder = Path(args.dir).resolve()
    auth: dict[str, str] = {}
    if args.auth:
        needed = ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
        if not (folder / "basic_auth.db").exists():  # the admin's password: on the first start only
            needed.append("MLFLOW_AUTH_ADMIN_PASSWORD")
        missing = [v for v in needed if not os.environ.get(v)]
        if missing:
            ap.error(f"--auth: set {' and '.join(missing)}")
        auth = {"MLFLOW_AUTH_CONFIG_PATH": str(auth_config(folder))}
    pg = start_postgres(folder, args.pg_port)
    try:
        server = start_mlflow(folder, args.port, args.pg_port, workers=args.workers,
                              app_name="basic-auth" if args.auth else None, env=auth)
        try:
            print(f"MLflow tracking server: http://127.0.0.1:{args.port}  (PostgreSQL on 127.0.0.1:{args.pg_port}, "
                  f"artifacts in {folder / 'artifacts'}); Ctrl-C ends both", flush=True)
            print(f"  metalearner sweep SPEC --tracking-uri http://127.0.0.1:{args.port}", flush=True)
            while server.poll() is None and pg.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            stop(server)
    finally:
        stop(pg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
