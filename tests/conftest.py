import os
import shutil
import subprocess
import sys
from pathlib import Path

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
