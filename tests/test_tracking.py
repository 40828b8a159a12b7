"""The single MLflow writer: batched, deduplicated, safe with many producer threads."""

import threading
import time

import mlflow
import pytest

from metalearner.tracking import MlflowWriter, resolve_tracking_uri


@pytest.fixture
def writer(sqlite_uri):
    w = MlflowWriter(sqlite_uri, flush_every=1000, flush_seconds=60)
    yield w
    if w.left is None:
        w.close()


def steps_of(uri, run_id, key):
    return [(m.step, m.value) for m in sorted(mlflow.MlflowClient(uri).get_metric_history(run_id, key),
                                              key=lambda m: m.step)]


def test_metrics_go_in_batches_of_at_most_1000(writer, sqlite_uri):
    run = writer.create_run("exp", "r")
    sizes = []
    real = writer.client.log_batch

    def spy(run_id, metrics=(), params=(), tags=(), **kw):
        if metrics:
            sizes.append(len(metrics))
        return real(run_id, metrics=metrics, params=params, tags=tags, **kw)

    writer.client.log_batch = spy
    for s in range(1, 601):
        writer.log_metrics(run, {"loss": 1.0 / s, "window": float(s)}, s)
    writer.close()
    assert sum(sizes) == 1200 and max(sizes) <= 1000 and len(sizes) <= 3
    assert [s for s, _ in steps_of(sqlite_uri, writer.run_id(run), "loss")] == list(range(1, 601))


def test_steps_already_stored_are_dropped(writer, sqlite_uri):
    run = writer.create_run("exp", "r")
    for s in range(1, 11):
        assert writer.log_metrics(run, {"loss": float(s)}, s)
    for s in range(5, 16):  # a restart from the step-4 checkpoint repeats 5..10
        writer.log_metrics(run, {"loss": 100.0 + s}, s)
    writer.close()
    hist = steps_of(sqlite_uri, writer.run_id(run), "loss")
    assert [s for s, _ in hist] == list(range(1, 16))
    assert dict(hist)[7] == 7.0 and dict(hist)[12] == 112.0


def test_resume_run_knows_the_last_stored_step(sqlite_uri):
    w = MlflowWriter(sqlite_uri)
    run = w.create_run("exp", "r")
    for s in range(1, 21):
        w.log_metrics(run, {"loss": float(s)}, s)
    w.close()
    run_id = w.run_id(run)
    w2 = MlflowWriter(sqlite_uri)  # another journal: the last step comes from the store
    key = w2.resume_run(run_id)
    assert w2.last_step(key) == 20
    assert not w2.log_metrics(key, {"loss": 0.0}, 20) and w2.log_metrics(key, {"loss": 0.0}, 21)
    assert w2.close().complete
    assert [s for s, _ in steps_of(sqlite_uri, run_id, "loss")] == list(range(1, 22))



def test_a_param_the_journal_holds_is_not_sent_again_with_another_value(sqlite_uri, tmp_path):
    """A resumed PBT trial re-sends its params with mutated settings: MLflow refuses a changed
    param (a 400 that would stop the run's delivery), so the first value wins, also across
    a reopened journal."""
    journal = tmp_path / "tracking"
    w = MlflowWriter(sqlite_uri, journal_dir=journal)
    key = w.create_run("exp", "r", key="trial-a")
    w.log_params(key, {"controller.factor": 1.1, "train.seed": 0})
    w.log_params(key, {"controller.factor": 1.3})  # the same process: dropped too
    w.log_metrics(key, {"loss": 1.0}, 1)
    assert w.close().complete
    w2 = MlflowWriter(sqlite_uri, journal_dir=journal)  # the resumed driver
    w2.create_run("exp", "r", key="trial-a")  # reopens it
    w2.log_params(key, {"controller.factor": 1.32, "controller.window": 64})
    w2.log_metrics(key, {"loss": 0.5}, 2)
    left = w2.close()
    assert left.complete and not w2.errors, w2.errors
    run = mlflow.MlflowClient(sqlite_uri).get_run(w2.run_id(key))
    assert run.data.params == {"controller.factor": "1.1", "train.seed": "0", "controller.window": "64"}
    assert [s for s, _ in steps_of(sqlite_uri, w2.run_id(key), "loss")] == [1, 2]  # delivery went on


def test_many_producer_threads_one_sqlite_store(writer, sqlite_uri):
    runs = [writer.create_run("exp", f"r{i}") for i in range(4)]

    def produce(run_id):
        for s in range(1, 301):
            writer.log_metrics(run_id, {"loss": float(s), "lr": 0.1}, s)

    threads = [threading.Thread(target=produce, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert not writer.errors
    for r in runs:
        assert [s for s, _ in steps_of(sqlite_uri, writer.run_id(r), "loss")] == list(range(1, 301))


def test_default_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_the_reader_only_reads():
    """Every write, the report's included, goes through the journaled writer."""
    from metalearner.tracking import TrackingReader

    writes = [n for n in dir(TrackingReader) if n.startswith(("log_", "set_", "write_", "delete_", "create_"))]
    assert writes == []


def test_waiting_for_a_run_id_journals_the_buffered_create(writer):
    """`run_id(key, timeout)` right after `create_run`: the create record is still in the
    producer's buffer (flush_seconds=60 here); waiting must send it, not sit out the timeout."""
    key = writer.create_run("wait-for-id", "r")
    start = time.monotonic()
    assert writer.run_id(key, timeout=30) is not None
    assert time.monotonic() - start < 25
