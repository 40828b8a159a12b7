"""Tune payloads and the object store (issue 9): Tune results carry scalars only (the trace
chunks reach the driver through the sweep's inbox, `trainables.channel`), and the speech
features reach Ray workers as zero-copy views of the object store."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import children, history

from trainables.reporting import PAYLOAD_KEYS

pytestmark = pytest.mark.usefixtures("local_ray")


# ---------------------------------------------------------------- what Tune keeps


def tune_records(storage: Path) -> list[tuple[str, dict]]:
    """(file, result) of every result Tune wrote under ``storage``: each line of each
    trial's ``result.json``, each row of ``progress.csv``, and each trial's last result in
    the experiment state."""
    out: list[tuple[str, dict]] = []
    for f in storage.rglob("result.json"):
        out += [(str(f), json.loads(line)) for line in f.read_text().splitlines() if line.strip()]
    for f in storage.rglob("progress.csv"):
        with open(f, newline="") as fh:
            out += [(str(f), row) for row in csv.DictReader(fh)]
    for f in storage.rglob("experiment_state-*.json"):
        for _, run_meta in json.loads(f.read_text())["trial_data"]:
            meta = json.loads(run_meta) if isinstance(run_meta, str) else run_meta
            out.append((str(f), meta.get("last_result") or {}))
    return out


def payload_leaks(storage: Path) -> list[str]:
    """Where a trace chunk, settings or params (or any list) sits in what Tune wrote under
    ``storage``; empty when Tune's results hold scalars only (Tune's own ``config`` aside).
    The sweeps of test_sweep.py (both engines, ASHA, PBT) assert it on their own output."""
    records = tune_records(storage)
    assert records, f"no Tune results under {storage}"
    leaks = []
    for where, result in records:
        for key, value in result.items():
            flat_payload = any(key == k or key.startswith(f"{k}/") for k in PAYLOAD_KEYS)
            if flat_payload or (key != "config" and isinstance(value, (list, dict))):
                leaks.append(f"{where}: {key}")
    return leaks


# ---------------------------------------------------------------- the inbox


def test_an_orphan_chunk_is_journaled_once_with_the_replayed_report(tmp_path):
    """A worker killed between its put and its report leaves a chunk with no report; the
    trial restarts from its step-10 checkpoint and replays steps 11..20: the orphan is taken
    with the replayed report of step 20 and each step lands once. A chunk put for a later
    step waits for its own report."""
    from metalearner.tracking import MlflowWriter
    from trainables.callback import MlflowTraceCallback
    from trainables.channel import close_inbox, inbox_actor, inbox_name, open_inbox

    name = open_inbox(inbox_name(f"orphan-{tmp_path.name}"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    writer = MlflowWriter(uri, journal_dir=tmp_path / "journal")
    parent = writer.create_run("orphan", "parent", {"metalearner.kind": "sweep"}, key="sweep")
    cb = MlflowTraceCallback(writer, "orphan", parent)
    trial = SimpleNamespace(trial_id="t0", config={"cell": {"train": {"seed": 0}}, "meta": {"arm": "a"}},
                            last_result={}, status="RUNNING")
    inbox = inbox_actor(name)

    def put(first: int, last: int, value: float, params: bool = False) -> None:
        steps = list(range(first, last + 1))
        payload = {"rows": [{"step": s, "loss": value} for s in steps]}
        if params:
            payload["params"] = {"controller.name": "ewma"}
        inbox.put.remote("t0", last, payload)

    def report(step: int) -> None:
        cb.on_trial_result(0, [trial], trial, {"step": step, "total_steps": 30, "loss": 1.0, "inbox": name})

    try:
        cb.on_trial_start(0, [trial], trial)
        put(1, 10, 1.0, params=True)
        report(10)
        put(11, 20, 2.0)  # the first attempt's chunk; its worker dies before tune.report
        put(11, 20, 3.0)  # the restarted attempt, from the step-10 checkpoint
        put(21, 30, 4.0)  # already put, its report not yet handled
        report(20)
        import ray

        assert ray.get(inbox.pending.remote()) == {"t0": 1}  # the step-30 chunk waits for its report
        report(30)
        assert ray.get(inbox.pending.remote()) == {}
        trial.last_result = {"step": 30, "total_steps": 30, "inbox": name}
        cb.on_trial_complete(0, [trial], trial)
        writer.terminate(parent)
        assert writer.close().complete
    finally:
        close_inbox(name)
    client, _, (run,) = children(uri, writer.run_id(parent))
    assert history(client, run.info.run_id, "loss") == (
        [(s, 1.0) for s in range(1, 11)] + [(s, 2.0) for s in range(11, 21)] + [(s, 4.0) for s in range(21, 31)])
    assert run.data.params["controller.name"] == "ewma"



def test_a_gone_inbox_is_named_in_the_error(tmp_path):
    """The driver's callback cannot reach the inbox (ended, or Ray lost it): the error says
    which inbox and which trial, not a bare Ray error."""
    from trainables.channel import close_inbox, inbox_name, take_payloads

    name = inbox_name(f"gone-{tmp_path.name}")  # no such actor
    with pytest.raises(RuntimeError, match=f"trace inbox '{name}'.*trial t0's chunks up to step 5"):
        take_payloads("t0", {"step": 5, "inbox": name})
    close_inbox(name)  # closing a gone inbox is harmless


# ---------------------------------------------------------------- the object store


@pytest.fixture(scope="module")
def noise_corpus(tmp_path_factory) -> Path:
    """A tiny audiofolder of seeded noise clips (no speech synthesizer needed)."""
    import soundfile as sf

    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        name = f"clip{i}.wav"
        sf.write(folder / name, (0.1 * rng.standard_normal(1600 * (i + 2))).astype(np.float32), 16_000)
        rows.append((name, "one two"[: i + 1]))
    with open(folder / "metadata.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("file_name", "transcription"), *rows])
    return folder


def test_speech_features_reach_a_worker_as_a_read_only_view_of_the_object_store(noise_corpus):
    """What ``tune.with_parameters`` does with the task (ray.put on the driver, ray.get in
    the trial's worker, then `shared_task`'s copy): the features array is not the worker's
    own memory but a read-only view of the object store's copy, and it batches the same."""
    import ray
    import torch

    from metalearner.config import load_run_config
    from metalearner.tasks import build_task
    from trainables.reporting import shared_task, task_key

    cfg = load_run_config({"task": {"name": "speech", "data_dir": str(noise_corpus), "val_fraction": 0.34,
                                    "n_mels": 16},
                           "train": {"batch_size": 2, "seed": 0}})
    t = cfg.train
    task = build_task(cfg.task, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed, eval_batches=1)
    ref, key = ray.put(task), task_key(cfg)  # what tune.with_parameters puts

    @ray.remote(num_cpus=0)
    def in_a_worker(refs: list) -> tuple:
        mine = shared_task(ray.get(refs[0]), key, cfg)  # what the trainable does with it
        f = mine._features
        return f.flags.writeable, f.flags.owndata, mine.train_batch(3)["features"]

    writeable, owndata, batch = ray.get(in_a_worker.remote([ref]))
    assert writeable is False and owndata is False  # a view of shared memory, not a private copy
    assert torch.equal(batch, task.train_batch(3)["features"])
