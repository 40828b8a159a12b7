"""`metalearner train` when a run diverges or its checkpoint is bad: exit codes, one-line
messages, the MLflow run's tag and a contiguous trace in a real SQLite store.

The faults come from outside: a learning rate so large that the real run diverges, and
checkpoint files the test writes (damaged, or armed to run code when unpickled).
"""

import math

import mlflow
import torch

TRACE_KEYS = ["loss", "loss_ewma", "rope_base", "window", "lr"]
TINY = ["--task", "recall", "--set", "model.preset=tiny", "--set", "model.window=4", "--set", "task.n_pairs=4",
        "--set", "task.distance=16", "--set", "train.batch_size=8", "--set", "train.seq_len=32",
        "--set", "train.eval_every=10", "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1"]
DIVERGING = ["--set", "train.lr=10000000000.0", "--set", "train.max_nonfinite=3"]  # NaN loss from step 2


def error_lines(stderr):
    return [ln for ln in stderr.splitlines() if "error" in ln.lower()]


def test_a_diverged_run_exits_1_tagged_with_a_contiguous_trace(cli, sqlite_uri, tmp_path):
    res = cli("train", *TINY, *DIVERGING, "--steps", 20, "--tracking-uri", sqlite_uri, cwd=tmp_path)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    (line,) = error_lines(res.stderr)
    assert "diverged" in line and "train.max_nonfinite" in line and "step 4 of 20" in line
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("metalearner-train").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["metalearner.diverged"] == "at step 4 of 20"
    rid = run.info.run_id

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(rid, key), key=lambda m: m.step)]

    for key in TRACE_KEYS:  # one point per step per key, the NaN steps included
        assert [s for s, _ in history(key)] == [1, 2, 3, 4], key
    losses = [v for _, v in history("loss")]
    assert math.isfinite(losses[0]) and all(math.isnan(v) for v in losses[1:])  # SQLite keeps NaN as NaN
    assert history("nonfinite_steps") == [(2, 1.0), (3, 2.0), (4, 3.0)]


def test_resume_refuses_a_changed_config_and_bad_checkpoints(cli, tmp_path):
    ck = tmp_path / "ck"
    common = ["train", *TINY, "--no-mlflow", "--trace-csv", tmp_path / "t.csv", "--checkpoint-dir", ck]
    res = cli(*common, "--steps", 4, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    good = (ck / "checkpoint.pt").read_bytes()

    res = cli(*common, "--steps", 6, "--resume", "--set", "train.lr=0.01", cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearner: error: train.lr: got 0.01, expected 0.003"), lines

    (ck / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    res = cli(*common, "--steps", 6, "--resume", cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.pt: unreadable" in lines[0], lines

    marker = tmp_path / "ran"
    state = torch.load(__import__("io").BytesIO(good), weights_only=True)
    state["controller"] = ArmedPickle(marker)
    torch.save(state, ck / "checkpoint.pt")
    res = cli(*common, "--steps", 6, "--resume", cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0], lines
    assert not marker.exists()

    (ck / "checkpoint.pt").write_bytes(good)  # the intact checkpoint still resumes (to more steps)
    res = cli(*common, "--steps", 6, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_hf_engine_resume_refuses_a_changed_config(cli, tmp_path):
    common = ["train", *TINY, "--engine", "hf", "--no-mlflow", "--trace-csv", tmp_path / "t.csv",
              "--checkpoint-dir", tmp_path / "ck"]
    res = cli(*common, "--steps", 2, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = cli(*common, "--steps", 4, "--resume", "--set", "controller.factor=1.5", cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearner: error: controller.factor: got 1.5, expected"), lines


class ArmedPickle:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))
