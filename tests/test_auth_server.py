"""A tracking server that refuses is not an outage (issue 16): a real ``mlflow server
--app-name basic-auth`` on 127.0.0.1 (SQLite stores in a tmp folder, its own process group,
started once for this module by scripts/tracking_server.py and ended by process group).

No credentials, wrong credentials, or a user without permission on the experiment: ``train``
and ``sweep`` exit 2 with one line naming the server and what to set, before any training
and before Ray (before this issue, ``train`` trained, waited out the outage window and
exited 1 after 307 s). With the right credentials ``train`` works, and the password is in
no output, param, tag or file.
"""

import secrets
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import requests

from tests.conftest import run_cli
from tests.test_cluster import require_service, service_mark, tracking_server_module


def auth_missing() -> str | None:
    try:
        import flask_wtf  # noqa: F401 - what mlflow[auth] adds
    except ImportError:
        return "MLflow's basic-auth app (pip install 'metalearner[server]', which has mlflow[auth])"
    return None


pytestmark = service_mark(auth_missing())

EXPERIMENT = "auth-shared"
TRAIN = ("train", "--task", "recall", "--controller", "static", "--steps", "6", "--set", "model.preset=tiny",
         "--set", "task.n_pairs=4", "--set", "task.distance=16",
         "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "train.eval_every=3",
         "--set", "train.eval_batches=1")
SPEC = f"""\
name: {EXPERIMENT}
task: {{name: recall, n_pairs: 4, distance: 16}}
model: {{preset: tiny, window: 8}}
train: {{steps: 6, batch_size: 4, seq_len: 32, report_every: 3, eval_every: 3, eval_batches: 1}}
seeds: [0]
arms:
  - {{name: static, controller: {{name: static}}}}
"""
NO_CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": "", "MLFLOW_TRACKING_TOKEN": ""}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The basic-auth server, default permission NO_PERMISSIONS; the admin makes the
    experiment and three users: ``writer`` (EDIT on it), ``reader`` (READ), ``stranger``
    (nothing). Passwords are random, so a leak is found by searching for them."""
    require_service(auth_missing())
    ts = tracking_server_module()
    folder = tmp_path_factory.mktemp("auth-server")
    admin = secrets.token_urlsafe(18)
    env = {"MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
           "MLFLOW_AUTH_CONFIG_PATH": str(ts.auth_config(folder, default_permission="NO_PERMISSIONS")),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: a light server
    port = ts.free_port()
    proc = ts.start_mlflow(folder, port, app_name="basic-auth", env=env, timeout=300)
    try:
        uri = f"http://127.0.0.1:{port}"

        def as_admin(path: str, body: dict) -> dict:
            r = requests.post(f"{uri}{path}", json=body, auth=("admin", admin), timeout=60)
            assert r.status_code == 200, (path, r.status_code, r.text)
            return r.json()

        users = {name: secrets.token_urlsafe(18) for name in ("writer", "reader", "stranger")}
        for name, password in users.items():
            as_admin("/api/2.0/mlflow/users/create", {"username": name, "password": password})
        experiment_id = as_admin("/api/2.0/mlflow/experiments/create", {"name": EXPERIMENT})["experiment_id"]
        for name, permission in (("writer", "EDIT"), ("reader", "READ")):
            as_admin("/api/3.0/mlflow/users/permissions/grant", {"username": name, "resource_type": "experiment",
                                                                 "resource_id": experiment_id,
                                                                 "permission": permission})
        yield SimpleNamespace(uri=uri, admin=admin, users=users, experiment_id=experiment_id)
    finally:
        ts.stop(proc)


def credentials(server, user: str | None, password: str | None = None) -> dict[str, str]:
    if user is None:
        return NO_CREDENTIALS
    return {**NO_CREDENTIALS, "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password or server.users[user]}


def admin_client(server, monkeypatch):
    """MLflow's client as the admin (this test's environment only)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin)
    return mlflow.MlflowClient(tracking_uri=server.uri)


def assert_refused(r, server, seconds, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert r.stdout == "", r.stdout[-2000:]
    line = r.stderr.strip()
    assert "\n" not in line, line  # one line, no traceback, no tracking-incomplete report
    assert server.uri in line and "MLFLOW_TRACKING_USERNAME" in line and "MLFLOW_TRACKING_PASSWORD" in line \
        and "MLFLOW_TRACKING_TOKEN" in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert seconds < 120, seconds  # found before training, not after the 300 s outage window


CASES = {  # who: (user, password, what the line says)
    "no credentials": (None, None, ("401", "none are set")),
    "wrong password": ("writer", "not-the-password-1234", ("401", "refused the credentials")),
    "read-only user": ("reader", None, ("403", f"write to experiment '{EXPERIMENT}'", "EDIT")),
    "user without permission": ("stranger", None, ("403", f"read experiment '{EXPERIMENT}'")),
}


@pytest.mark.parametrize("who", list(CASES))
def test_train_that_the_server_refuses_exits_2_before_training(tmp_path, server, who, monkeypatch):
    user, password, fragments = CASES[who]
    name = f"refused-{who.replace(' ', '-')}"
    start = time.monotonic()
    r = run_cli(*TRAIN, "--tracking-uri", server.uri, "--experiment", EXPERIMENT, "--run-name", name,
                "--trace-csv", tmp_path / "trace.csv", "--checkpoint-dir", tmp_path / "ckpt", cwd=tmp_path,
                env=credentials(server, user, password), timeout=300)
    assert_refused(r, server, time.monotonic() - start, *fragments)
    assert not (tmp_path / "trace.csv").exists() and not (tmp_path / "ckpt").exists()  # nothing trained
    client = admin_client(server, monkeypatch)
    assert client.search_runs([server.experiment_id], f"attributes.run_name = '{name}'") == []


@pytest.mark.parametrize("who", ["no credentials", "user without permission"])
def test_sweep_that_the_server_refuses_exits_2_before_ray(tmp_path, server, who):
    user, password, fragments = CASES[who]
    (tmp_path / "spec.yaml").write_text(SPEC)
    start = time.monotonic()
    r = run_cli("sweep", "spec.yaml", "--num-cpus", "2", "--tracking-uri", server.uri, "--storage", tmp_path / "ray",
                cwd=tmp_path, env=credentials(server, user, password), timeout=300)
    assert_refused(r, server, time.monotonic() - start, *fragments)
    assert not (tmp_path / "ray").exists()  # Ray never started: no sweep folder, no journal


def test_train_with_credentials_works_and_the_password_is_nowhere(tmp_path, server, monkeypatch):
    password = server.users["writer"]
    r = run_cli(*TRAIN, "--tracking-uri", server.uri, "--experiment", EXPERIMENT, "--run-name", "with-credentials",
                "--trace-csv", tmp_path / "trace.csv", "--checkpoint-dir", tmp_path / "ckpt", cwd=tmp_path,
                env=credentials(server, "writer"), timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    client = admin_client(server, monkeypatch)
    [run] = client.search_runs([server.experiment_id], "attributes.run_name = 'with-credentials'")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 7))
    for secret in (password, server.admin):
        assert secret not in r.stdout and secret not in r.stderr
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in k or secret in v]
        written = [f for f in Path(tmp_path).rglob("*") if f.is_file()]
        assert any(f.name == "trace.csv" for f in written) and any(f.parent.parent.name == "ckpt" for f in written), \
            written  # the trace and the journal beside the checkpoints are among the files searched
        assert [f for f in written if secret.encode() in f.read_bytes()] == []
