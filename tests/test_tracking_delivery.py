"""The writer's delivery loop with several connections (a tracking server's default),
against a real SQLite store: runs delivered in parallel keep exactly-once, in-order
delivery, children wait for their parent, and the watermarks end at the journal's end."""

import time

import mlflow
import pytest

from metalearner.journal import load_state, pending
from metalearner.tracking import PARENT_TAG, MlflowWriter

RUNS, STEPS, CHUNK = 4, 40, 10


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One SQLite store for the module (a fresh one spends seconds on its migrations);
    each test writes its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def test_parallel_delivery_is_exact_and_in_order(tmp_path, uri):
    w = MlflowWriter(uri, journal_dir=tmp_path / "j", connections=4)
    parent = w.create_run("par", "parent", {"metalearner.kind": "sweep"})
    keys = [w.create_run("par", f"t{i}", {"metalearner.kind": "trial"}, parent=parent, key=f"trial-{i}")
            for i in range(RUNS)]
    for start in range(1, STEPS + 1, CHUNK):  # interleaved chunks, as a sweep's reports arrive
        for i, key in enumerate(keys):
            if start == 1:
                w.log_params(key, {"seed": i})
            for s in range(start, start + CHUNK):
                w.log_metrics(key, {"loss": 1.0 / s + i, "window": float(s)}, s)
            w.flush(key)
    for key in keys:
        w.terminate(key)
    w.terminate(parent)
    left = w.close()
    assert left.complete, left
    assert w.delivery.pool is not None  # the parallel path ran
    assert w.points_written == RUNS * STEPS * 2
    client = mlflow.MlflowClient(uri)
    parent_id = w.run_id(parent)
    runs = client.search_runs([client.get_experiment_by_name("par").experiment_id],
                              f"tags.`{PARENT_TAG}` = '{parent_id}'")
    assert sorted(r.info.run_name for r in runs) == [f"t{i}" for i in range(RUNS)]
    for r in runs:
        i = int(r.info.run_name[1:])
        assert r.info.status == "FINISHED" and r.data.params["seed"] == str(i)
        hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss"))
        assert hist == [(s, 1.0 / s + i) for s in range(1, STEPS + 1)]  # each step once, its own values
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "window")) == \
            list(range(1, STEPS + 1))
    state = load_state(tmp_path / "j")
    last = max(p.seq for p in state.runs.values())
    assert state.runs[parent].seq == last  # the parent's end is the journal's last record
    assert pending(tmp_path / "j").records == 0


def test_a_lost_create_response_does_not_make_a_second_run(tmp_path, uri):
    """The store made the run but the answer never came back (the fault is injected into
    the writer's client from outside): the retry finds the run by its key tag."""
    w = MlflowWriter(uri, journal_dir=tmp_path / "j", backoff_cap=0.5)
    real = w.client.create_run
    lost = []

    def create_then_lose_the_answer(*args, **kwargs):
        run = real(*args, **kwargs)
        if not lost:
            lost.append(run.info.run_id)
            raise ConnectionError("response lost")
        return run

    w.client.create_run = create_then_lose_the_answer
    key = w.create_run("lost", "only-one")
    for s in range(1, 11):
        w.log_metrics(key, {"loss": float(s)}, s)
    w.terminate(key)
    assert w.close().complete
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lost").experiment_id])
    assert [r.info.run_id for r in runs] == lost  # the first one, found again
    assert sorted(m.step for m in client.get_metric_history(lost[0], "loss")) == list(range(1, 11))


def test_live_chunks_reach_the_delivery_thread_without_a_read_back(tmp_path, uri, monkeypatch):
    """While the delivery thread keeps up, it takes each journaled chunk as the parsed
    records the writer journaled: it reads nothing back from the journal file. A writer
    that continues the journal (a restart) reads what the first one left, and delivers it."""
    from metalearner.tracking import delivery

    read = []
    real = delivery.read_lines

    def spy(*args, **kwargs):
        recs, end = real(*args, **kwargs)
        read.extend(recs)
        return recs, end

    monkeypatch.setattr(delivery, "read_lines", spy)
    w = MlflowWriter(uri, journal_dir=tmp_path / "j")
    key = w.create_run("live", "r")
    for start in range(1, 101, 25):
        assert w.log_rows(key, [{"step": s, "loss": float(s)} for s in range(start, start + 25)]) == start
        w.flush(key)
    assert w.log_rows(key, [{"step": 100, "loss": -1.0}]) is None  # a replayed step: dropped
    w.terminate(key)
    assert w.close().complete
    assert read == []
    client = mlflow.MlflowClient(uri)
    hist = sorted((m.step, m.value) for m in client.get_metric_history(w.run_id(key), "loss"))
    assert hist == [(s, float(s)) for s in range(1, 101)]

    w2 = MlflowWriter(uri, journal_dir=tmp_path / "j", outage_s=0)  # a restart: the journal is read again
    w2.client.log_batch = None  # the store must not be asked again: all of it is delivered
    assert w2.close().complete
    assert len([r for r in read if r.get("op") == "m"]) == 4 * 25


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_write_is_permanent_not_an_outage(tmp_path, uri, status):
    """The store answers 401/403 (no or wrong credentials, no permission; injected into
    the writer's client from outside): nothing waits out the outage allowance, and the
    error is kept for the report."""
    from mlflow.exceptions import MlflowException, get_error_code

    from metalearner.tracking import is_permanent

    refused = MlflowException(f"API request failed with code {status}", error_code=get_error_code(status))
    assert is_permanent(refused)
    w = MlflowWriter(uri, journal_dir=tmp_path / "j", outage_s=300)

    def refuse(*args, **kwargs):
        raise refused

    w.client.create_run = refuse
    key = w.create_run("refused", "r")
    w.flush()
    t0 = time.monotonic()
    assert w.run_id(key, timeout=300) is None  # MlflowSink.start's wait: over at the refusal
    left = w.close()
    assert time.monotonic() - t0 < 30
    assert not left.complete and any(f"code {status}" in e for e in left.errors)
