"""The studies (issue 11): the study specs load with and without their smoke block, the
per-seed PBT plan, and `metalearner train` leaving None params out of MLflow."""

from pathlib import Path

import mlflow
import pytest
import yaml

from metalearner.config import ConfigError
from metalearner.experiment import load_experiment
from trainables.phases import best_member, plan_populations

ROOT = Path(__file__).resolve().parent.parent
STUDIES = [ROOT / "experiments" / f"study_{name}.yaml" for name in ("recall", "text")]  # issue 11's (20's: test_transfer)


def test_train_does_not_log_none_params_as_null(cli, sqlite_uri, tmp_path):
    # a static run on the decoder has settings that are None (model.n_decoder_layers)
    res = cli("train", "--task", "recall", "--controller", "static", "--steps", 2, "--tracking-uri", sqlite_uri,
              "--set", "model.preset=tiny", "--set", "train.seq_len=64", "--set", "train.eval_every=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    params = run.data.params
    assert params["controller.name"] == "static" and params["model.preset"] == "tiny"
    assert "null" not in params.values() and "None" not in params.values()
    assert "model.n_decoder_layers" not in params


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
def test_study_specs_load(path, smoke):
    spec = load_experiment(path, smoke=smoke)
    assert [a.name for a in spec.arms] == ["static", "schedule", "ewma-seed", "ewma-tuned", "ewma-pbt"]
    pbt = spec.arms[-1].search
    assert pbt is not None and pbt.scheduler.name == "pbt" and pbt.per_seed
    if smoke:
        assert len(spec.seeds) == 1 and spec.base["train"]["steps"] <= 40
    else:
        assert len(spec.seeds) >= 5


# ---------------------------------------------------------------- per-seed PBT


def _spec(tmp_path, search_extra=None, seeds=(0, 1)):
    data = {
        "name": "perseed",
        "task": {"name": "recall", "distance": 16, "n_pairs": 4},
        "model": {"preset": "tiny"},
        "train": {"steps": 20, "seq_len": 32, "report_every": 10, "eval_every": 10, "eval_batches": 1},
        "seeds": list(seeds),
        "arms": [
            {"name": "static", "controller": {"name": "static"}},
            {"name": "pbt", "controller": {"name": "ewma"}, "search": {
                "searcher": "random", "num_samples": 2, "confirm": False, "per_seed": True,
                "scheduler": {"name": "pbt", "perturbation_interval": 10},
                "space": {"controller.factor": {"loguniform": [1.001, 1.1]}}, **(search_extra or {})}},
        ],
    }
    p = tmp_path / "perseed.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_plan_has_one_population_per_seed_on_that_seed(tmp_path):
    spec = load_experiment(_spec(tmp_path, seeds=(3, 5, 8)))
    pops = plan_populations(spec, spec.arms[1])
    assert [p.seed for p in pops] == [3, 5, 8]
    assert [p.config["train"]["seed"] for p in pops] == [3, 5, 8]
    assert all(p.meta == {"arm": "pbt", "phase": "search", "population_seed": p.seed} for p in pops)
    with pytest.raises(ValueError, match="per_seed"):
        plan_populations(spec, spec.arms[0])


def test_best_member_by_mode_skips_missing_and_breaks_ties_by_id():
    finals = {"b": 1.0, "a": 1.0, "c": 0.5, "d": None, "e": float("nan")}
    assert best_member(finals, "min") == "c"
    assert best_member(finals, "max") == "a"  # a tie of 1.0: the smaller id
    assert best_member({"x": None}, "min") is None


BAD_PER_SEED = [
    ({"scheduler": {"name": "asha"}, "searcher": "random"},
     "arms[1].search.per_seed: got true with scheduler 'asha', expected scheduler 'pbt' or 'pb2'"),
    ({"confirm": True}, "arms[1].search.confirm: got true with per_seed true, expected false"),
    ({"per_seed": "yes"}, "arms[1].search.per_seed: got 'yes', expected true or false"),
]


@pytest.mark.parametrize("extra,message", BAD_PER_SEED)
def test_bad_per_seed_names_the_field(tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(_spec(tmp_path, extra))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_per_seed_exits_2_before_ray_starts(cli, tmp_path):
    extra, message = BAD_PER_SEED[1]
    res = cli("sweep", _spec(tmp_path, extra), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert message in res.stderr, res.stderr
    assert not (tmp_path / "m.db").exists()  # nothing started


def test_per_seed_pbt_promotes_each_populations_best_member(cli, tmp_path, sqlite_uri):
    """Real Ray, real MLflow: two seeds, a population of two on each; compare pairs the arm."""
    uri = sqlite_uri
    res = cli("sweep", _spec(tmp_path), "--tracking-uri", uri, "--storage", tmp_path / "ray", "--num-cpus", 2,
              cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("perseed")
    runs = client.search_runs([exp.experiment_id], "tags.`metalearner.kind` = 'trial'", max_results=100)
    pbt = [r for r in runs if r.data.tags["metalearner.arm"] == "pbt"]
    assert len(pbt) == 4  # 2 seeds x 2 members
    for seed in ("0", "1"):
        members = [r for r in pbt if r.data.tags["metalearner.seed"] == seed]
        assert len(members) == 2
        promoted = [r for r in members if r.data.tags["metalearner.phase"] == "compare"]
        assert len(promoted) == 1, [r.data.tags["metalearner.phase"] for r in members]
        others = [r for r in members if r is not promoted[0]]
        assert others[0].data.tags["metalearner.phase"] == "search"
        # the promoted member is the better one by its final val loss
        assert promoted[0].data.metrics["val_loss"] <= others[0].data.metrics["val_loss"]
    table = (tmp_path / "ray").rglob("comparison.csv")
    import pandas as pd

    df = pd.read_csv(next(iter(table)))
    row = df[(df["arm"] == "pbt") & (df["phase"] == "compare")].iloc[0]
    assert int(row["n_seeds"]) == 2 and int(row["n_paired"]) == 2, df.to_string()  # both seeds paired with static


# ---------------------------------------------------------------- resume: read from the grid


def _result(tid, val, error=None, diverged=False, factor=1.05, step=20):
    """A Tune result as the grid of a restored phase holds it (metrics, error, config)."""
    from types import SimpleNamespace

    metrics = {"trial_id": tid, "val_loss": val, "step": step, "total_steps": 20, "diverged": diverged}
    config = {"controller": {"name": "ewma", "factor": factor}, "train": {"seed": 1},
              "meta": {"arm": "pbt", "phase": "search"}}
    return SimpleNamespace(metrics=metrics, error=error, config=config)


def test_members_finished_in_an_earlier_driver_are_eligible():
    """A resumed population's grid holds members the dead driver ran (their run keys are in
    the sweep state, not in this driver's callback); failed and diverged ones are not."""
    from trainables.phases import eligible_members

    grid = [_result("a", 0.9), _result("b", 0.4, factor=1.08), _result("c", 0.1, error=RuntimeError("x")),
            _result("d", 0.2, diverged=True, step=8), _result("e", float("nan"))]
    keys = {"a": "trial-a", "b": "trial-b", "c": "trial-c", "d": "trial-d", "e": "trial-e"}  # state + this driver
    members = eligible_members(grid, "val_loss", keys)
    assert sorted(members) == ["a", "b", "e"]
    best = best_member({t: m.final for t, m in members.items()}, "min")
    assert best == "b" and members[best].key == "trial-b" and members[best].config["controller"]["factor"] == 1.08
    # a member without a child run (never reported) cannot be promoted
    assert sorted(eligible_members(grid, "val_loss", {"a": "trial-a"})) == ["a"]


def test_a_divergence_before_an_interrupt_is_counted_from_the_grid():
    from trainables.tuning import diverged_errors

    grid = [_result("a", 0.9), _result("d", 0.2, diverged=True, step=8), _result("c", 0.1, error=RuntimeError("x"))]
    (line,) = diverged_errors(grid)
    assert line.startswith("trial d (arm pbt, seed 1) diverged at step 8 of 20: train.max_nonfinite"), line
