"""Sweeps end to end on a real local Ray (2 CPUs) and a real MLflow store."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from _view import ViewProbe, assert_view_finds_runs
from conftest import children, history
from test_payload import payload_leaks

from metalearner.experiment import load_experiment, parse_experiment
from metalearner.tracking import SEARCH_GREY, arm_colours
from trainables.callback import MlflowTraceCallback
from trainables.sweep import SweepRunner
from trainables.tuning import make_tuner

ROOT = Path(__file__).resolve().parent.parent
from metalearner.trace import STEP_KEYS as TRACE_KEYS  # noqa: E402 - the one definition

pytestmark = pytest.mark.usefixtures("local_ray")


def expected_val_steps(params, last):
    """Evaluation steps of a trial that ran to ``last``: every ``eval_every`` and every
    report (a trial evaluates when it reports), and the final step."""
    n, ev, rep = (int(params[f"train.{k}"]) for k in ("steps", "eval_every", "report_every"))
    return [s for s in range(1, last + 1) if s % ev == 0 or s % rep == 0 or s == n]


def audit(uri, parent_id, expect_children):
    """Parent + children as the trace contract says: each child FINISHED with steps 1..N,
    or KILLED by its scheduler (tagged ``stopped_early``) with steps 1..k; exactly one
    point per step per key, val_loss at its evaluation steps; params and tags present."""
    client, parent, runs = children(uri, parent_id)
    assert parent.data.tags["metalearner.kind"] == "sweep" and parent.info.status == "FINISHED"
    assert len(runs) == expect_children
    experiment = client.get_experiment(parent.info.experiment_id).name
    for r in runs:
        name, params, tags = r.info.run_name, r.data.params, r.data.tags
        n = int(params["train.steps"])
        steps = [s for s, _ in history(client, r.info.run_id, "loss")]
        if r.info.status == "FINISHED":
            assert "metalearner.stopped_early" not in tags, name
            last = n
        else:
            assert r.info.status == "KILLED", (name, r.info.status)
            last = int(re.fullmatch(rf"at step (\d+) of {n}", tags["metalearner.stopped_early"]).group(1))
            assert 0 < last < n, (name, tags["metalearner.stopped_early"])
        assert steps == list(range(1, last + 1)), name
        for key in TRACE_KEYS:
            if key == "loss_ewma" and params["controller.name"] in ("static", "schedule"):
                assert history(client, r.info.run_id, key) == [], name
                continue
            assert [s for s, _ in history(client, r.info.run_id, key)] == steps, (name, key)
        assert [s for s, _ in history(client, r.info.run_id, "val_loss")] == expected_val_steps(params, last), name
        for p in ("controller.name", "controller.max_window", "model.d_model", "task.name", "train.seed"):
            assert p in params, (name, p)
        assert tags["metalearner.kind"] == "trial" and tags["metalearner.sweep"] == experiment, name
        assert tags["metalearner.phase"] in ("search", "compare") and tags["metalearner.trial_id"], name
        assert tags["metalearner.arm"] and tags["metalearner.seed"] == params["train.seed"], name
    return client, runs


def test_quickstart_smoke_sweep_end_to_end(tmp_path):
    spec = load_experiment(ROOT / "experiments/quickstart.yaml", smoke=True)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    probe = ViewProbe(uri)
    result = SweepRunner(spec, uri, storage=str(tmp_path / "ray"), progress=False, on_event=probe).run()
    assert not result.errors
    assert payload_leaks(tmp_path / "ray") == []  # Tune's results carry scalars only
    assert [p for p, _ in probe.checked] == ["search:ewma-tuned"] and "viewStateShareKey=" in probe.url
    hits = assert_view_finds_runs(uri, result.parent_run_id)  # the comparison's 4 trials, at the end
    assert sorted(r.data.tags["metalearner.arm"] for r in hits) == ["ewma-seed", "ewma-tuned", "schedule", "static"]
    # 3 fixed arms x 1 seed + 2 search trials + the best re-trained on 1 seed
    client, runs = audit(uri, result.parent_run_id, 6)
    phases = sorted((r.data.tags["metalearner.arm"], r.data.tags["metalearner.phase"]) for r in runs)
    assert phases.count(("ewma-tuned", "search")) == 2 and ("ewma-tuned", "compare") in phases
    best = result.best["ewma-tuned"]
    assert best["name"] == "ewma" and best["factor"] > 1
    confirm = [r for r in runs if r.data.tags["metalearner.arm"] == "ewma-tuned"
               and r.data.tags["metalearner.phase"] == "compare"][0]
    assert float(confirm.data.params["controller.factor"]) == pytest.approx(best["factor"])
    assert yaml.safe_load(result.spec_files["ewma-tuned"].read_text())["controller"]["factor"] == best["factor"]


def test_pbt_perturbation_reaches_the_controller(tmp_path):
    spec = parse_experiment({
        "name": "pbt-test", "task": {"name": "recall", "n_pairs": 4, "distance": 16},
        "model": {"preset": "tiny", "window": 8},
        "train": {"steps": 60, "batch_size": 8, "seq_len": 32, "report_every": 10, "eval_batches": 1,
                  "eval_every": 10, "lr": 0.01},
        "controller": {"name": "ewma", "beta": 0.5, "threshold": 0.0},
        "search": {"searcher": "random", "num_samples": 2, "confirm": False,
                   "scheduler": {"name": "pbt", "perturbation_interval": 20, "quantile_fraction": 0.5,
                                 "resample_probability": 1.0},
                   "space": {"controller.factor": {"uniform": [1.01, 1.5]}}},
    })
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = SweepRunner(spec, uri, storage=str(tmp_path / "ray"), progress=False).run()
    assert not result.errors
    assert payload_leaks(tmp_path / "ray") == []  # PBT's settings travel in the inbox too
    client, runs = audit(uri, result.parent_run_id, 2)
    changed = 0
    for r in runs:
        factors = history(client, r.info.run_id, "controller.factor")
        assert factors and factors[0][0] == 1
        base = dict(history(client, r.info.run_id, "rope_base"))
        for (start, f), nxt in zip(factors, factors[1:] + [(max(base) + 1, None)]):
            # from the step a factor is in force, every move of the base is by exactly that factor
            for s in range(start, nxt[0] - 1):
                ratio = base[s + 1] / base[s]
                assert any(math.isclose(ratio, x, rel_tol=1e-9) for x in (f, 1 / f, 1.0)), (
                    s, ratio, f, factors, [(k, base[k]) for k in sorted(base)])
        changed += len({f for _, f in factors}) > 1
    assert changed >= 1  # the exploited trial got a new factor, and it is what moved its knobs


class KillWorkerOnce(MlflowTraceCallback):
    """The sweep's own callback, plus fault injection from outside the trial: at the first
    report of arm ``arm`` at step ``at`` (past its last checkpoint), SIGKILL the worker
    process that sent it (the ``pid`` Tune puts in every result; a process this test's
    Ray started). Tune then restarts the trial from its last checkpoint."""

    def __init__(self, *args, arm: str, at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arm, self.at, self.killed = arm, at, []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        super().on_trial_result(iteration, trials, trial, result, **info)
        if not self.killed and result.get("arm") == self.arm and result.get("step") == self.at:
            pid = result["pid"]
            assert pid in {p.pid for p in psutil.Process().children(recursive=True)}
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)


@pytest.mark.parametrize("engine", ["torch", "hf"])
def test_restored_trial_continues_with_an_identical_trace(tmp_path, engine):
    base = {"task": {"name": "recall", "n_pairs": 4, "distance": 16}, "model": {"preset": "tiny", "window": 8},
            "train": {"steps": 40, "batch_size": 8, "seq_len": 32, "report_every": 5, "checkpoint_every": 10,
                      "eval_every": 10, "eval_batches": 1, "seed": 3, "engine": engine},
            "controller": {"name": "ewma", "factor": 1.2, "beta": 0.5, "threshold": 0.0}}
    spec = parse_experiment({"name": "restore-test", **base, "seeds": [3]})
    runner = SweepRunner(spec, f"sqlite:///{tmp_path}/mlflow.db", storage=str(tmp_path / "ray"), progress=False)
    # two cells of the same config; the worker of one is killed after it reported step 25:
    # Tune restarts it from its step-20 checkpoint, and the steps it repeats (21..25 and
    # whatever it ran before the signal landed) must not be stored twice
    from ray import tune

    from metalearner.tracking import MlflowWriter

    writer = MlflowWriter(runner.tracking_uri)
    parent = writer.create_run("restore-test", "parent", {"metalearner.kind": "sweep"})
    cb = KillWorkerOnce(writer, "restore-test", parent, arm="crashed", at=25)
    cells = [{**base, "meta": {"arm": "clean", "phase": "compare"}},
             {**base, "meta": {"arm": "crashed", "phase": "compare"}}]
    grid = make_tuner(runner.spec, runner.storage, runner.trainable(),
                  {"cell": tune.grid_search(cells)}, "restore", cb).fit()
    writer.terminate(parent)
    assert writer.close().complete
    assert not grid.errors and cb.killed
    restarted = {r.config["cell"]["meta"]["arm"]: r.metrics["iterations_since_restore"] for r in grid}
    assert restarted["clean"] == 8 and restarted["crashed"] < 8  # restored from a checkpoint, not from step 0
    client, _, runs = children(runner.tracking_uri, writer.run_id(parent))  # create_run returns a run key
    by_arm = {r.data.tags["metalearner.arm"]: r.info.run_id for r in runs}
    for key in [*TRACE_KEYS, "val_loss", "attn_compute"]:  # attn_compute: carried in the checkpoint
        clean = history(client, by_arm["clean"], key)
        crashed = history(client, by_arm["crashed"], key)
        assert [s for s, _ in crashed] == [s for s, _ in clean]
        assert crashed == clean, key
    assert payload_leaks(tmp_path / "ray") == []  # both engines report scalars only


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sweep_against_a_real_tracking_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                mlflow.MlflowClient(tracking_uri=uri).search_experiments()
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        spec = load_experiment(ROOT / "experiments/compare_policies.yaml", smoke=True)
        result = SweepRunner(spec, uri, storage=str(tmp_path / "ray"), progress=False).run()
        assert not result.errors
        audit(uri, result.parent_run_id, len(spec.arms) * len(spec.seeds))
        assert len(assert_view_finds_runs(uri, result.parent_run_id)) == len(spec.arms) * len(spec.seeds)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("name", ["tune_ewma_asha", "pbt_ewma"])
def test_shipped_experiment_smoke_runs(tmp_path, name):
    """Each shipped search study, in smoke mode: its searcher and scheduler, every search
    trial and (with ``confirm``) the best configuration re-trained on every seed, each a
    complete child run whose sampled settings lie inside the search space."""
    spec = load_experiment(ROOT / f"experiments/{name}.yaml", smoke=True)
    (arm,) = spec.arms
    search = arm.search
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    probe = ViewProbe(uri)
    result = SweepRunner(spec, uri, storage=str(tmp_path / "ray"), progress=False, on_event=probe).run()
    assert not result.errors
    assert [p for p, _ in probe.checked] == [f"search:{arm.name}"]
    n_compare = len(spec.seeds) if search.confirm else 0
    # at the end: the comparison's trials, or (confirm: false) every trial of the population
    assert len(assert_view_finds_runs(uri, result.parent_run_id)) == (n_compare or search.num_samples)
    client, runs = audit(uri, result.parent_run_id, search.num_samples + n_compare)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["metalearner.searcher"] == search.searcher
    assert parent.data.tags["metalearner.scheduler"] == search.scheduler.name

    def inside(key, value):
        (kind, (lo, hi)), = search.space[key].items()
        return lo <= value <= hi

    searched = [r for r in runs if r.data.tags["metalearner.phase"] == "search"]
    compared = [r for r in runs if r.data.tags["metalearner.phase"] == "compare"]
    assert len(searched) == search.num_samples and len(compared) == n_compare
    for r in searched:  # tuned on the tuning seed, with settings drawn from the space
        assert r.data.params["train.seed"] == str(search.seed)
        for key in search.space:
            assert inside(key, float(r.data.params[key])), (key, r.data.params[key])
            if search.population_based:  # the settings in force, from step 1 on
                values = history(client, r.info.run_id, key)
                assert values[0][0] == 1 and all(inside(key, v) for _, v in values), (key, values)
    assert len({tuple(r.data.params[k] for k in search.space) for r in searched}) == search.num_samples

    best = result.best[arm.name]
    assert best["name"] == "ewma" and all(inside(k, best[k.split(".", 1)[1]]) for k in search.space)
    assert yaml.safe_load(result.spec_files[arm.name].read_text()) == {"controller": best}
    # the best configuration, re-trained on every comparison seed
    assert sorted(int(r.data.params["train.seed"]) for r in compared) == sorted(spec.seeds)[:n_compare]
    for r in compared:
        assert r.info.status == "FINISHED"
        for key in search.space:
            assert float(r.data.params[key]) == pytest.approx(best[key.split(".", 1)[1]])

    # the review of a population (issue 18): what PBT did, on the runs and in the report
    if search.population_based:
        check_population_review(uri, client, searched, result, spec, tmp_path)
    else:  # a searcher's candidates stay grey in the UI; the confirmed runs carry the arm's colour
        assert {r.data.tags["mlflow.runColor"] for r in searched} == {SEARCH_GREY}


PERTURB_LINE = re.compile(r"at step (\d+): from trial (\S+) \(run ([0-9a-f]{32})\) at its step (\d+); (.*)")


def check_population_review(uri, client, members, result, spec, tmp_path):
    """A PBT population as a reviewer reads it. Each perturbation is on the trial that
    received it: tag ``metalearner.perturb.N`` (the step, the donor trial and its run, which
    is in the store, each setting old -> new: old as the metric said the step before) and a
    line in the run's description; Ray's own policy log has as many, with the same new
    settings. The metrics ``controller.*`` are the settings in force as a step function: a
    point at every report step, a change only between adjacent steps, each value the one
    the step ran with (the params, then each perturbation's new values), and the factor in
    force is the one that moved the base. Members share their arm's colour. The report
    draws the lineage and reads the perturbations back from the tags."""
    from metalearner.report import write_report
    from metalearner.report.runs import load_traces, perturbation_events

    (arm,) = spec.arms
    space = list(arm.search.space)
    colour = arm_colours([arm.name])[arm.name]
    by_trial = {r.data.tags["metalearner.trial_id"]: r for r in members}
    ours = []  # (recipient trial, step, new settings)
    for r in members:
        tags, params, rid, tid = r.data.tags, r.data.params, r.info.run_id, r.data.tags["metalearner.trial_id"]
        steps, every = int(params["train.steps"]), int(params["train.report_every"])
        assert tags["mlflow.runColor"] == colour != SEARCH_GREY, tags  # the arm's colour, not the search grey
        note = tags["mlflow.note.content"]
        assert "params `controller.*` hold this trial's **initial** settings" in note, note
        in_force = {s: {k: float(params[k]) for k in space} for s in range(1, steps + 2)}  # params: step 1 on
        records = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tags.items()
                         if re.fullmatch(r"metalearner\.perturb\.\d+", k))
        assert tags.get("metalearner.perturbations", "0") == str(len(records))
        jumps = set()
        for n, (i, text) in enumerate(records, 1):
            m = PERTURB_LINE.fullmatch(text)
            assert i == n and m, (i, text)
            step, donor, donor_run, donor_step = int(m[1]), m[2], m[3], int(m[4])
            assert donor != tid and by_trial[donor].info.run_id == donor_run, text  # the donor's run, in the store
            assert donor_step == step - 1, text  # synchronous PBT: the donor's checkpoint of the step before
            changes = {k: (float(old), float(new)) for k, old, new in re.findall(r"(\S+) (\S+) → ([^\s,]+)", m[5])}
            assert sorted(changes) == sorted(space), text
            for k, (old, new) in changes.items():
                assert old == pytest.approx(in_force[step - 1][k], rel=1e-5), (text, k)
                for s in range(step, steps + 2):
                    in_force[s][k] = new
            assert f"PBT perturbation at step {step}**: copied the weights of trial `{donor}` (run `{donor_run}`)" \
                in note, note
            ours.append((tid, step, tuple(changes[k][1] for k in space)))
            jumps.add(step)
        for k in space:
            points = history(client, rid, k)
            assert {s for s, _ in points} >= {*range(every, steps + 1, every), 1}, (k, points)
            for s, v in points:
                assert v == pytest.approx(in_force[s][k], rel=1e-5), (k, s, v, records)
            for (s0, v0), (s1, v1) in zip(points, points[1:]):
                assert v0 == v1 or s1 == s0 + 1, (k, points)  # a step, never a diagonal
        base = dict(history(client, rid, "rope_base"))
        factor = history(client, rid, "controller.factor")
        for s in range(1, steps):  # the factor the metric says at step s moved the base from s to s + 1, exactly
            if s + 1 not in jumps:  # ...except where the donor's weights (and base) came in
                f = [v for at, v in factor if at <= s][-1]
                assert any(math.isclose(base[s + 1] / base[s], x, rel_tol=1e-9) for x in (f, 1 / f, 1.0)), (s, f)
    assert any(step <= steps for _, step, _ in ours), ours  # at least one perturbation that then trained
    (policy,) = (tmp_path / "ray").glob("*/pbt_global.txt")  # Ray's own record of its exploits
    theirs = sorted(tuple(json.loads(line)[5]["controller"][k.split(".", 1)[1]] for k in space)
                    for line in policy.read_text().splitlines())  # [..., old config, new config] per exploit
    assert len(theirs) == len(ours)
    assert flat(theirs) == pytest.approx(flat(sorted(new for _, _, new in ours)), rel=1e-5)

    report = write_report(uri, result.parent_run_id, tmp_path / "report")
    lineage = tmp_path / "report" / "lineage.png"
    assert lineage in report.files and lineage.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report/lineage.png" in {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert report.colours == {arm.name: colour}
    runs_df, _ = load_traces(uri, result.parent_run_id)
    events = perturbation_events(runs_df)
    trial_of = dict(zip(runs_df["run_id"], runs_df["trial_id"]))
    read_back = sorted((trial_of[g["run_id"].iloc[0]], int(step), tuple(g.set_index("key").loc[space, "new"]))
                       for (_, step), g in events.groupby(["run_id", "step"]))
    assert [(t, s) for t, s, _ in read_back] == sorted((t, s) for t, s, _ in ours)
    assert flat(new for _, _, new in read_back) == pytest.approx(flat(new for _, _, new in sorted(ours)), rel=1e-5)


def flat(rows):
    return [float(v) for row in rows for v in row]
