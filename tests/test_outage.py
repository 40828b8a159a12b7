"""Tracking outages with a real `mlflow server` (SQLite store in a tmp folder, its own
process group, ended by process group): the Tune callback never waits on the store,
a sweep rides out a stopped server, and a server gone for good leaves a journal that
``metalearner sync`` delivers exactly.

Each scenario records its figures (exit code, points lost, points duplicated, wall time)
in ``$OUTAGE_FIGURES`` (a JSON-lines file) when that variable is set.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
from metalearner.trace import STEP_KEYS  # noqa: E402 - the one definition

STEPS = 60
SPEC = {
    "name": "outage",
    "task": {"name": "recall", "n_pairs": 4, "distance": 16},
    "model": {"preset": "tiny", "window": 8},
    "train": {"steps": STEPS, "batch_size": 8, "seq_len": 32, "report_every": 5, "eval_every": 20,
              "eval_batches": 1},
    "seeds": [0, 1],
    "arms": [{"name": "static", "controller": {"name": "static"}},
             {"name": "ewma", "controller": {"name": "ewma", "factor": 1.2, "beta": 0.5, "threshold": 0.0}}],
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``mlflow server`` on 127.0.0.1 in its own process group."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port, self.proc = folder, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, wait: bool = True) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
             "--default-artifact-root", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers: a light server
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                mlflow.MlflowClient(tracking_uri=self.uri).search_experiments()
                return
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # the server and its workers, nothing else
            self.proc.wait(timeout=60)
        self.proc = None


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this process's client: fail fast
    s = Server(tmp_path, _free_port())
    yield s
    s.kill()


def _record(name: str, **figures) -> None:
    out = os.environ.get("OUTAGE_FIGURES")
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps({"scenario": name, **figures}) + "\n")


def audit(uri: str, experiment: str, journal: Path) -> tuple[int, int]:
    """Every child run of the experiment's sweep: each trace key has steps exactly 1..N once,
    and every point the journal holds is in the store once. Returns (lost, duplicated)."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("metalearner.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(kids) == len(SPEC["seeds"]) * len(SPEC["arms"])
    journaled: Counter = Counter()
    for line in (journal / "journal.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["op"] in ("m", "x"):
            for k in rec["v"]:
                journaled[(rec["run"], k, rec["step"])] += 1
    state = json.loads((journal / "delivered.json").read_text())
    by_key = {v["run_id"]: k for k, v in state["runs"].items()}
    lost = dup = 0
    for r in kids:
        assert r.info.status == "FINISHED"
        key = by_key[r.info.run_id]
        stored: Counter = Counter()
        for k in {k for (run, k, _) in journaled if run == key}:
            for m in client.get_metric_history(r.info.run_id, k):
                stored[(key, k, m.step)] += 1
        for k in STEP_KEYS:
            if k == "loss_ewma" and r.data.params["controller.name"] == "static":
                continue
            got = sorted(s for (_, kk, s), n in stored.items() for _ in range(n) if kk == k)
            assert got == list(range(1, STEPS + 1)), (r.info.run_name, k)
        mine = {p for p in journaled if p[0] == key}
        lost += sum(1 for p in mine if p not in stored)
        dup += sum(n - 1 for n in stored.values() if n > 1)
        assert "controller.name" in r.data.params and r.data.tags["metalearner.arm"]
    return lost, dup


def _sweep(tmp_path, uri, *extra):
    spec = tmp_path / "outage.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "metalearner.cli", "sweep", str(spec), "--tracking-uri", uri, "--num-cpus", "2",
         "--storage", str(tmp_path / "ray"), "--out", str(tmp_path / "report"), *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_points(uri: str, proc, timeout: float = 240) -> None:
    """Until some child run of the sweep has trace points in the store (mid-sweep)."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        exp = client.get_experiment_by_name(SPEC["name"])
        if exp is not None:
            for r in client.search_runs([exp.experiment_id], "tags.`metalearner.kind` = 'trial'"):
                if client.get_metric_history(r.info.run_id, "loss"):
                    return
        time.sleep(0.5)
    raise AssertionError("no trace point reached the store")


def _journal(tmp_path) -> Path:
    (journal,) = (tmp_path / "ray").glob("outage-*/tracking")
    return journal


# ---------------------------------------------------------------- the callback


def test_run_creation_does_not_wait_for_an_unreachable_server(tmp_path, server):
    """The Tune callback returns from every hook while no server exists at all; the runs
    appear, complete, once a server starts on that address."""
    from metalearner.tracking import MlflowWriter
    from trainables.callback import MlflowTraceCallback

    writer = MlflowWriter(server.uri, journal_dir=tmp_path / "tracking", outage_s=300)
    parent = writer.create_run("cb", "parent", {"metalearner.kind": "sweep"}, key="sweep")
    cb = MlflowTraceCallback(writer, "cb", parent)
    trial = SimpleNamespace(trial_id="t0", config={"cell": {"train": {"seed": 0}}, "meta": {"arm": "a"}},
                            last_result={}, status="RUNNING")
    cb.on_trial_start(0, [trial], trial)
    for start in (1, 6):
        rows = [{"step": s, "loss": 1.0, "lr": 0.1} for s in range(start, start + 5)]
        cb.on_trial_result(0, [trial], trial, {"rows": rows, "params": {"controller.name": "ewma"}})
    trial.last_result = {"step": 10, "total_steps": 10}
    cb.on_trial_complete(0, [trial], trial)
    writer.terminate(parent)
    assert server.proc is None  # every hook above returned before any server existed
    assert writer.run_id(cb.run_ids["t0"]) is None

    server.start()
    assert writer.close().complete
    client = mlflow.MlflowClient(server.uri)
    run = client.get_run(writer.run_id(cb.run_ids["t0"]))
    assert run.info.status == "FINISHED" and run.data.params["controller.name"] == "ewma"
    assert run.data.tags["mlflow.parentRunId"] == writer.run_id(parent)
    for k in ("loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) == list(range(1, 11))


# ---------------------------------------------------------------- scenarios 4 and 5


def test_server_down_30s_mid_sweep_then_back(tmp_path, server):
    """Scenario 4: SIGKILL of the server's process group mid-sweep, 30 s without it,
    restarted on the same store and port: exit 0, every point once."""
    server.start()
    t0 = time.time()
    proc = _sweep(tmp_path, server.uri)
    try:
        _wait_for_points(server.uri, proc)
        server.kill(signal.SIGKILL)
        time.sleep(30)
        server.start()
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    wall = time.time() - t0
    lost, dup = audit(server.uri, SPEC["name"], _journal(tmp_path))
    _record("tracking server down 30 s mid-sweep", exit_code=proc.returncode, lost=lost, duplicated=dup,
            wall_s=round(wall, 1))
    assert proc.returncode == 0, out
    assert (lost, dup) == (0, 0)


def test_server_gone_for_good_then_sync(tmp_path, server):
    """Scenario 5: the server dies mid-sweep and stays away: exit 1 with the pending count
    and the sync command; a server on the same store, then ``metalearner sync``: exit 0,
    every point once."""
    server.start()
    t0 = time.time()
    proc = _sweep(tmp_path, server.uri, "--set", "tracking.outage_s=20")
    try:
        _wait_for_points(server.uri, proc)
        server.kill(signal.SIGTERM)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    journal = _journal(tmp_path)
    assert proc.returncode == 1, out
    assert "trace point(s) pending" in out and f"metalearner sync {journal.parent}" in out, out
    pending_line = next(line for line in out.splitlines() if "trace point(s) pending" in line)
    assert int(pending_line.split(": ")[-1].split()[0]) > 0

    server.port = _free_port()  # the store moved: sync is told where
    server.uri = f"http://127.0.0.1:{server.port}"
    server.start()
    sync = run_cli("sync", journal.parent, "--tracking-uri", server.uri, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    wall = time.time() - t0
    lost, dup = audit(server.uri, SPEC["name"], journal)
    _record("tracking server gone for good, then sync", exit_code=proc.returncode, sync_exit_code=sync.returncode,
            lost=lost, duplicated=dup, wall_s=round(wall, 1))
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert (lost, dup) == (0, 0)
