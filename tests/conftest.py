import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real `metalearner` command line in a subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "metalearner.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with MLflow's tables made and nothing in them, made once per
    test process by MLflow itself (its schema migrations take seconds per new store)."""
    import mlflow

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_uri(tmp_path, empty_store):
    """A new, empty MLflow SQLite store in the test's folder (a copy of `empty_store`)."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for the tests of one module (request it, or mark the module
    ``pytestmark = pytest.mark.usefixtures("local_ray")``)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def children(uri, parent_id):
    """(client, parent run, child runs) of a sweep's parent run, through the MLflow client."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=1000)
    return client, parent, runs


def history(client, run_id, key):
    """[(step, value)] of one metric of a run, by step."""
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def free_port(avoid=range(10002, 20000)):
    """A free TCP port on 127.0.0.1, outside ``avoid`` (the ports Ray's own workers take)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """moto's S3 server on 127.0.0.1 (its own process group); the endpoint and the test
    credentials go through the standard AWS variables, which Ray's workers inherit."""
    import boto3

    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    try:
        deadline = time.time() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="sweeps")
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        yield boto3.client("s3")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # moto's server and what it started, by its group
        proc.wait(timeout=30)
        log.close()


class Sweep:
    """One ``metalearner sweep`` process in its own session. `close` ends what it started
    and left (its Ray processes, when the driver was killed), by pid."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.log = open(tmp / f"sweep-{time.time_ns()}.log", "w+")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.t0 = time.monotonic()
        self.seconds = 0.0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metalearner.cli", "sweep", *args, "--num-cpus", "2"],
            cwd=tmp, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}

    def descendants(self) -> dict[int, psutil.Process]:
        """The processes this sweep started (Ray's gcs, raylet, workers), remembered so
        that they can be ended after a SIGKILL of the driver orphans them."""
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(p.pid, p)
        except psutil.Error:
            pass
        return self.seen

    def wait(self, timeout: float = 400) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.seconds = time.monotonic() - self.t0
        return rc

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def finish(self, timeout: float = 400) -> tuple[int, str]:
        """Wait for the sweep to end; (its exit code, its output), then `close`."""
        try:
            rc = self.wait(timeout)
            return rc, self.output()
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.descendants()
            self.proc.kill()
            self.proc.wait()
        for p in self.seen.values():
            try:
                if p.is_running():
                    p.kill()  # psutil checks the pid still names the process it saw
            except psutil.Error:
                pass
        self.log.close()


def wait_for(predicate, sweep: Sweep, timeout: float = 300, what: str = ""):
    deadline = time.monotonic() + timeout
    scanned = 0.0
    while True:
        if time.monotonic() - scanned > 2:
            sweep.descendants()
            scanned = time.monotonic()
        got = predicate()
        if got:
            return got
        if sweep.proc.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {sweep.proc.returncode}) before {what}:\n{sweep.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)

# ---------------------------------------------------------------- the order files run in (xdist)

# The files that take longest, longest first (serial seconds measured on the 2-core box,
# issue 16). `-n 2 --dist loadfile` hands out one file at a time to whichever worker is
# free; by default xdist hands out the files with the most tests first, which put these
# (few tests, minutes each) last, so the run ended with one worker alone on them.
# Longest first, the last files handed out are the short ones and both workers finish
# together. Files not named here follow, in collection order.
SLOWEST_FILES = (
    "test_cluster.py",
    "test_sweep.py",
    "test_outage.py",
    "test_plugins.py",
    "test_hf_model.py",
    "test_hf_sweep.py",
    "test_pareto.py",
    "test_transfer.py",
    "test_resume_checkpoints.py",
    "test_sweep_faults.py",
    "test_cli.py",
    "test_sweep_lifecycle.py",
    "test_study.py",
    "test_mlflow_ui.py",
    "test_auth_server.py",
    "test_sweep_schedulers.py",
    "test_speech_sweep.py",
    "test_hf.py",
    "test_train_faults.py",
    "test_hf_faults.py",
    "test_report.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist's "most tests first": this file orders them
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """Files in `SLOWEST_FILES` order first; each file's tests keep their own order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
