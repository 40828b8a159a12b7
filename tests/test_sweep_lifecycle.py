"""Sweeps that survive: real ``metalearner sweep`` processes, real signals, a real local Ray
(2 CPUs) and a real MLflow store: the chained-fault sweep writes to a real `mlflow server` on
127.0.0.1 (the failed-arm sweep to SQLite). Faults come from outside (signals to the driver,
or to a trial's worker process found by the pid its results carry, checked to be a
descendant of the sweep this test started), then every child run is audited through the
MLflow client: steps exactly 1..N for each trace key, nothing lost, nothing duplicated.

To keep CI short, one sweep takes three faults in a row, each in its own phase and on its
own runs, so that the audit attributes each: (1) SIGKILL of a search trial's worker,
(2) one SIGINT to the driver during the search, then ``--resume``, (3) SIGKILL of the
driver during the comparison, then ``--resume`` again. Each scenario prints one line of
the fault matrix (``pytest -s``); ``FAULT_MATRIX=FILE`` collects them.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import Sweep, history, wait_for
from test_outage import Server, _free_port

from metalearner.trace import STEP_KEYS as TRACE_KEYS

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
SPEC = {
    "name": "faulty",
    "description": "lifecycle tests",
    "task": {"name": "recall", "n_pairs": 4, "distance": 16},
    "model": {"preset": "tiny", "window": 8},
    "train": {"steps": STEPS, "batch_size": 8, "seq_len": 32, "report_every": 5, "checkpoint_every": 10,
              "eval_every": 10, "eval_batches": 1, "lr": 0.01},
    "seeds": [0],
    "resources": {"cpus_per_trial": 1, "max_failures": 2},
    "arms": [
        {"name": "static", "controller": {"name": "static"}},
        {"name": "tuned", "controller": {"name": "ewma", "beta": 0.5, "threshold": 0.0},
         "search": {"searcher": "random", "num_samples": 2, "seed": 7,
                    "space": {"controller.factor": {"uniform": [1.01, 1.3]}}}},
    ],
}
CHILDREN = 4  # 2 search trials + static and the confirmed tuned arm at equal steps


class Journal:
    """Reads the sweep's tracking journal as the driver appends it (each report's points
    are fsync'd there in the Tune callback): per child run key, its phase and last step.

    Args:
        tmp: the folder the sweep runs in (its storage is ``tmp/ray``).
        name: the spec's name (the sweep's folder is ``ray/NAME-STAMP``).
    """

    def __init__(self, tmp: Path, name: str = "faulty") -> None:
        self.tmp, self.name, self.path, self.offset = tmp, name, None, 0
        self.phase: dict[str, str] = {}
        self.step: dict[str, int] = {}

    def poll(self) -> None:
        if self.path is None:
            found = glob.glob(str(self.tmp / "ray" / f"{self.name}-*" / "tracking" / "journal.jsonl"))
            if not found:
                return
            self.path = Path(found[0])
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            rec = json.loads(line)
            if rec["op"] == "run" and rec["run"].startswith("trial-"):
                self.phase[rec["run"]] = rec["tags"]["metalearner.phase"]
            elif rec["op"] == "m":
                self.step[rec["run"]] = rec["step"]

    def reported(self, phase: str) -> str | None:
        """A trial of ``phase`` that has reported."""
        self.poll()
        return next((key[len("trial-"):] for key in self.step if self.phase.get(key) == phase), None)

    def past_checkpoint(self, phase: str, trial: str | None = None, above: int = 0) -> str | None:
        """A trial of ``phase`` (``trial``: that one) whose last report is past its last
        checkpoint (checkpoints every 10 steps, reports every 5), above step ``above``, and
        not its last: a restore from that checkpoint repeats steps already stored."""
        self.poll()
        for key, step in self.step.items():
            tid = key[len("trial-"):]
            if self.phase.get(key) == phase and trial in (None, tid) and step % 10 == 5 and above < step < STEPS:
                return tid
        return None


def worker_pid(tmp: Path, trial: str) -> int | None:
    """The pid of the worker process that sent the trial's last result (Tune's ``pid``,
    in the result log that Tune's JSON logger writes just after our callback ran)."""
    for path in glob.glob(str(tmp / "ray" / "faulty-*" / f"*-{trial}" / "result.json")):
        lines = Path(path).read_text().splitlines()
        if lines and lines[-1].endswith("}"):
            return json.loads(lines[-1])["pid"]
    return None


SERVERS: dict[Path, str] = {}  # test folder -> the URI of the `mlflow server` its sweep writes to


def uri(tmp: Path) -> str:
    return SERVERS.get(tmp, f"sqlite:///{tmp / 'mlflow.db'}")


def sweep_runs(tmp: Path):
    client = mlflow.MlflowClient(tracking_uri=uri(tmp))
    exp = client.get_experiment_by_name("faulty")
    parents = client.search_runs([exp.experiment_id], "tags.`metalearner.kind` = 'sweep'")
    assert len(parents) == 1, [p.info.run_id for p in parents]  # a resume keeps the one parent run
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'",
                              max_results=1000)
    return client, parents[0], kids


def steps_of(client, run) -> dict[str, list[int]]:
    """Each trace key's stored steps (a run interrupted before its first report has no params yet)."""
    keys = [k for k in TRACE_KEYS if not (k == "loss_ewma" and run.data.params.get("controller.name") == "static")]
    return {k: [s for s, _ in history(client, run.info.run_id, k)] for k in [*keys, "val_loss"]}


def lost_and_duplicated(client, run) -> tuple[int, int]:
    """Against the contract: steps 1..STEPS per trace key, val_loss at every report."""
    lost = dup = 0
    for key, got in steps_of(client, run).items():
        want = list(range(5, STEPS + 1, 5)) if key == "val_loss" else list(range(1, STEPS + 1))
        lost += len(set(want) - set(got))
        dup += len(got) - len(set(got))
    return lost, dup


def matrix(name: str, rc: str, lost: int, dup: int, seconds: float) -> None:
    line = f"FAULT-MATRIX | {name} | exit {rc} | lost {lost} | duplicated {dup} | {seconds:.0f} s"
    print(line)
    if os.environ.get("FAULT_MATRIX"):
        with open(os.environ["FAULT_MATRIX"], "a") as fh:
            fh.write(line + "\n")


def test_worker_kill_interrupt_and_driver_kill_lose_and_duplicate_nothing(tmp_path, empty_store):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    runs_of: dict[str, set[str]] = {}  # scenario -> the trial ids its fault hit

    # the sweep writes to a real `mlflow server` on 127.0.0.1 (SQLite behind it, an empty store
    # to start from), its own process group
    (tmp_path / "server").mkdir()
    shutil.copyfile(empty_store, tmp_path / "server" / "server.db")
    server = Server(tmp_path / "server", _free_port())
    server.start()
    SERVERS[tmp_path] = server.uri
    try:
        _chained_faults(tmp_path, spec, runs_of)
    finally:
        server.kill()
        SERVERS.pop(tmp_path, None)


def _chained_faults(tmp_path: Path, spec: Path, runs_of: dict[str, set[str]]) -> None:
    # ---- 1: SIGKILL of a search trial's worker: Tune restarts it from its checkpoint
    first = Sweep(tmp_path, str(spec), "--storage", str(tmp_path / "ray"), "--tracking-uri", uri(tmp_path))
    try:
        t1 = time.monotonic()
        journal = Journal(tmp_path)
        victim = wait_for(lambda: journal.past_checkpoint("search"), first, what="a search report past a checkpoint")
        pid = wait_for(lambda: worker_pid(tmp_path, victim), first, what="the trial's result log")
        assert pid in first.descendants(), "the trial's worker is a process this sweep started"
        os.kill(pid, signal.SIGKILL)
        runs_of["worker"] = {victim}
        # ---- 2: once the restarted trial has new points past a checkpoint, one SIGINT to the driver
        killed_at = journal.step[f"trial-{victim}"]
        again = wait_for(lambda: journal.past_checkpoint("search", trial=victim, above=killed_at),
                         first, what="the restarted trial's report past a checkpoint")
        scenario1_s = time.monotonic() - t1
        t2 = time.monotonic()
        first.proc.send_signal(signal.SIGINT)
        rc1 = first.wait()
        out1 = first.output()
    finally:
        first.close()
    scenario2_first_s = time.monotonic() - t2
    assert rc1 == 130, out1
    (folder,) = {Path(p).parent for p in glob.glob(str(tmp_path / "ray" / "*" / "sweep_state.json"))}
    assert f"resume it with: metalearner sweep --resume {folder} --tracking-uri {uri(tmp_path)}" in out1, out1
    client, parent, kids = sweep_runs(tmp_path)
    assert parent.info.status == "KILLED" and "metalearner.interrupted" in parent.data.tags
    assert {k.data.tags["metalearner.phase"] for k in kids} == {"search"}, "no confirm/compare on an interrupt"
    unfinished = [k for k in kids if k.info.status != "FINISHED"]
    assert again in [k.data.tags["metalearner.trial_id"] for k in unfinished]
    assert all(k.info.status == "KILLED" and "metalearner.interrupted" in k.data.tags for k in unfinished)
    for k in kids:  # what is stored so far: a prefix 1..k of each key, each step once
        for key, got in steps_of(client, k).items():
            assert got == sorted(set(got)) and (key == "val_loss" or got == list(range(1, len(got) + 1))), key
    runs_of["sigint"] = {k.data.tags["metalearner.trial_id"] for k in unfinished}
    search_kids = {k.info.run_id for k in kids}
    search_state = json.loads((tmp_path / "ray" / folder.name / "sweep_state.json").read_text())
    done_before = {k.data.tags["metalearner.trial_id"]: k.info.end_time for k in kids if k.info.status == "FINISHED"}

    # ---- resume; 3: SIGKILL of the driver during the comparison, then resume again
    second = Sweep(tmp_path, "--resume", str(folder))
    try:
        t3 = time.monotonic()
        journal = Journal(tmp_path)
        wait_for(lambda: journal.past_checkpoint("compare"), second, what="a comparison report past a checkpoint")
        scenario2_resume_s = time.monotonic() - t3
        t3 = time.monotonic()
        second.descendants()
        second.proc.send_signal(signal.SIGKILL)
        rc2 = second.wait()
    finally:
        second.close()  # the Ray processes the killed driver left, by pid
    assert rc2 == -signal.SIGKILL
    # the interrupted search went on in the resumed driver; a trial it had finished did not run again
    client, _, kids = sweep_runs(tmp_path)
    assert {k.data.tags["metalearner.trial_id"]: k.info.end_time for k in kids
            if k.data.tags["metalearner.trial_id"] in done_before} == done_before
    assert json.loads((folder / "sweep_state.json").read_text())["phases"]["search:tuned"]["done"]
    rc3, out3 = Sweep(tmp_path, "--resume", str(folder)).finish()
    scenario3_s = time.monotonic() - t3
    assert rc3 == 0, out3
    assert "resumed" in out3 and "best 'tuned' controller" in out3

    client, parent_after, kids = sweep_runs(tmp_path)
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    assert "metalearner.interrupted" not in parent_after.data.tags
    assert len(kids) == CHILDREN, [k.info.run_name for k in kids]
    assert search_kids <= {k.info.run_id for k in kids}  # the same child runs went on
    assert search_state["phases"]["search:tuned"]["tune_dir"].endswith(f"faulty-tuned-{search_state['stamp']}")
    counts = {}
    for k in kids:
        assert k.info.status == "FINISHED" and "metalearner.interrupted" not in k.data.tags, k.info.run_name
        lost, dup = lost_and_duplicated(client, k)
        assert (lost, dup) == (0, 0), (k.info.run_name, steps_of(client, k))
        counts[k.data.tags["metalearner.trial_id"]] = (lost, dup)
    runs_of["driver"] = {k.data.tags["metalearner.trial_id"] for k in kids if k.data.tags["metalearner.phase"] == "compare"}

    def total(scenario):
        return [sum(counts[t][i] for t in runs_of[scenario]) for i in (0, 1)]

    matrix("1 SIGKILL of a trial's worker", "0 (after the resumes)", *total("worker"), scenario1_s)
    matrix("2 SIGINT to the driver, then --resume", f"{rc1} then 0", *total("sigint"),
           scenario2_first_s + scenario2_resume_s)
    matrix("3 SIGKILL of the driver, then --resume", f"killed then {rc3}", *total("driver"), scenario3_s)


@pytest.mark.usefixtures("sqlite_uri")  # an empty store at uri(tmp_path)
def test_a_search_whose_trials_all_fail_is_a_failed_arm(tmp_path):
    # the one search trial fails for real: its worker is killed at its first report, and
    # resources.max_failures=0 allows no restart. No best, nothing exported or confirmed.
    spec = yaml.safe_load(yaml.safe_dump(SPEC))
    spec["arms"] = spec["arms"][1:]
    spec["arms"][0]["search"]["num_samples"] = 1
    spec["resources"]["max_failures"] = 0
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    sweep = Sweep(tmp_path, "spec.yaml", "--storage", str(tmp_path / "ray"), "--tracking-uri", uri(tmp_path))
    try:
        journal = Journal(tmp_path)
        victim = wait_for(lambda: journal.reported("search"), sweep, what="a first search report")
        pid = wait_for(lambda: worker_pid(tmp_path, victim), sweep, what="the trial's result log")
        assert pid in sweep.descendants()
        os.kill(pid, signal.SIGKILL)
        rc = sweep.wait()
        out = sweep.output()
    finally:
        sweep.close()
    assert rc == 1, out
    assert "arm 'tuned' failed: no trial completed" in out and "its first trial error:" in out, out
    assert "best 'tuned' controller" not in out
    (folder,) = {Path(p).parent for p in glob.glob(str(tmp_path / "ray" / "*" / "sweep_state.json"))}
    # the first trial error in full (every line of trial_errors.log's first entry), not one line
    first = (folder / "trial_errors.log").read_text().split("==== ")[1].strip().splitlines()
    shown = [line.strip() for line in out.split("its first trial error:")[1].splitlines()]
    assert len(first) > 3 and all(line.strip() in shown for line in first), out
    assert "ActorDiedError" in "\n".join(first)
    assert not (folder / "best_tuned.yaml").exists()
    client, parent, kids = sweep_runs(tmp_path)
    assert parent.info.status == "FAILED"
    assert [(k.data.tags["metalearner.phase"], k.info.status) for k in kids] == [("search", "FAILED")]


def test_first_signal_stops_gracefully_and_a_second_exits_at_once(tmp_path):
    # the CLI's handler on its own (no Ray): SIGTERM asks the sweep to stop, SIGINT then exits 130 at once
    script = (
        "import os, signal, sys, time\n"
        "from metalearner.cli import stop_on_signals\n"
        "calls = []\n"
        "with stop_on_signals(lambda: calls.append(1) or print('stop asked', flush=True), 'RESUME-CMD'):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.5)\n"
        "    print('still running', len(calls), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 130, r.stderr
    assert r.stdout.splitlines() == ["stop asked", "still running 1"]
    assert "SIGINT again: exiting now; resume with: RESUME-CMD" in r.stderr
    assert time.monotonic() - t0 < 25  # did not sleep on
