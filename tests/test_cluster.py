"""Cluster scale (issue 9): each test starts its real services on 127.0.0.1 itself (a
2-node Ray cluster, a local S3 server, an MLflow server on PostgreSQL) and ends them by
their process group at the end; nothing here runs `ray stop` or kills by name."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import free_port, run_cli

ROOT = Path(__file__).resolve().parent.parent


def audit(uri, parent_id):
    """Every child of the sweep: FINISHED (or KILLED by a scheduler), ``loss`` at steps
    1..N exactly once, every trace key at the same steps. Returns the children."""
    from metalearner.trace import STEP_KEYS

    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED", parent.info.status
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=1000)
    assert runs
    for r in runs:
        assert r.info.status in ("FINISHED", "KILLED"), (r.info.run_name, r.info.status)
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss"))
        assert steps == list(range(1, len(steps) + 1)), r.info.run_name
        if r.info.status == "FINISHED":
            assert len(steps) == int(r.data.params["train.steps"]), r.info.run_name
        for key in STEP_KEYS:
            if key == "loss_ewma" and r.data.params["controller.name"] in ("static", "schedule"):
                continue
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == steps, key
    return runs


def end_group(proc, timeout=30):
    """End a process this test started, and its children, by its process group."""
    tracking_server_module().stop(proc, timeout)


# ---------------------------------------------------------------- test 4: data paths


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the espeak-ng Debian package")
def test_speech_spec_with_a_relative_data_dir_from_another_working_folder(tmp_path):
    """experiments/speech_ewma.yaml as its header says (data at the relative data/digits),
    run from a working folder that is not the repository: every trial must find the data
    although Ray moves each trial into its own folder."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    made = run_cli("data", "speech-digits", "--out", "data/digits", "--n", "40", cwd=work)
    assert made.returncode == 0, made.stderr[-2000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    swept = run_cli("sweep", ROOT / "experiments/speech_ewma.yaml", "--smoke-test", "--num-cpus", "2",
                    "--tracking-uri", uri, "--storage", "ray", cwd=work)
    assert swept.returncode == 0, (swept.stdout[-3000:], swept.stderr[-3000:])
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.search_runs([client.get_experiment_by_name("speech_ewma").experiment_id],
                                "tags.`metalearner.kind` = 'sweep'")[0]
    runs = audit(uri, parent.info.run_id)
    assert len(runs) == 3  # static + 1 search trial + the best re-trained on seed 0
    for r in runs:
        assert r.data.params["task.data_dir"] == str(work / "data/digits")


# ---------------------------------------------------------------- test 3: s3:// storage


def test_sweep_on_s3_storage_checkpoints_there_and_restores_from_there(tmp_path, s3_server):
    import ray
    from ray import tune
    from test_sweep import KillWorkerOnce

    from metalearner.experiment import parse_experiment
    from metalearner.tracking import MlflowWriter
    from trainables.storage import publish
    from trainables.sweep import SweepRunner
    from trainables.tuning import make_tuner

    # pyarrow 25 rejects moto's answer to CompleteMultipartUpload (multipart uploads, files
    # over 5 MB); allow_delayed_open makes pyarrow PUT small files in one request, and the
    # tiny model's checkpoints are small. Real S3 needs no option.
    storage = "s3://sweeps/ray?allow_delayed_open=true"
    base = {"task": {"name": "recall", "n_pairs": 4, "distance": 16}, "model": {"preset": "tiny", "window": 8},
            "train": {"steps": 40, "batch_size": 8, "seq_len": 32, "report_every": 5, "checkpoint_every": 10,
                      "eval_every": 10, "eval_batches": 1, "seed": 3},
            "controller": {"name": "ewma", "factor": 1.2, "beta": 0.5, "threshold": 0.0}}
    spec = parse_experiment({"name": "s3-test", **base, "seeds": [3]})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runner = SweepRunner(spec, uri, storage=storage, progress=False)
    assert runner.storage == storage  # not made into a local path
    writer = MlflowWriter(uri)
    parent = writer.create_run("s3-test", "parent", {"metalearner.kind": "sweep"})
    # the crashed trial's worker is killed (SIGKILL, from outside) after it reported step 25,
    # once its step-20 checkpoint went to S3; Tune restarts it from its last checkpoint
    # (a remote storage_path: Ray keeps no local copy)
    cb = KillWorkerOnce(writer, "s3-test", parent, arm="crashed", at=25)
    cells = [{**base, "meta": {"arm": "clean", "phase": "compare"}},
             {**base, "meta": {"arm": "crashed", "phase": "compare"}}]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
            grid = make_tuner(runner.spec, runner.storage, runner.trainable(),
                          {"cell": tune.grid_search(cells)}, "restore", cb).fit()
    finally:
        ray.shutdown()
        writer.terminate(parent)
        writer.close()
    assert not grid.errors and cb.killed
    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket="sweeps", Prefix="ray/restore/")["Contents"]]
    crashed = sorted({k.split("/")[3] for k in keys if "/checkpoint_" in k and "crashed" in k})
    assert crashed, keys[:20]  # its checkpoints are in the bucket (num_to_keep=2 of them)
    assert any("experiment_state-" in k for k in keys)  # Tune's own state went there too
    results = {r.config["cell"]["meta"]["arm"]: r for r in grid}
    for r in results.values():
        assert r.checkpoint is not None and r.checkpoint.path.startswith("sweeps/ray/restore/"), r.checkpoint
    # restored from a checkpoint in the bucket, not restarted from step 0
    assert results["clean"].metrics["iterations_since_restore"] == 8
    assert results["crashed"].metrics["iterations_since_restore"] < 8
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("s3-test").experiment_id],
                              f"tags.mlflow.parentRunId = '{writer.run_id(parent)}'")  # a journal key until delivered
    by_arm = {r.data.tags["metalearner.arm"]: r.info.run_id for r in runs}
    for name in ("loss", "window", "val_loss"):
        clean = [(m.step, m.value) for m in sorted(client.get_metric_history(by_arm["clean"], name),
                                                   key=lambda m: m.step)]
        restored = [(m.step, m.value) for m in sorted(client.get_metric_history(by_arm["crashed"], name),
                                                      key=lambda m: m.step)]
        assert restored == clean, name  # restored from S3: the same trace, each step once
    # the sweep's own files follow the storage
    folder = tmp_path / "s3-test-stamp"
    folder.mkdir()
    (folder / "experiment.yaml").write_text("name: s3-test\n")
    assert publish(folder, storage, folder.name) == "s3://sweeps/ray/s3-test-stamp"
    body = s3_server.get_object(Bucket="sweeps", Key="ray/s3-test-stamp/experiment.yaml")["Body"].read()
    assert body == b"name: s3-test\n"


# ---------------------------------------------------------------- test 1: a 2-node Ray cluster

TWO_NODE_SPEC = """\
name: two_nodes
task: {name: recall, n_pairs: 4, distance: 16}
model: {preset: tiny, window: 8}
train: {steps: 20, batch_size: 8, seq_len: 32, report_every: 5, eval_every: 10, eval_batches: 1}
seeds: [0, 1]
arms:
  - {name: static, controller: {name: static}}
  - {name: ewma, controller: {name: ewma, factor: 1.2, beta: 0.5, threshold: 0.0}}
resources: {cpus_per_trial: 1}
"""


def ray_node(tmp_path, name, *args):
    """``ray start --block`` of one node in its own process group and temp dir, with its
    own ports (two nodes share this machine)."""
    temp = Path("/tmp") / f"ml-{os.getpid()}-{name}"  # Ray's socket paths must stay short
    shutil.rmtree(temp, ignore_errors=True)
    ports = ["--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port", free_port(),
             "--metrics-export-port", free_port(), "--runtime-env-agent-port", free_port(),
             "--node-manager-port", free_port(), "--object-manager-port", free_port()]
    log = open(tmp_path / f"{name}.log", "w")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(["ray", "start", "--block", "--num-cpus=1", "--num-gpus=0", "--temp-dir", str(temp),
                             "--disable-usage-stats", *map(str, args), *map(str, ports)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, temp, log


def wait_for_nodes(address, n, proc_list, timeout=180):
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(p.poll() is None for p in proc_list), "a ray node exited"
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise TimeoutError(f"{n} Ray nodes not up at {address}")


def test_sweep_on_an_existing_two_node_ray_cluster(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = []
    try:
        nodes.append(ray_node(tmp_path, "head", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                              "--include-dashboard=false"))
        wait_for_nodes(address, 1, [p for p, _, _ in nodes])  # the head first: a worker joins a running GCS
        nodes.append(ray_node(tmp_path, "worker", f"--address={address}", "--node-ip-address=127.0.0.1"))
        wait_for_nodes(address, 2, [p for p, _, _ in nodes])
        spec = tmp_path / "two_nodes.yaml"
        spec.write_text(TWO_NODE_SPEC)
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        swept = run_cli("sweep", spec, "--address", address, "--tracking-uri", uri, "--storage", tmp_path / "ray",
                        cwd=tmp_path, env={"RAY_AUTH_MODE": "disabled"})
        assert swept.returncode == 0, (swept.stdout[-3000:], swept.stderr[-3000:])
        client = mlflow.MlflowClient(tracking_uri=uri)
        parent = client.search_runs([client.get_experiment_by_name("two_nodes").experiment_id],
                                    "tags.`metalearner.kind` = 'sweep'")[0]
        runs = audit(uri, parent.info.run_id)
        assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
        per_node = {}
        for r in runs:
            per_node.setdefault(r.data.tags["metalearner.node_id"], []).append(r.info.run_name)
        print("trials per node:", {k[:12]: len(v) for k, v in per_node.items()})
        assert len(per_node) == 2, per_node  # 1 CPU per node, 2 trials at a time: both nodes ran trials
    finally:
        for proc, temp, log in reversed(nodes):
            end_group(proc, timeout=20)
            log.close()
            shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------- test 2: mlflow server on PostgreSQL


def tracking_server_module():
    """scripts/tracking_server.py as a module: the one place that starts PostgreSQL and
    ``mlflow server`` (plain or basic-auth) for the tests and for people."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tracking_server", ROOT / "scripts/tracking_server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def service_mark(missing: str | None) -> pytest.MarkDecorator:
    """Skip a test whose service cannot start here, except in CI (``$CI`` set): CI installs
    every service (.ci/run), so there a missing one fails the test (`require_service`)."""
    return pytest.mark.skipif(missing is not None and not os.environ.get("CI"), reason=f"needs {missing}")


def require_service(missing: str | None) -> None:
    """In a fixture: a missing service is a failure, never a silent skip (reached only in CI)."""
    if missing is not None:
        pytest.fail(f"CI is set and the test's service is missing: needs {missing} (.ci/run installs it)")


def postgres_missing() -> str | None:
    """What the PostgreSQL tests lack here, or None."""
    try:
        tracking_server_module().pg_program("initdb")
        import psycopg2  # noqa: F401
    except (FileNotFoundError, ImportError):
        return ("PostgreSQL's server programs (apt-get install postgresql) and psycopg2 (pip install "
                "'metalearner[server]')")
    return None


needs_postgres = service_mark(postgres_missing())


@pytest.fixture(scope="module")
def pg_server():
    """PostgreSQL + ``mlflow server`` on it, once for this module's tests: (tracking URI,
    the backend's postgresql:// URI, the folder)."""
    require_service(postgres_missing())
    ts = tracking_server_module()
    folder = Path("/tmp") / f"ml-pg-{os.getpid()}"  # postgres (another user) must reach it: not under pytest's 0700
    shutil.rmtree(folder, ignore_errors=True)
    pg_port, port = free_port(), free_port()
    pg = server = None
    try:
        pg = ts.start_postgres(folder, pg_port)
        server = ts.start_mlflow(folder, port, pg_port)
        yield f"http://127.0.0.1:{port}", f"postgresql://{ts.PG_USER}@127.0.0.1:{pg_port}/mlflow", folder
    finally:
        if server is not None:
            ts.stop(server)
        if pg is not None:
            ts.stop(pg)
        shutil.rmtree(folder, ignore_errors=True)


@needs_postgres
def test_sweep_tracked_on_an_mlflow_server_over_postgresql(tmp_path, pg_server):
    """Issue 9's test 2, with the bulk path on: runs, params and tags through the server,
    trace points straight into its PostgreSQL (``--metrics-db``); audited through REST."""
    uri, pg_uri, folder = pg_server
    spec = tmp_path / "pg.yaml"
    spec.write_text(TWO_NODE_SPEC.replace("name: two_nodes", "name: on_postgres").replace("[0, 1]", "[0]"))
    swept = run_cli("sweep", spec, "--num-cpus", "2", "--tracking-uri", uri, "--storage", tmp_path / "ray",
                    "--metrics-db", pg_uri, cwd=tmp_path)
    assert swept.returncode == 0, (swept.stdout[-3000:], swept.stderr[-3000:])
    client = mlflow.MlflowClient(tracking_uri=uri)  # the REST client
    parent = client.search_runs([client.get_experiment_by_name("on_postgres").experiment_id],
                                "tags.`metalearner.kind` = 'sweep'")[0]
    runs = audit(uri, parent.info.run_id)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:  # latest_metrics, written by the bulk path, is what the runs table shows
        assert r.data.metrics["loss"] == client.get_metric_history(r.info.run_id, "loss")[-1].value
        assert r.data.params["controller.name"] and r.data.tags["metalearner.arm"]  # through the server
    assert "experiment.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert (folder / "artifacts").is_dir() and any((folder / "artifacts").rglob("experiment.yaml"))
    # the points are in PostgreSQL's tables: 20 steps of loss per child
    import psycopg2

    with psycopg2.connect(pg_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_uuid, count(*) FROM metrics WHERE key = 'loss' GROUP BY run_uuid")
        counts = dict(cur.fetchall())
    assert {r.info.run_id: counts.get(r.info.run_id) for r in runs} == {r.info.run_id: 20 for r in runs}


def _rows(pg_uri, run_id):
    import psycopg2

    with psycopg2.connect(pg_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT key, value, timestamp, step, is_nan FROM metrics WHERE run_uuid = %s "
                    "ORDER BY key, step, timestamp, value", (run_id,))
        points = cur.fetchall()
        cur.execute("SELECT key, value, timestamp, step, is_nan FROM latest_metrics WHERE run_uuid = %s ORDER BY key",
                    (run_id,))
        return points, cur.fetchall()


@needs_postgres
def test_bulk_metrics_path_stores_what_mlflow_stores_and_survives_a_dropped_connection(tmp_path, pg_server):
    """The same points through the server (MLflow's own store code) and through the bulk
    path give the same rows in ``metrics`` and ``latest_metrics`` (NaN, ±inf, an
    out-of-order step included); a redelivered point is not stored twice; the database
    dropping the writer's connections mid-delivery (pg_terminate_backend, from another
    session) loses nothing."""
    import psycopg2

    from metalearner.metrics_db import APPLICATION_NAME, MetricsDb, MetricsDbError
    from metalearner.tracking import MlflowWriter

    uri, pg_uri, _ = pg_server
    trace = [(s, {"loss": 3.0 - s / 100, "window": 8.0 + s // 10}) for s in range(1, 121)]
    trace[49][1]["loss"] = float("nan")
    trace[59][1]["window"] = float("inf")
    trace[60][1]["window"] = float("-inf")
    ids = {}
    for name, bulk in (("rest", None), ("bulk", pg_uri)):
        w = MlflowWriter(uri, journal_dir=tmp_path / name, metrics_db=bulk)
        key = w.create_run("bulk-vs-rest", name, {"metalearner.kind": "train"})
        w.log_params(key, {"x": 1})
        for step, values in trace:
            w.log_metrics(key, values, step, timestamp_ms=1_700_000_000_000 + step)
        w.terminate(key)
        assert w.close().complete and not w.errors, w.errors
        ids[name] = w.run_id(key)
    rest, bulk = _rows(pg_uri, ids["rest"]), _rows(pg_uri, ids["bulk"])
    assert len(rest[0]) == 2 * 120 and bulk == rest
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert str(client.get_run(ids["bulk"]).data.metrics) == str(client.get_run(ids["rest"]).data.metrics)
    assert client.get_run(ids["bulk"]).data.params == {"x": "1"}

    db = MetricsDb(pg_uri)
    try:
        # batches out of step order, ties on step broken by timestamp then value: MLflow's latest rule
        batches = [[("v", 2.5, 10, 200), ("u", 1.0, 10, 5)], [("v", 2.0, 10, 100), ("v", 9.0, 5, 200)],
                   [("u", 3.0, 11, 5), ("u", 2.0, 11, 5), ("w", 1.0, 10, 1)]]
        exp = client.get_experiment_by_name("bulk-vs-rest").experiment_id
        by_rest, by_db = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
        Metric = mlflow.entities.Metric
        for batch in batches:
            client.log_batch(by_rest, [Metric(*p) for p in batch])
            db.log_points(by_db, batch)
        assert _rows(pg_uri, by_db) == _rows(pg_uri, by_rest)
        assert {k: v for k, v, *_ in _rows(pg_uri, by_db)[1]} == {"u": 3.0, "v": 2.5, "w": 1.0}
        # a redelivery: nothing new, nothing twice
        assert db.log_points(ids["bulk"], [("loss", 2.99, rest[0][0][2], 1), ("loss", 2.99, rest[0][0][2], 1)]) <= 1
        before = len(_rows(pg_uri, ids["bulk"])[0])
        again = [(k, v, ts, s) for k, v, ts, s, nan in _rows(pg_uri, ids["bulk"])[0] if not nan]
        assert db.log_points(ids["bulk"], again) == 0 and len(_rows(pg_uri, ids["bulk"])[0]) == before
        with pytest.raises(MetricsDbError, match="not in"):
            db.log_points("0" * 32, [("loss", 1.0, 0, 1)])  # a run of another store: an error, no write
        with pytest.raises(MetricsDbError, match="has no table 'metrics'"):
            MetricsDb(pg_uri.rsplit("/", 1)[0] + "/postgres").check_schema()  # not MLflow's database
    finally:
        db.close()

    # the database drops the writer's connections while it delivers: it reconnects, loses nothing
    w = MlflowWriter(uri, journal_dir=tmp_path / "dropped", metrics_db=pg_uri, flush_every=60)
    key = w.create_run("bulk-vs-rest", "dropped", {"metalearner.kind": "train"})
    killed = 0
    with psycopg2.connect(pg_uri) as admin:
        admin.autocommit = True
        for step in range(1, 601):
            w.log_metrics(key, {"loss": 1.0 / step, "window": 8.0}, step)
            if step % 100 == 0:
                w.flush()
                deadline = time.time() + 30
                while w.points_written < 2 * step - 120 and time.time() < deadline:
                    time.sleep(0.05)
                with admin.cursor() as cur:
                    cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE application_name = %s", (APPLICATION_NAME,))
                    killed += cur.fetchone()[0]
    w.terminate(key)
    assert w.close().complete and not w.errors, w.errors
    assert killed >= 3  # the writer's connection was there to drop, and it came back each time
    points, latest = _rows(pg_uri, w.run_id(key))
    assert sorted(s for k, v, ts, s, nan in points if k == "loss") == list(range(1, 601))
    assert dict((k, s) for k, v, ts, s, nan in latest) == {"loss": 600, "window": 600}


@needs_postgres
def test_metrics_db_that_is_not_the_servers_backend_exits_2_before_ray(tmp_path, pg_server):
    uri, pg_uri, _ = pg_server
    spec = tmp_path / "pg.yaml"
    spec.write_text(TWO_NODE_SPEC.replace("name: two_nodes", "name: wrong_db"))
    wrong = pg_uri.rsplit("/", 1)[0] + "/postgres"
    r = run_cli("sweep", spec, "--tracking-uri", uri, "--storage", tmp_path / "ray", "--metrics-db", wrong, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.strip().count("\n") == 0 and "--metrics-db" in r.stderr and "'metrics'" in r.stderr, r.stderr
    assert not (tmp_path / "ray").exists()
    r = run_cli("sweep", spec, "--storage", tmp_path / "ray", "--metrics-db", pg_uri, cwd=tmp_path)  # SQLite store
    assert r.returncode == 2 and "--metrics-db" in r.stderr and "tracking server" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def scratch_store(pg_server):
    """A second MLflow backend store in the same PostgreSQL, its schema made by MLflow's own
    store code (its migrations, up to the installed head): the guards' tests break it and
    mend it again. Returns its postgresql:// URI."""
    import psycopg2

    _, pg_uri, _ = pg_server
    base = pg_uri.rsplit("/", 1)[0]
    conn = psycopg2.connect(f"{base}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS guards")
        cur.execute("CREATE DATABASE guards")
    conn.close()
    scratch = f"{base}/guards"
    # MLflow's store creates its tables (SQLAlchemy's spelling of the psycopg2 driver)
    mlflow.MlflowClient(tracking_uri=scratch.replace("postgresql://", "postgresql+psycopg2://")).search_experiments()
    return scratch


def primary_key(cur, table):
    """(constraint name, its columns) of ``table``'s primary key."""
    cur.execute("SELECT c.conname, array_agg(a.attname ORDER BY k.ord) FROM pg_constraint c "
                "CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord) "
                "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
                "WHERE c.conrelid = %s::regclass AND c.contype = 'p' GROUP BY c.conname", (table,))
    return cur.fetchone()


def set_primary_key(cur, table, name, columns):
    """Replace ``table``'s primary key by one on ``columns`` (none: no primary key)."""
    found = primary_key(cur, table)
    if found is not None:
        cur.execute(f"ALTER TABLE {table} DROP CONSTRAINT {found[0]}")
    if columns:
        cur.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} PRIMARY KEY ({', '.join(columns)})")


GUARD_CASES = {  # what is broken: (table, new primary key or None for the revision, what the line names)
    "alembic revision": (None, None, ["alembic revision f00dfeed0042", "expected one this bulk path was tested "
                                      "against: dc11669786a5"]),
    "metrics key dropped": ("metrics", [], ["table 'metrics'", "primary key (none)",
                                            "expected (key, timestamp, step, run_uuid, value, is_nan)"]),
    "latest_metrics key changed": ("latest_metrics", ["key", "run_uuid", "step"],
                                   ["table 'latest_metrics'", "primary key (key, run_uuid, step)",
                                    "expected (key, run_uuid)"]),
}


@needs_postgres
@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_metrics_db_of_a_schema_it_was_not_tested_against_exits_2_naming_it(tmp_path, pg_server, scratch_store,
                                                                            case):
    """The bulk path's guards: MLflow's schema at another alembic revision, or a primary key
    that its ON CONFLICT relies on dropped or changed, exits 2 before Ray with one line
    naming what was found (the store is accepted before it is broken, and after it is mended)."""
    import psycopg2

    from metalearner.tracking.access import check_metrics_db

    uri = pg_server[0]
    table, columns, named = GUARD_CASES[case]
    check_metrics_db(scratch_store)  # MLflow's own schema, as the installed MLflow made it: accepted
    conn = psycopg2.connect(scratch_store)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT version_num FROM alembic_version")
        [(head,)] = cur.fetchall()
        name, before = primary_key(cur, table or "metrics")
    try:
        with conn.cursor() as cur:
            if table is None:
                cur.execute("UPDATE alembic_version SET version_num = 'f00dfeed0042'")
            else:
                set_primary_key(cur, table, name, columns)
        spec = tmp_path / "pg.yaml"
        spec.write_text(TWO_NODE_SPEC.replace("name: two_nodes", "name: guards"))
        r = run_cli("sweep", spec, "--tracking-uri", uri, "--storage", tmp_path / "ray", "--metrics-db",
                    scratch_store, cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        line = r.stderr.strip()
        assert "\n" not in line and line.startswith("metalearner: error: --metrics-db: "), line
        for fragment in named:
            assert fragment in line, (fragment, line)
        assert not (tmp_path / "ray").exists()  # before Ray
    finally:
        with conn.cursor() as cur:
            if table is None:
                cur.execute("UPDATE alembic_version SET version_num = %s", (head,))
            else:
                set_primary_key(cur, table, name, before)
        conn.close()
    check_metrics_db(scratch_store)  # mended: accepted again


def test_only_the_tracking_layer_reaches_the_bulk_path():
    """The layer rule in substance: the CLI, its input checks and the trainables reach
    metalearner.metrics_db only through the tracking layer's public functions."""
    from tests.test_layers import layer, module_graph

    graph = module_graph(ROOT)
    tracking = layer("metalearner.tracking")
    assert sorted(m for m, targets in graph.items() if "metalearner.metrics_db" in targets and layer(m) != tracking) \
        == []
    assert "metalearner.tracking.access" in graph["metalearner.inputs"]  # the --metrics-db pre-flight check


# ---------------------------------------------------------------- spec paths (no services)


def test_spec_paths_are_made_absolute_from_the_working_folder(tmp_path, monkeypatch):
    from metalearner.experiment import load_experiment

    specs, work = tmp_path / "specs", tmp_path / "work"
    specs.mkdir()
    (work / "corpus").mkdir(parents=True)
    (work / "corpus/a.txt").write_text("hello\n")
    (specs / "text.yaml").write_text(
        "name: paths\ntask: {name: text, files: [corpus/a.txt]}\nmodel: {preset: tiny}\n"
        "train: {steps: 4, seq_len: 32, report_every: 2, eval_every: 2}\n")
    monkeypatch.chdir(work)
    spec = load_experiment(specs / "text.yaml")
    assert spec.base["task"]["files"] == [str(work / "corpus/a.txt")]  # the working folder, not specs/
    run_cfg = spec.run_config(spec.arms[0], spec.seeds[0])
    monkeypatch.chdir(tmp_path)  # a trial's own working folder: the paths still hold
    from metalearner.config import load_run_config

    assert load_run_config(run_cfg).task.files == [str(work / "corpus/a.txt")]
    monkeypatch.chdir(work / "corpus")  # a --set override is read from the working folder too
    over = load_experiment(specs / "text.yaml", overrides=["task.files=[../corpus/a.txt]"])
    assert Path(over.base["task"]["files"][0]).resolve() == work / "corpus/a.txt"


def test_storage_uris_pass_the_input_check_unchanged(tmp_path, monkeypatch):
    from metalearner.cli import build_parser
    from metalearner.inputs import sweep_inputs
    from trainables.storage import is_uri, storage_root, sweep_folder

    (tmp_path / "spec.yaml").write_text(TWO_NODE_SPEC)
    monkeypatch.chdir(tmp_path)
    for uri in ("s3://bucket/sweeps", "gs://bucket/sweeps", "s3://b/p?endpoint_override=127.0.0.1:9000"):
        args = build_parser().parse_args(["sweep", "spec.yaml", "--num-cpus", "2", "--storage", uri])
        sweep_inputs(args)  # no error: left to Ray and pyarrow
        assert is_uri(uri) and storage_root(uri) == uri
        assert sweep_folder(uri, "x-1") == tmp_path / "sweeps/x-1"  # the local copy of its own files
    assert storage_root(f"file://{tmp_path}/ray") == str(tmp_path / "ray")
    assert storage_root("ray") == str(tmp_path / "ray") and sweep_folder(str(tmp_path / "ray"), "x-1") == \
        tmp_path / "ray/x-1"
