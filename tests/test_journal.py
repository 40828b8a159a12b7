"""The tracking journal with real files, and the journaled writer against a real SQLite
store: torn lines after a crash, watermark recovery, exact redelivery, no drops."""

import json
import socket

import mlflow
import pytest

from metalearner.journal import (
    JOURNAL_FILE,
    STATE_FILE,
    Journal,
    JournalError,
    load_state,
    pending,
    read_lines,
    save_state,
)
from metalearner.tracking import MlflowWriter, sync_journal


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dead_uri(monkeypatch):
    """A tracking server address where nothing listens (each request fails at once)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return f"http://127.0.0.1:{_free_port()}"


def steps(uri, run_id, key="loss"):
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


# ---------------------------------------------------------------- the file


def test_a_torn_last_line_is_ignored_when_read_and_cut_when_reopened(tmp_path):
    j = Journal(tmp_path / "j")
    j.append([{"op": "m", "run": "a", "step": s, "ts": 0, "v": {"loss": 1.0}} for s in (1, 2, 3)])
    j.close()
    path = tmp_path / "j" / JOURNAL_FILE
    good = path.read_bytes()
    with open(path, "ab") as fh:  # a crash in the middle of a write
        fh.write(b'{"op":"m","run":"a","step":4,"ts":0,"v":{"lo')
    recs, offset = read_lines(path)
    assert [r.get("step") for r in recs] == [None, 1, 2, 3] and offset == len(good)
    j = Journal(tmp_path / "j")
    assert j.repaired_bytes > 0 and path.read_bytes() == good
    assert j.next_seq == 4  # numbering continues after the last whole record
    j.append([{"op": "m", "run": "a", "step": 4, "ts": 0, "v": {"loss": 1.0}}])
    j.close()
    recs, _ = read_lines(path)
    assert [r.get("step") for r in recs] == [None, 1, 2, 3, 4] and [r.get("n") for r in recs[1:]] == [1, 2, 3, 4]


def test_a_whole_line_of_garbage_after_a_crash_is_cut_too(tmp_path):
    j = Journal(tmp_path / "j")
    j.append([{"op": "end", "run": "a", "status": "FINISHED"}])
    j.close()
    path = tmp_path / "j" / JOURNAL_FILE
    good = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(b"\x00\x00\x00\n")  # zeroed block: a complete but unreadable last line
    Journal(tmp_path / "j").close()
    assert path.read_bytes() == good


def test_garbage_inside_the_journal_is_an_error_naming_the_file(tmp_path):
    j = Journal(tmp_path / "j")
    j.close()
    path = tmp_path / "j" / JOURNAL_FILE
    path.write_bytes(path.read_bytes() + b"not json\n" + b'{"op":"end","run":"a","n":1,"status":"x"}\n')
    with pytest.raises(JournalError, match=JOURNAL_FILE):
        read_lines(path)


def test_one_process_at_a_time(tmp_path):
    j = Journal(tmp_path / "j")
    with pytest.raises(JournalError, match="in use"):
        Journal(tmp_path / "j")
    j.close()
    Journal(tmp_path / "j").close()


def test_state_is_replaced_atomically_and_read_back(tmp_path):
    from metalearner.journal import RunProgress, State

    save_state(tmp_path, State(runs={"a": RunProgress("r1", 7)}, errors=["e"], tracking_uri="u"))
    st = load_state(tmp_path)
    assert st.runs["a"].run_id == "r1" and st.runs["a"].seq == 7 and st.errors == ["e"]
    assert not (tmp_path / (STATE_FILE + ".tmp")).exists()


# ---------------------------------------------------------------- the writer on a journal


def test_watermark_recovered_from_the_journal_after_a_restart(tmp_path, sqlite_uri):
    w = MlflowWriter(sqlite_uri, journal_dir=tmp_path / "j")
    key = w.create_run("exp", "r", key="trial-1")
    for s in range(1, 11):
        w.log_metrics(key, {"loss": float(s)}, s)
    assert w.close().complete
    run_id = w.run_id(key)
    w2 = MlflowWriter(sqlite_uri, journal_dir=tmp_path / "j")  # a new process on the same journal
    assert w2.last_step(key) == 10
    assert w2.create_run("exp", "r", key="trial-1") == key  # the same run, reopened
    assert not w2.log_metrics(key, {"loss": -1.0}, 10)  # a restored trial repeats step 10
    for s in range(11, 16):
        assert w2.log_metrics(key, {"loss": float(s)}, s)
    assert w2.close().complete
    assert w2.run_id(key) == run_id
    assert steps(sqlite_uri, run_id) == list(range(1, 16))
    assert len(mlflow.MlflowClient(sqlite_uri).search_runs(
        [mlflow.MlflowClient(sqlite_uri).get_experiment_by_name("exp").experiment_id])) == 1


@pytest.mark.parametrize("lost", ["watermark", "run id too"])
def test_redelivery_after_a_crash_writes_nothing_twice(tmp_path, sqlite_uri, lost):
    """A crash after the store took a batch but before delivered.json said so: the next
    writer sends none of those points again and finds the run instead of making another."""
    folder = tmp_path / "j"
    w = MlflowWriter(sqlite_uri, journal_dir=folder)
    key = w.create_run("exp", "r", key="k")
    for s in range(1, 21):
        w.log_metrics(key, {"loss": float(s), "lr": 0.1}, s)
    w.log_extra_metrics(key, {"controller.factor": 1.1}, 5)
    w.terminate(key)
    assert w.close().complete
    run_id = w.run_id(key)
    st = load_state(folder)
    st.runs[key].seq = 1 if lost == "watermark" else 0  # only the creation (or nothing) recorded
    if lost != "watermark":
        st.runs[key].run_id = None
    save_state(folder, st)
    assert pending(folder).points == 41

    w2 = MlflowWriter(sqlite_uri, journal_dir=folder)
    sent = []
    real = w2.client.log_batch
    w2.client.log_batch = lambda run, metrics=(), params=(), tags=(), **kw: (
        sent.extend(metrics), real(run, metrics=metrics, params=params, tags=tags, **kw))[1]
    for s in range(21, 26):  # the trial goes on
        w2.log_metrics(key, {"loss": float(s), "lr": 0.1}, s)
    assert w2.close().complete
    assert sorted((m.key, m.step) for m in sent) == sorted((k, s) for s in range(21, 26) for k in ("loss", "lr"))
    assert w2.run_id(key) == run_id
    client = mlflow.MlflowClient(sqlite_uri)
    assert len(client.search_runs([client.get_experiment_by_name("exp").experiment_id])) == 1
    for k in ("loss", "lr"):
        assert steps(sqlite_uri, run_id, k) == list(range(1, 26))
    assert steps(sqlite_uri, run_id, "controller.factor") == [5]


def test_an_unreachable_store_loses_nothing_and_sync_completes_the_runs(tmp_path, dead_uri, sqlite_uri):
    folder = tmp_path / "exp" / "tracking"
    w = MlflowWriter(dead_uri, journal_dir=folder, outage_s=0, flush_every=50)
    parent = w.create_run("exp", "sweep", {"metalearner.kind": "sweep"}, key="sweep")
    w.log_params(parent, {"seeds": "0,1"})
    kids = [w.create_run("exp", f"t{i}", {"metalearner.kind": "trial"}, parent=parent, key=f"trial-{i}")
            for i in range(3)]
    for s in range(1, 301):
        for k in kids:
            assert w.log_metrics(k, {"loss": 1.0 / s, "window": 8.0}, s)  # never dropped, never blocked
    w.set_tags(kids[0], {"metalearner.stopped_early": "no"})
    for k, status in zip(kids, ("FINISHED", "KILLED", "FAILED")):
        w.terminate(k, status)
    w.terminate(parent)
    left = w.close()
    assert not left.complete and left.points == 3 * 300 * 2 and left.runs == 4
    assert any("unreachable" in e for e in left.errors)

    left, written = sync_journal(folder, sqlite_uri, outage_s=5)
    assert left.complete and written == 1800
    client = mlflow.MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name("exp")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"sweep", "t0", "t1", "t2"}
    assert runs["sweep"].data.params["seeds"] == "0,1" and runs["sweep"].info.status == "FINISHED"
    for i, status in enumerate(("FINISHED", "KILLED", "FAILED")):
        r = runs[f"t{i}"]
        assert r.info.status == status
        assert r.data.tags["mlflow.parentRunId"] == runs["sweep"].info.run_id
        for k in ("loss", "window"):
            assert steps(sqlite_uri, r.info.run_id, k) == list(range(1, 301))
    assert runs["t0"].data.tags["metalearner.stopped_early"] == "no"
    assert json.loads((folder / STATE_FILE).read_text())["errors"] == []  # a sync that completes clears them
    left, written = sync_journal(folder, sqlite_uri)  # again: nothing to do, nothing twice
    assert left.complete and written == 0


def test_a_small_memory_queue_still_delivers_everything(tmp_path, sqlite_uri):
    w = MlflowWriter(sqlite_uri, journal_dir=tmp_path / "j", max_queue=8, flush_every=64)
    key = w.create_run("exp", "r")
    for s in range(1, 501):
        w.log_metrics(key, {"loss": float(s), "lr": 0.1}, s)
    assert w.close().complete
    assert steps(sqlite_uri, w.run_id(key)) == list(range(1, 501))


def test_a_temporary_journal_is_removed_once_delivered(sqlite_uri):
    w = MlflowWriter(sqlite_uri)
    key = w.create_run("exp", "r")
    w.log_metrics(key, {"loss": 1.0}, 1)
    assert w.close().complete
    assert not w.journal_dir.exists()
