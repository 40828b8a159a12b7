"""A PBT/PB2 perturbation as the receiving trial records it (`metalearner.tracking.lineage`),
and how the sweep's callback writes it: the real `MlflowTraceCallback` and a real journaled
writer into a real SQLite store, fed the reports a population member makes (a report that
names no inbox carries its own payload, so no Ray cluster is needed), across a resumed
driver. The whole path with Ray's PBT runs in tests/test_sweep.py (the pbt_ewma smoke)."""

import json
from types import SimpleNamespace

import mlflow
import pytest
from conftest import history
from ray.tune import Checkpoint

from metalearner.sweep_state import SweepState
from metalearner.tracking import NOTE_TAG, RUN_COLOR_TAG, MlflowWriter
from metalearner.tracking.lineage import PERTURBATIONS_TAG, Perturbation, perturbations_in
from trainables.callback import MlflowTraceCallback
from trainables.reporting import ORIGIN_FILE, ORIGIN_KEY, ROWS_KEY, SETTINGS_KEY


def test_a_perturbation_reads_as_one_line_and_back():
    p = Perturbation(step=21, donor_trial="3f2a1_00001", donor_run="9c" * 16, donor_step=20,
                     settings=(("controller.factor", 1.0629712, 1.001), ("controller.window", None, 64.0)))
    assert p.text() == ("at step 21: from trial 3f2a1_00001 (run " + "9c" * 16 + ") at its step 20; "
                        "controller.factor 1.06297 → 1.001, controller.window ? → 64")
    back = Perturbation.parse(p.text())
    assert back.settings == (("controller.factor", 1.06297, 1.001), ("controller.window", None, 64.0))
    assert (back.step, back.donor_trial, back.donor_run, back.donor_step) == (21, "3f2a1_00001", "9c" * 16, 20)
    assert "**PBT perturbation at step 21**: copied the weights of trial `3f2a1_00001`" in p.note("pbt")
    tags = {"metalearner.perturb.2": p.text(), "metalearner.perturb.1": Perturbation(11, "a", "?", 10, ()).text(),
            "metalearner.perturb.x": "junk", "metalearner.perturb.3": "not a record", PERTURBATIONS_TAG: "3"}
    assert [q.step for q in perturbations_in(tags)] == [11, 21]  # in order; unreadable values skipped
    with pytest.raises(ValueError, match="not a perturbation record"):
        Perturbation.parse("at step x")


def member(tid, factor):
    return SimpleNamespace(trial_id=tid, last_result={}, checkpoint=None,
                           config={"controller": {"name": "ewma", "factor": factor}, "train": {"seed": 0},
                                   "meta": {"arm": "pbt", "phase": "search"}})


def report(cb, trial, first, last, factor, origin=None):
    rows = [{"step": s, "loss": 1.0 / s, "window": 8.0} for s in range(first, last + 1)]
    result = {"step": last, ROWS_KEY: rows, SETTINGS_KEY: {"controller.factor": factor, "controller.name": "ewma"}}
    if origin:
        result[ORIGIN_KEY] = origin
    cb.on_trial_result(0, [], trial, result)


def checkpoint_of(folder, trial_id, step):
    """A checkpoint as `TrialSink.report` leaves it: stamped with the trial and step."""
    folder.mkdir()
    (folder / ORIGIN_FILE).write_text(json.dumps({"trial_id": trial_id, "step": step}))
    return Checkpoint.from_directory(str(folder))


def test_the_callback_records_each_perturbation_on_the_receiving_run(sqlite_uri, tmp_path):
    journal = tmp_path / "tracking"
    state = SweepState.create(tmp_path, sqlite_uri, "stamp", str(tmp_path / "ray"))  # saved as it changes

    def driver():  # the sweep's writer, state (trial -> run key) and the phase's callback
        writer = MlflowWriter(sqlite_uri, journal_dir=journal)
        parent = writer.create_run("pbt", "sweep", key="sweep")
        cb = MlflowTraceCallback(writer, "pbt", parent, mutable_keys=["controller.factor"],
                                 colours={"pbt": "#d62728"}, scheduler="pbt", state=state,
                                 phase="search:pbt")
        return writer, cb

    writer, cb = driver()
    a, b = member("t_a", 1.1), member("t_b", 1.3)
    for t in (a, b):
        cb.on_trial_start(0, [], t)
    report(cb, b, 1, 5, 1.3)
    report(cb, a, 1, 5, 1.1)
    report(cb, a, 6, 10, 1.1)
    report(cb, a, 11, 15, 1.2, origin={"trial_id": "t_b", "step": 10})  # exploited b's step-10 checkpoint
    report(cb, a, 16, 20, 1.2, origin={"trial_id": "t_a", "step": 15})  # restarted from its own: no perturbation
    key_a, key_b = cb.run_ids["t_a"], cb.run_ids["t_b"]
    writer.flush()
    b_run = writer.run_id(key_b, timeout=30)  # in the store now...
    report(cb, b, 6, 10, 1.3)  # ...so the next report writes the record a's exploit left waiting for it
    assert writer.close().complete

    writer, cb = driver()  # a resumed driver: the journal goes on, and so do the records
    a.config["controller"]["factor"] = 1.25
    cb.on_trial_start(0, [], a)
    report(cb, a, 21, 25, 1.25, origin={"trial_id": "t_b", "step": 20})
    # at the last report PBT exploited once more: a restarted from b's checkpoint and ended at once
    a.config["controller"]["factor"], a.checkpoint = 1.4, checkpoint_of(tmp_path / "ck", "t_b", 25)
    cb.on_trial_complete(0, [], a)
    # c took b's step-5 checkpoint and trained on from it (recorded with that report); its latest
    # checkpoint is still b's (its last report had none): not a second perturbation
    c = member("t_c", 1.1)
    cb.on_trial_start(0, [], c)
    report(cb, c, 1, 5, 1.1)
    report(cb, c, 6, 10, 1.2, origin={"trial_id": "t_b", "step": 5})
    c.checkpoint = checkpoint_of(tmp_path / "ck5", "t_b", 5)
    cb.on_trial_complete(0, [], c)
    assert writer.close().complete
    assert [p.step for p in perturbations_in(mlflow.MlflowClient(sqlite_uri).get_run(
        writer.run_id(cb.run_ids["t_c"])).data.tags)] == [6]

    client = mlflow.MlflowClient(sqlite_uri)
    run = client.get_run(writer.run_id(key_a))
    tags = run.data.tags
    assert tags[RUN_COLOR_TAG] == "#d62728"  # a population member: its arm's colour, not the search grey
    assert tags[PERTURBATIONS_TAG] == "3"
    assert [(p.step, p.donor_trial, p.donor_run, p.donor_step, p.settings) for p in perturbations_in(tags)] == [
        (11, "t_b", b_run, 10, (("controller.factor", 1.1, 1.2),)),
        (21, "t_b", b_run, 20, (("controller.factor", None, 1.25),)),  # old: not seen by this driver
        (26, "t_b", b_run, 25, (("controller.factor", 1.25, 1.4),))]
    note = tags[NOTE_TAG].split("\n\n")
    assert len(note) == 4 and "**initial** settings" in note[0], note
    assert note[1].startswith("**PBT perturbation at step 11**: copied the weights of trial `t_b`")
    assert note[2].startswith("**PBT perturbation at step 21**") and "`controller.factor` ? → 1.25" in note[2]
    assert note[3].endswith("nothing trained with these settings, and the run's traces end before it.")
    # the settings in force: a point at each report step and at the first step of a new value
    assert history(client, run.info.run_id, "controller.factor") == [
        (1, 1.1), (5, 1.1), (10, 1.1), (11, 1.2), (15, 1.2), (20, 1.2), (21, 1.25), (25, 1.25)]
    assert "metalearner.perturb.1" not in client.get_run(b_run).data.tags  # the donor is not the receiver
