"""Cluster scale (issue 9): each test starts its real services on 127.0.0.1 itself (a
2-node Ray cluster, a local S3 server, an MLflow server on PostgreSQL) and ends them by
their process group at the end; nothing here runs `ray stop` or kills by name."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import run_cli

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


def free_port(avoid=range(10002, 20000)):
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def end_group(proc, timeout=30):
    """End a process this test started, and its children, by its process group."""
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
