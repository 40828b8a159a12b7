"""A real (tiny) Ray sweep in which one trial diverges: it ends early as a failure of that
trial, tagged in MLflow, with a contiguous trace, and the other trial is untouched.

The fault comes from the spec, as a user would write it: a search over ``train.lr`` whose
second value makes the real run diverge (NaN loss from step 2).
"""

import math
from pathlib import Path

import mlflow
import pytest

from metalearner.experiment import parse_experiment
from metalearner.trace import STEP_KEYS as TRACE_KEYS
from trainables.sweep import SweepRunner

pytestmark = pytest.mark.usefixtures("local_ray")


def test_a_diverging_trial_is_a_tagged_failure_not_a_crash(tmp_path, capfd):
    spec = parse_experiment({
        "name": "diverge-test", "task": {"name": "recall", "n_pairs": 4, "distance": 16},
        "model": {"preset": "tiny", "window": 8},
        "train": {"steps": 12, "batch_size": 8, "seq_len": 32, "report_every": 6, "eval_every": 6,
                  "eval_batches": 1, "warmup_steps": 1, "max_nonfinite": 3},
        "controller": {"name": "ewma", "factor": 1.2, "beta": 0.5, "threshold": 0.0},
        "search": {"searcher": "random", "num_samples": 1, "confirm": False,
                   "space": {"train.lr": {"grid": [0.003, 10000000000.0]}}},
    })
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = SweepRunner(spec, uri, storage=str(tmp_path / "ray"), progress=False).run()
    assert "Traceback" not in capfd.readouterr().err
    (error,) = result.errors
    assert "diverged at step 4 of 12" in error and "train.max_nonfinite" in error

    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FAILED"
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    by_lr = {float(r.data.params["train.lr"]): r for r in runs}
    assert sorted(by_lr) == [0.003, 1e10]

    def history(run, key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                   key=lambda m: m.step)]

    bad, good = by_lr[1e10], by_lr[0.003]
    assert bad.info.status == "FAILED" and bad.data.tags["metalearner.diverged"] == "at step 4 of 12"
    for key in TRACE_KEYS:
        assert [s for s, _ in history(bad, key)] == [1, 2, 3, 4], key
    assert all(math.isnan(v) for _, v in history(bad, "loss")[1:])
    assert history(bad, "nonfinite_steps") == [(2, 1.0), (3, 2.0), (4, 3.0)]

    assert good.info.status == "FINISHED" and "metalearner.diverged" not in good.data.tags
    assert [s for s, _ in history(good, "loss")] == list(range(1, 13))
    assert history(good, "nonfinite_steps") == []


_KEEPS_HANDLER = """
import os, signal, sys, types
from trainables.sweep import SweepRunner

signal.signal(signal.SIGTERM, lambda *a: os._exit(130))  # the CLI's handler: stop, then exit 130
SweepRunner.init_ray(types.SimpleNamespace(address=sys.argv[1], num_cpus=None, spec=types.SimpleNamespace(runtime_env=None)))
os.kill(os.getpid(), signal.SIGTERM)  # ray.init's own handler would exit 15
os._exit(3)
"""


def test_ray_init_leaves_the_faces_sigterm_handler_in_force(tmp_path):
    """``ray.init`` installs its own SIGTERM handler (``sys.exit(15)``): the sweep's Ray
    start must leave the CLI's in force, or SIGTERM ends a sweep with 15 and a FAILED parent.
    A real ``ray.init`` in a child process, attached to this module's local Ray."""
    import os
    import subprocess
    import sys

    import ray

    address = ray.get_runtime_context().gcs_address
    root = str(Path(__file__).resolve().parents[1])  # this checkout's code, as the test's own
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _KEEPS_HANDLER, address], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr[-2000:]
