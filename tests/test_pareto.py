"""Two objectives: the multi-objective search (spec, searcher, the trials' attn_compute)
and the Pareto front `compare` draws (metalearner/report/pareto.py).

The dominance arithmetic is checked on hand-made points; the rest on one real smoke
sweep (experiments/pareto_ewma.yaml --smoke-test: a 3-trial two-objective Optuna search
and 3 arms x 1 seed, on a local Ray and a SQLite MLflow store), shared by the module.
"""

from __future__ import annotations

import glob
import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from _view import ViewProbe, assert_view_finds_runs
from conftest import children, history

from metalearner import report
from metalearner.config import ConfigError
from metalearner.experiment import load_experiment, parse_experiment
from metalearner.report.pareto import (
    ATTN_KEY,
    dominators,
    front_mask,
    landing_artifacts,
    pareto_table,
    pick,
    run_attention,
)
from metalearner.report.stats import attention_cost
from metalearner.tracking import NOTE_TAG
from trainables.reporting import AttentionMeter

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "experiments/pareto_ewma.yaml"


# ---------------------------------------------------------------- dominance on hand-made points


def test_dominators_name_every_point_that_is_no_worse_anywhere_and_better_somewhere():
    pts = [(1, 5), (2, 4), (3, 3), (2, 6), (4, 4), (1, 5), (np.nan, 0)]
    doms = dominators(pts, ["min", "min"])
    assert doms[:3] == [[], [], []]  # the front: each trades one objective for the other
    assert doms[3] == [0, 1, 5]  # (2, 6): (1, 5) twice and (2, 4)
    assert doms[4] == [1, 2]  # (4, 4): (2, 4) and (3, 3)
    assert doms[5] == []  # an equal point does not dominate
    assert doms[6] == []  # a point without both figures dominates nothing, and is not on the front
    assert front_mask(pts, ["min", "min"]).tolist() == [True, True, True, False, False, True, False]
    # "max" turns the first objective around: higher is better there
    assert dominators([(0.9, 10), (0.8, 10), (0.95, 20)], ["max", "min"]) == [[], [0], []]
    with pytest.raises(ValueError, match=r"modes\[1\]: got 'down'"):
        dominators([(1, 2)], ["min", "down"])


def test_pick_takes_the_knee_or_the_best_of_the_front():
    pts = [(0.0, 10.0), (1.0, 1.0), (10.0, 0.0), (5.0, 5.0)]
    assert pick(pts, ["min", "min"], "knee") == 1  # nearest the ideal (0, 0) after scaling to [0, 1]
    assert pick(pts, ["min", "min"], "best", primary=0) == 0
    assert pick(pts, ["min", "min"], "best", primary=1) == 2
    assert pick([(3.0, 7.0)], ["min", "min"]) == 0  # one point is its own front
    assert pick([(np.nan, 1.0)], ["min", "min"]) is None
    assert pick([(1.0, 1.0), (0.0, 5.0), (2.0, 0.0)], ["max", "min"], "best") == 2  # highest first objective


def test_best_result_of_a_multi_objective_search_is_the_front_trial_pick_names():
    from types import SimpleNamespace

    from trainables.tuning import best_result

    def result(val, attn, error=None, diverged=False):
        return SimpleNamespace(metrics={"val_loss": val, ATTN_KEY: attn, "diverged": diverged}, error=error)

    grid = [result(4.0, 100.0), result(3.0, 900.0), result(3.3, 300.0), result(3.5, 800.0),
            result(1.0, 1.0, error=RuntimeError("failed")), result(1.0, 1.0, diverged=True), result(2.0, math.nan)]
    (arm,) = parse_experiment(_mo()).arms
    assert best_result(grid, "val_loss", "min", arm.search) is grid[2]  # the knee; failed/diverged/NaN never win
    arm.search.pick = "best"
    assert best_result(grid, "val_loss", "min", arm.search) is grid[1]
    assert best_result(grid, "val_loss", "min") is grid[6]  # single-objective: the best val loss, attn unread
    assert best_result(grid[4:], "val_loss", "min", arm.search) is None


# ---------------------------------------------------------------- the specs


BASE = {"name": "t", "task": {"name": "recall", "distance": 16, "n_pairs": 4}, "model": {"preset": "tiny"},
        "train": {"steps": 20, "seq_len": 32}, "controller": {"name": "ewma"}}
TWO = [{"metric": "val_loss"}, {"metric": "attn_compute", "mode": "min"}]


def _mo(**search):
    return {**BASE, "search": {"space": {"controller.factor": {"uniform": [1.01, 1.1]}}, "searcher": "optuna",
                               "objectives": TWO, **search}}


@pytest.mark.parametrize("data,start", [
    (_mo(searcher="hyperopt"), "search.searcher: got 'hyperopt' with objectives"),
    (_mo(scheduler={"name": "asha"}), "search.scheduler.name: got 'asha' with objectives, expected 'fifo'"),
    (_mo(searcher="random", scheduler="pbt"), "search.scheduler.name: got 'pbt'"),
    (_mo(objectives=[{"metric": "val_loss"}]), "search.objectives: got [{'metric': 'val_loss'}], expected a list"),
    (_mo(objectives=[{"metric": "val_loss"}, {"metric": "flops"}]), "search.objectives[1].metric: got 'flops'"),
    (_mo(objectives=[{"metric": "val_loss"}, {"metric": "attn_compute", "mode": "max"}]),
     "search.objectives[1].mode: got 'max', expected 'min'"),
    (_mo(objectives=[{"metric": "loss"}, {"metric": "attn_compute"}]), "search.objectives: got metrics ['loss', "),
    (_mo(objectives=[{"metric": "val_loss"}, {"metric": "val_loss"}]), "search.objectives: got metrics"),
    (_mo(objectives=[{"metric": "val_loss"}, {"metric": "attn_compute", "weight": 2}]),
     "search.objectives[1].weight: unknown key"),
    (_mo(pick="middle"), "search.pick: got 'middle'"),
    ({**BASE, "search": {"space": {"controller.factor": {"uniform": [1.01, 1.1]}}, "pick": "knee"}},
     "search.pick: got 'knee', expected it only with search.objectives"),
    ({**BASE, "metric": "attn_compute"}, "metric: got 'attn_compute'"),  # an objective only, never compare's metric
    ({**{k: v for k, v in BASE.items() if k != "controller"},
      "arms": [{"name": "a", "controller": {"name": "ewma"}, "search": {**_mo()["search"], "searcher": "hyperopt"}}]},
     "arms[0].search.searcher: got 'hyperopt'"),
])
def test_bad_objectives_fail_with_one_line_naming_the_field(data, start):
    with pytest.raises(ConfigError) as e:
        parse_experiment(data)
    assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)


def test_objectives_take_the_metrics_direction_when_no_mode_is_given():
    (arm,) = parse_experiment(_mo()).arms
    assert [(o.metric, o.mode) for o in arm.search.objectives] == [("val_loss", "min"), ("attn_compute", "min")]
    assert arm.search.pick == "knee"


def test_a_bad_objective_exits_2_before_ray_starts(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_mo(scheduler="asha")))
    res = cli("sweep", bad, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "search.scheduler.name: got 'asha' with objectives" in res.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


# ---------------------------------------------------------------- the meter of a trial


def test_the_meter_counts_the_report_cost_model_and_goes_on_from_a_checkpoint(tmp_path):
    params = {"train.seq_len": 32, "model.n_heads": 4, "model.n_global_heads": 1, "model.arch": "decoder"}
    windows = [4, 4, 6, 9, 9, 32]
    meter = AttentionMeter()
    meter.configure(params)
    meter.add([{"step": s, "window": w} for s, w in enumerate(windows[:3], 1)])
    meter.save(tmp_path)
    again = AttentionMeter()  # a restarted trial: restored, then configured from its params
    again.load(tmp_path)
    again.configure(params)
    again.add([{"step": s, "window": w} for s, w in enumerate(windows[3:], 4)])
    expected = float(sum(attention_cost(w, 32, 4, 1, True) for w in windows))
    assert again.stamp() == {ATTN_KEY: pytest.approx(expected)}
    unknown = AttentionMeter()
    unknown.configure({"train.seq_len": 32})
    unknown.add([{"step": 1, "window": 4}])
    assert unknown.stamp() == {}


def test_pareto_table_on_hand_made_runs():
    """Arms are seed means compared with arms, trials compared with trials."""
    runs, points = [], []
    spec = [("a", "compare", 0, 1.0, 4), ("a", "compare", 1, 1.2, 4), ("b", "compare", 0, 1.2, 8),
            ("c", "compare", 0, 0.9, 16), ("a", "search", 9, 0.5, 16), ("a", "search", 9, 0.6, 4)]
    for i, (arm, phase, seed, val, window) in enumerate(spec):
        rid = f"r{i}"
        runs.append({"run_id": rid, "run_name": f"{arm}-{phase}-{i}", "arm": arm, "phase": phase, "seed": seed,
                     "train_steps": 4.0, "seq_len": 16.0, "n_heads": 2.0, "n_global_heads": 0.0, "arch": "decoder",
                     "controller.name": "static"})
        points += [(rid, s, "loss", 2.0) for s in range(1, 5)] + [(rid, s, "window", float(window)) for s in (1, 3)]
        points.append((rid, 4, "val_loss", val))
    runs_df = pd.DataFrame(runs)
    traces_df = pd.DataFrame(points, columns=["run_id", "step", "key", "value"])
    attn = run_attention(runs_df, traces_df)
    assert attn["r0"] == pytest.approx(4 * attention_cost(4, 16, 2, 0, True))  # windows carried to steps 2 and 4
    t = pareto_table(runs_df, traces_df).set_index("point")
    assert list(t["kind"]) == ["arm"] * 3 + ["trial"] * 2
    assert t.loc["a", "value"] == pytest.approx(1.1) and t.loc["a", "n_runs"] == 2
    assert t.loc["b", "dominated_by"] == "a" and bool(t.loc["b", "dominated"])  # more compute, worse loss
    assert not t.loc["c", "dominated"] and not t.loc["a", "dominated"]
    assert t.loc["a-search-5", "dominated_by"] == "" and t.loc["a-search-4", "dominated_by"] == ""


# ---------------------------------------------------------------- one real two-objective sweep


@pytest.fixture(scope="module")
def mo_sweep(tmp_path_factory, empty_store, local_ray):
    """pareto_ewma.yaml --smoke-test, run in this process, and its report."""
    import shutil

    from trainables.sweep import SweepRunner

    tmp = tmp_path_factory.mktemp("pareto")
    shutil.copyfile(empty_store, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    spec = load_experiment(SPEC, smoke=True)
    probe = ViewProbe(uri)  # the saved view finds runs at the end of the search phase...
    result = SweepRunner(spec, uri, storage=str(tmp / "ray"), progress=False, on_event=probe).run()
    assert not result.errors and not result.failed_arms, result.errors
    assert [p for p, _ in probe.checked] == [f"search:{a.name}" for a in spec.arms if a.search]
    rep = report.write_report(uri, result.parent_run_id, tmp / "report")
    assert assert_view_finds_runs(uri, result.parent_run_id)  # ...and at the end
    return {"spec": spec, "result": result, "report": rep, "uri": uri, "tmp": tmp}


def _final(client, run_id, key):
    h = history(client, run_id, key)
    return h[-1][1] if h else math.nan


def test_the_search_is_multi_objective_and_its_trials_report_both(mo_sweep):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    spec, result = mo_sweep["spec"], mo_sweep["result"]
    client, _, runs = children(mo_sweep["uri"], result.parent_run_id)
    searched = [r for r in runs if r.data.tags["metalearner.phase"] == "search"]
    (arm,) = [a for a in spec.arms if a.search is not None]
    assert len(searched) == arm.search.num_samples == 3
    (tune_dir,) = glob.glob(str(mo_sweep["tmp"] / "ray" / f"{spec.name}-{arm.name}-*"))
    searcher = OptunaSearch()
    searcher.restore_from_dir(tune_dir)
    assert searcher.metric == ["val_loss", "attn_compute"] and searcher.mode == ["min", "min"]
    (state,) = glob.glob(f"{tune_dir}/searcher-state-*.pkl")
    (study,) = [v for v in pickle.loads(Path(state).read_bytes()).values() if isinstance(v, optuna.study.Study)]
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    finals = [(_final(client, r.info.run_id, "val_loss"), _final(client, r.info.run_id, ATTN_KEY)) for r in searched]
    assert all(math.isfinite(v) for f in finals for v in f)
    told = sorted(tuple(t.values) for t in study.trials)
    assert told == pytest.approx(sorted(finals))  # Optuna was told both objectives of every trial
    # the configuration confirmed on the seeds is the knee of the trials' front
    knee = searched[pick(finals, ["min", "min"], "knee")]
    best = result.best[arm.name]
    for key in arm.search.space:
        assert float(knee.data.params[key]) == pytest.approx(best[key.split(".", 1)[1]])


def test_every_trial_logs_the_attention_compute_compare_counts(mo_sweep):
    client, _, runs = children(mo_sweep["uri"], mo_sweep["result"].parent_run_id)
    rep = mo_sweep["report"]
    table = pd.read_csv(mo_sweep["tmp"] / "report" / "pareto.csv")
    attn = {rid: a for ids, a in zip(table["run_ids"], table[ATTN_KEY]) for rid in str(ids).split(",")}
    every = int(mo_sweep["spec"].base["train"]["report_every"])
    steps = int(mo_sweep["spec"].base["train"]["steps"])
    assert len(rep.files) and len(runs) == 6
    for r in runs:
        trace = history(client, r.info.run_id, ATTN_KEY)
        assert [s for s, _ in trace] == list(range(every, steps + 1, every)), r.info.run_name  # one per report
        assert trace[-1][1] == pytest.approx(attn[r.info.run_id]), r.info.run_name  # the trial's figure = compare's
        assert all(a < b for (_, a), (_, b) in zip(trace, trace[1:]))  # cumulative


def test_compare_draws_the_pareto_front_with_the_right_dominance(mo_sweep):
    rep, uri = mo_sweep["report"], mo_sweep["uri"]
    out = mo_sweep["tmp"] / "report"
    table = pd.read_csv(out / "pareto.csv", keep_default_na=False)
    assert set(table["kind"]) == {"arm", "trial"} and sorted(table.loc[table["kind"] == "arm", "point"]) == [
        "ewma-pareto", "ramp", "static"]
    for kind, g in table.groupby("kind"):  # brute force: who is no worse on both and better on one
        for r in g.itertuples():
            by = [o.point for o in g.itertuples() if o.Index != r.Index and o.val_loss <= r.val_loss
                  and o.attn_compute <= r.attn_compute and (o.val_loss < r.val_loss or o.attn_compute < r.attn_compute)]
            assert sorted(by) == sorted(filter(None, r.dominated_by.split(","))), (kind, r.point)
            assert str(r.dominated) == str(bool(by))
    png = out / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert landing_artifacts(rep.files) == ["report/pareto.png"]
    client, parent, _ = children(uri, rep.parent_run_id)
    assert {"report/pareto.png", "report/pareto.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id,
                                                                                               "report")}
    # the sentence names each dominated arm, in the terminal, the markdown and the parent's description
    arms = table[table["kind"] == "arm"]
    dominated = list(arms.loc[arms["dominated"].astype(str) == "True", "point"])
    line = next(x for x in rep.text.splitlines() if x.startswith("Pareto front ("))
    for arm in dominated:
        assert f"{arm} (by " in line
    assert ("dominated arm(s): " in line) == bool(dominated)
    assert line in (out / "comparison.md").read_text() and line in parent.data.tags[NOTE_TAG]
