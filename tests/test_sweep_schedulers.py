"""The schedulers of a sweep: PBT's clamp back into the space, ASHA's early stops in
MLflow, and PB2 end to end. Real local Ray (2 CPUs), real SQLite MLflow store, real tiny
training runs."""

import math
import random

import pytest
from _view import ViewProbe, assert_view_finds_runs
from conftest import children as child_runs
from conftest import history

from metalearner.config import load_run_config
from metalearner.experiment import parse_experiment
from trainables.sweep import SweepRunner
from trainables.tuning import ClampToSpace, make_scheduler, nested_space

TRACE_KEYS = ["loss", "loss_ewma", "rope_base", "window", "lr"]
SPACE = {
    "controller.factor": {"loguniform": [1.001, 1.1]},
    "controller.beta": {"uniform": [0.5, 0.99]},
    "train.warmup_steps": {"randint": [2, 10]},  # high exclusive: 2..9
    "controller.threshold_mode": {"choice": ["abs", "rel"]},
}


def spec_with(search, steps, report_every, train=None, **top):
    return parse_experiment({
        "name": f"sched-{search['scheduler']['name']}",
        "task": {"name": "recall", "n_pairs": 4, "distance": 16, "eval_size": 16},
        "model": {"preset": "tiny", "window": 8},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "report_every": report_every,
                  "eval_every": report_every, "eval_batches": 1, "warmup_steps": 1, **(train or {})},
        "controller": {"name": "ewma", "factor": 1.2, "beta": 0.5, "threshold": 0.0},
        "search": {"searcher": "random", "confirm": False, **search},
        **top,
    })


def assert_trace_complete(client, run, last_step, report_every):
    """Steps 1..last_step exactly once for every trace key; val_loss at every report."""
    rid = run.info.run_id
    for key in TRACE_KEYS:
        assert [s for s, _ in history(client, rid, key)] == list(range(1, last_step + 1)), (run.info.run_name, key)
    assert [s for s, _ in history(client, rid, "val_loss")] == list(range(report_every, last_step + 1, report_every))


# ---------------------------------------------------------------- ClampToSpace


def test_clamp_puts_each_value_back_into_its_range():
    clamp = ClampToSpace(SPACE)
    cfg = {"controller": {"name": "ewma", "factor": 1.001 * 0.8, "beta": 0.99 * 1.2, "threshold_mode": "rel"},
           "train": {"warmup_steps": 12, "steps": 100}}
    out = clamp(cfg)
    assert out is cfg  # mutated in place and returned, as PBT's custom_explore_fn
    assert out["controller"] == {"name": "ewma", "factor": 1.001, "beta": 0.99, "threshold_mode": "rel"}
    assert out["train"] == {"warmup_steps": 9, "steps": 100}  # randint's high is exclusive
    assert type(out["train"]["warmup_steps"]) is int and type(out["controller"]["factor"]) is float

    low = clamp({"controller": {"beta": 0.1}, "train": {"warmup_steps": 0}})
    assert low == {"controller": {"beta": 0.5}, "train": {"warmup_steps": 2}}


def test_clamp_leaves_values_inside_the_range_and_missing_keys_alone():
    clamp = ClampToSpace(SPACE)
    inside = {"controller": {"factor": 1.05, "beta": 0.7}, "train": {"warmup_steps": 5}}
    assert clamp({"controller": dict(inside["controller"]), "train": dict(inside["train"])}) == inside
    assert clamp({"controller": {"beta": 0.99}}) == {"controller": {"beta": 0.99}}  # ends are inside
    assert clamp({"model": {"preset": "tiny"}}) == {"model": {"preset": "tiny"}}
    assert set(clamp.bounds) == {"controller.factor", "controller.beta", "train.warmup_steps"}  # not choice


def test_clamp_reaches_into_grid_cells():
    """Grid trials wrap their config in ``cell``."""
    cfg = {"cell": {"controller": {"factor": 2.0}, "train": {"warmup_steps": 1}}, "meta": {"arm": "a"}}
    assert ClampToSpace(SPACE)(cfg) == {"cell": {"controller": {"factor": 1.1}, "train": {"warmup_steps": 2}},
                                        "meta": {"arm": "a"}}


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.2, 3.0])
def test_pbt_explore_step_stays_inside_the_space(factor):
    """Ray's own PBT explore step, with the scheduler `make_scheduler` builds: whatever
    perturbation factor it applies, the new config is inside every range."""
    from ray.tune.schedulers.pbt import _explore

    spec = spec_with({"scheduler": {"name": "pbt", "resample_probability": 0.0}, "num_samples": 2,
                      "space": {k: v for k, v in SPACE.items() if k != "controller.threshold_mode"}}, 20, 5)
    sched = make_scheduler(spec.arms[0], 20, 5)
    assert isinstance(sched._custom_explore_fn, ClampToSpace)
    random.seed(0)
    for start in ({"factor": 1.001, "beta": 0.5, "warmup_steps": 2}, {"factor": 1.1, "beta": 0.99, "warmup_steps": 9},
                  {"factor": 1.05, "beta": 0.8, "warmup_steps": 5}):
        config = {"controller": {"name": "ewma", "factor": start["factor"], "beta": start["beta"], "threshold": 0.0},
                  "train": {"steps": 20, "warmup_steps": start["warmup_steps"]}, "meta": {"arm": "tuned"}}
        new, ops = _explore(config, sched._hyperparam_mutations, 0.0, (factor,), sched._custom_explore_fn)
        assert ops["controller"]["factor"] == f"* {factor}"  # Ray did perturb it
        c, t = new["controller"], new["train"]
        assert 1.001 <= c["factor"] <= 1.1 and 0.5 <= c["beta"] <= 0.99 and 2 <= t["warmup_steps"] <= 9, new
        assert c["factor"] == pytest.approx(min(max(start["factor"] * factor, 1.001), 1.1))
        load_run_config({"controller": c, "train": {"warmup_steps": t["warmup_steps"]}})  # still a valid run


def test_pb2_scheduler_gets_the_bounds_of_the_space():
    spec = spec_with({"scheduler": {"name": "pb2", "perturbation_interval": 10, "quantile_fraction": 0.5},
                      "num_samples": 2, "space": {k: v for k, v in SPACE.items() if k != "controller.threshold_mode"}},
                     20, 5)
    sched = make_scheduler(spec.arms[0], 20, 5)
    from ray.tune.schedulers.pb2 import PB2

    from trainables.tuning import synch_safe

    assert isinstance(sched, PB2) and type(sched) is synch_safe(PB2)  # safe when a member ends early
    assert sched._hyperparam_bounds == {"controller": {"factor": [1.001, 1.1], "beta": [0.5, 0.99]},
                                        "train": {"warmup_steps": [2.0, 9.0]}}  # randint: high exclusive
    assert sched._perturbation_interval == 10 and sched._quantile_fraction == 0.5
    assert nested_space(spec.arms[0].search.space).keys() == {"controller", "train"}


# ---------------------------------------------------------------- ASHA


def test_asha_stops_the_weak_trial_and_mlflow_marks_it_killed(tmp_path, local_ray, sqlite_uri):
    """Two trials, one at a time (ASHA's verdict depends on who reaches a rung first, and
    Tune does not promise an order), chosen so that exactly one is stopped in either order:
    with 20 warmup steps, lr 0.3 has the lower val_loss at step 5 (the first rung) and the
    higher at step 10 (the second) than lr 0.02. The first trial sets each bar: if 0.3 runs
    first, 0.02 is stopped at step 5; if 0.02 runs first, 0.3 is stopped at step 10. The
    stopped trial's child run is KILLED and tagged ``stopped_early``, with its trace up to
    that step; the other is FINISHED with its whole trace."""
    steps, every = 20, 5
    spec = spec_with({"scheduler": {"name": "asha", "grace_period": every, "reduction_factor": 2},
                      "num_samples": 1, "space": {"train.lr": {"grid": [0.3, 0.02]}}},
                     steps, every, train={"warmup_steps": 20}, resources={"max_concurrent": 1})
    uri = sqlite_uri
    result = SweepRunner(spec, uri, storage=str(tmp_path / "ray"), progress=False).run()
    assert not result.errors

    client, parent, runs = child_runs(uri, result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["metalearner.scheduler"] == "asha"
    assert sorted(float(r.data.params["train.lr"]) for r in runs) == [0.02, 0.3]
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert first.info.end_time <= second.info.start_time  # one at a time

    # the first trial passes every rung; the second is cut at the rung where it is worse
    assert first.info.status == "FINISHED", first.info.status
    assert "metalearner.stopped_early" not in first.data.tags
    assert_trace_complete(client, first, steps, every)
    cut_at = 5 if float(second.data.params["train.lr"]) == 0.02 else 10
    assert second.info.status == "KILLED", second.info.status
    assert second.data.tags["metalearner.stopped_early"] == f"at step {cut_at} of {steps}"
    assert_trace_complete(client, second, cut_at, every)
    val_first, val_second = (dict(history(client, r.info.run_id, "val_loss")) for r in (first, second))
    assert val_second[cut_at] > val_first[cut_at]  # ASHA's reason: worse where it was compared
    if cut_at == 10:
        assert val_second[5] < val_first[5]  # and it had passed the first rung

    for r in runs:
        assert r.data.tags["metalearner.phase"] == "search" and r.data.tags["metalearner.kind"] == "trial"
        assert r.data.params["controller.name"] == "ewma" and r.data.params["train.steps"] == str(steps)
    assert set(result.trials) == {r.data.tags["metalearner.trial_id"] for r in runs}  # one child run per trial


# ---------------------------------------------------------------- PB2


def test_pb2_sweep_explores_the_controller_within_its_bounds(tmp_path, local_ray, sqlite_uri):
    """A real PB2 sweep (GP-UCB over the controller's factor): at the perturbation step the
    weaker trial takes the stronger one's checkpoint and a new factor inside the bounds;
    the controller.factor metric records it from the step it takes effect, and from there
    the RoPE base moves by exactly that factor."""
    pytest.importorskip("GPy", reason="PB2 needs the 'pb2' extra (GPy)")
    pytest.importorskip("sklearn", reason="PB2 needs the 'pb2' extra (scikit-learn)")
    steps, every, interval = 20, 5, 10
    lo, hi = 1.01, 1.5
    spec = spec_with({"scheduler": {"name": "pb2", "perturbation_interval": interval, "quantile_fraction": 0.5},
                      "num_samples": 2, "space": {"controller.factor": {"uniform": [lo, hi]}}},
                     steps, every)
    uri = sqlite_uri
    probe = ViewProbe(uri)
    result = SweepRunner(spec, uri, storage=str(tmp_path / "ray"), progress=False, on_event=probe).run()
    assert not result.errors
    assert probe.checked == [("search:tuned", 2)]  # PB2 only: the view shows its population
    assert len(assert_view_finds_runs(uri, result.parent_run_id)) == 2

    client, parent, runs = child_runs(uri, result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["metalearner.scheduler"] == "pb2"
    assert len(runs) == 2
    changed = recorded = 0
    for r in runs:
        assert r.info.status == "FINISHED"
        assert_trace_complete(client, r, steps, every)
        factors = history(client, r.info.run_id, "controller.factor")
        assert factors[0][0] == 1 and all(lo <= f <= hi for _, f in factors), factors
        # a point at every report step; a new factor takes effect only right after a perturbation step
        assert {s for s, _ in factors} >= {1, *range(every, steps + 1, every)}, factors
        assert all((s - 1) % interval == 0 for (s, f), (_, before) in zip(factors[1:], factors) if f != before), factors
        base = dict(history(client, r.info.run_id, "rope_base"))
        for (start, f), (end, _) in zip(factors, factors[1:] + [(steps + 1, None)]):
            for s in range(start, end - 1):
                ratio = base[s + 1] / base[s]
                assert any(math.isclose(ratio, x, rel_tol=1e-9) for x in (f, 1 / f, 1.0)), (s, ratio, f)
        changed += len({f for _, f in factors}) > 1
        for s, f in factors:  # each change is recorded on the run as a perturbation at that step
            if s > 1 and f != dict(factors)[max(t for t, _ in factors if t < s)]:
                assert any(p.startswith(f"at step {s}: from trial ") for k, p in r.data.tags.items()
                           if k.startswith("metalearner.perturb.")), (s, r.data.tags)
        recorded += int(r.data.tags.get("metalearner.perturbations", 0))
    assert changed >= 1  # PB2 gave the exploited trial a new factor
    (policy,) = (tmp_path / "ray").glob("*/pbt_global.txt")  # Ray's own record of its exploits
    assert recorded == len(policy.read_text().splitlines())
    assert lo <= result.best["tuned"]["factor"] <= hi



def test_synch_population_goes_on_when_a_member_ends_early(tmp_path, local_ray):
    """PBT/PB2 with synch=True: a member that ends before the next sync point (here: stops
    at step 3 while the other waits at step 4) must not leave the other waiting forever
    (Ray's own scheduler does; the sweep uses `synch_safe`)."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    from trainables.tuning import synch_safe

    def _paced_member(config):  # defined here: Ray pickles it by value (workers cannot import tests/)
        """A PBT member of a real Tune run: reports ``step`` 1..8 with a checkpoint each; the
        member with ``ends_at`` stops there, after the other one has reached the sync point."""
        import tempfile
        import time
        from pathlib import Path

        from ray import tune

        start = 0
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start = int((Path(d) / "step").read_text())
        for step in range(start + 1, 9):
            if config["ends_at"] and step > config["ends_at"]:
                time.sleep(4)  # the other member reports step 4 and waits at the sync point meanwhile
                return
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "step").write_text(str(step))
                tune.report({"step": step, "score": float(step)}, checkpoint=tune.Checkpoint.from_directory(d))
            time.sleep(0.3 if config["ends_at"] else 0.05)

    assert issubclass(synch_safe(PB2), PB2)  # PB2 is a PopulationBasedTraining: the same sync logic
    scheduler = synch_safe(PopulationBasedTraining)(time_attr="step", perturbation_interval=4, synch=True,
                                                    quantile_fraction=0.5, hyperparam_mutations={"lr": [0.1, 0.2]})
    grid = tune.Tuner(
        _paced_member,
        param_space={"ends_at": tune.grid_search([0, 3]), "lr": 0.1},
        tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler, reuse_actors=False,
                                    time_budget_s=60),  # a hang ends here, and the asserts below fail
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="synch", verbose=0),
    ).fit()
    steps = sorted(r.metrics["step"] for r in grid)
    assert steps == [3, 8], steps  # the early member stopped at 3, the other ran to the end
