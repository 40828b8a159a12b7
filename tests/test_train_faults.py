"""Faults in one training run: non-finite steps are skipped, counted and end the run;
checkpoints load safely (weights_only), refuse a changed config and name a corrupt file.

The faults come from outside the code under test: a learning rate so large that the real
run diverges (1e10: the loss is NaN from step 2 on; 100: the loss stays finite but the
gradients overflow), files written by the test, and a pickle that would run code.
"""

import copy
import math
import pickle

import pytest
import torch

from metalearner.config import ConfigError, config_diff, load_run_config
from metalearner.train import CHECKPOINT_FILE, CheckpointError, TrainingRun, read_checkpoint, train

NAN_LR = 1e10  # step 1 is finite, every later loss is NaN (the weights have blown up)
OVERFLOW_LR = 100.0  # step 2 on: a finite loss whose gradient norm is inf


def make_cfg(steps=12, **train):
    return load_run_config({
        "task": {"name": "recall", "n_pairs": 4, "distance": 16},
        "model": {"preset": "tiny", "window": 4},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "eval_every": 6, "eval_batches": 1,
                  "warmup_steps": 1, **train},
        "controller": {"name": "ewma", "factor": 1.2, "beta": 0.5, "threshold": 0.0},
    })


def snapshot(run):
    return copy.deepcopy({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()})


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("lr", [NAN_LR, OVERFLOW_LR], ids=["nan-loss", "inf-grad-norm"])
def test_a_nonfinite_step_leaves_weights_and_optimizer_untouched(lr):
    run = TrainingRun(make_cfg(lr=lr))
    (first,) = run.advance(1)
    assert math.isfinite(first["loss"]) and "nonfinite_steps" not in first
    before = snapshot(run)
    (second,) = run.advance(1)
    assert second["nonfinite_steps"] == 1.0
    if lr == NAN_LR:
        assert math.isnan(second["loss"])
    else:  # the loss is finite; only the gradients are not
        assert math.isfinite(second["loss"])
    assert_same_tensors(snapshot(run), before)
    assert all(p.grad is None for p in run.model.parameters())
    assert run.step == 2  # the step still counts: the next batch and learning rate are step 3's
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_the_run_ends_after_max_nonfinite_steps_in_a_row():
    run = TrainingRun(make_cfg(steps=30, lr=NAN_LR, max_nonfinite=4))
    summary = train(run, None, progress=False)
    assert summary.diverged and run.diverged and run.done
    assert summary.steps == 5 and summary.nonfinite_steps == 4
    # the controller ignored every NaN loss, as before
    assert run.controller.nonfinite == 4


def test_counter_in_the_trace_and_one_point_per_step():
    run = TrainingRun(make_cfg(steps=30, lr=NAN_LR, max_nonfinite=3))
    records = run.advance(30)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("nonfinite_steps") for r in records] == [None, 1.0, 2.0, 3.0]
    for r in records:  # the other keys at every step, NaN loss included
        assert {"loss", "loss_ewma", "rope_base", "window", "lr"} <= set(r)
    assert run.advance(5) == []  # a diverged run runs no more steps


def test_a_finite_step_resets_the_streak_but_not_the_count():
    """Unit test of the one decision both engines call (inputs made up)."""
    run = TrainingRun(make_cfg())
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    assert run.skip_nonfinite(nan, 1.0) and run.skip_nonfinite(one, float("inf"))
    assert (run.nonfinite_steps, run.nonfinite_streak) == (2, 2)
    assert not run.skip_nonfinite(one, torch.tensor(0.5))
    assert (run.nonfinite_steps, run.nonfinite_streak) == (2, 0)
    assert not run.diverged


def test_resume_keeps_the_counters_and_diverges_at_the_same_step(tmp_path):
    full = TrainingRun(make_cfg(steps=30, lr=NAN_LR, max_nonfinite=4))
    expected = full.advance(30)
    first = TrainingRun(make_cfg(steps=30, lr=NAN_LR, max_nonfinite=4))
    head = first.advance(3)
    first.save(tmp_path)
    second = TrainingRun(make_cfg(steps=30, lr=NAN_LR, max_nonfinite=4))
    second.load(tmp_path, same_config=True)
    tail = second.advance(30)
    assert [(r["step"], r.get("nonfinite_steps")) for r in head + tail] == \
        [(r["step"], r.get("nonfinite_steps")) for r in expected]
    assert second.diverged and second.nonfinite_steps == 4


# ---------------------------------------------------------------- loading


class RunsCode:
    """Unpickling this runs ``marker.touch()``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_unexecuted(tmp_path, how):
    run = TrainingRun(make_cfg())
    run.advance(1)
    state = run.state_dict()
    marker = tmp_path / "pwned"
    state["controller"] = RunsCode(marker)
    path = tmp_path / CHECKPOINT_FILE
    if how == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(CheckpointError) as e:
        TrainingRun(make_cfg()).load(tmp_path)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "refused" in msg
    # the file really is armed: a trusting load runs it
    if how == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-dict"])
def test_a_corrupt_checkpoint_raises_one_line(tmp_path, damage):
    run = TrainingRun(make_cfg())
    run.advance(1)
    path = run.save(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError) as e:
        TrainingRun(make_cfg()).load(tmp_path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_the_saved_state_is_plain_enough_for_weights_only(tmp_path):
    run = TrainingRun(make_cfg())
    run.advance(2)
    state = read_checkpoint(run.save(tmp_path))
    assert state["config"] == run.cfg.to_dict()
    assert state["rng"]["python"] == __import__("random").getstate()
    assert state["nonfinite"] == {"steps": 0, "streak": 0}


def test_resume_with_another_config_names_the_first_differing_field(tmp_path):
    run = TrainingRun(make_cfg())
    run.advance(2)
    run.save(tmp_path)
    other = TrainingRun(make_cfg(lr=0.01))
    with pytest.raises(ConfigError) as e:
        other.load(tmp_path, same_config=True)
    msg = str(e.value)
    assert msg.startswith("train.lr: got 0.01, expected 0.003") and "\n" not in msg
    assert other.step == 0  # nothing was restored
    other.load(tmp_path)  # a Ray trial (PBT) restores without the check
    assert other.step == 2


def test_a_checkpoint_written_before_a_config_field_existed_resumes(tmp_path, monkeypatch, capsys):
    """``train --resume`` of a checkpoint whose saved config lacks fields added since (as an
    older version wrote it) continues, those fields counting as their defaults; a real
    change is still refused, and so is a checkpoint naming another controller, whose
    plugin is not imported."""
    import sys

    from metalearner.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["train", "--task", "recall", "--no-mlflow", "--checkpoint-dir", "ck", "--set", "model.preset=tiny",
            "--set", "train.seq_len=64", "--set", "train.batch_size=4", "--set", "train.eval_batches=1"]
    assert main([*argv, "--steps", "2", "--trace-csv", "first.csv"]) == 0, capsys.readouterr().err
    path = tmp_path / "ck" / CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    for key in ("max_nonfinite", "checkpoint_every", "engine"):  # fields later versions added, at their defaults
        del state["config"]["train"][key]
    torch.save(state, path)
    assert main([*argv, "--steps", "4", "--resume", "--trace-csv", "t.csv"]) == 0, capsys.readouterr().err
    assert [line.split(",")[0] for line in (tmp_path / "t.csv").read_text().splitlines()[1:]] == ["3", "4"]

    cfg = load_run_config(state["config"]).to_dict()  # what the checkpoint's run was
    cfg["train"]["max_nonfinite"] = 3
    with pytest.raises(ConfigError, match=r"^train.max_nonfinite: got 3, expected 10 as in the checkpoint"):
        TrainingRun(load_run_config(cfg)).load(tmp_path / "ck", same_config=True)
    # a plugin on sys.path that leaves a mark when imported, named by the checkpoint alone
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "plug_never_imported.py").write_text(
        "from pathlib import Path\nPath(__file__).with_suffix('.imported').touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    state["config"]["controller"]["name"] = "plug_never_imported:Policy"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"^controller.name: got 'ewma', expected 'plug_never_imported:Policy'"):
        TrainingRun(load_run_config({**cfg, "train": {**cfg["train"], "max_nonfinite": 10}})).load(
            tmp_path / "ck", same_config=True)
    assert "plug_never_imported" not in sys.modules and not (tmp_path / "code" / "plug_never_imported.imported").exists()


def test_config_diff():
    a = {"train": {"lr": 0.1, "steps": 5}, "controller": {"name": "ewma", "factor": 1.1}}
    b = {"train": {"lr": 0.1, "steps": 6}, "controller": {"name": "ewma", "factor": 1.1, "beta": 0.5}}
    assert config_diff(a, a) == []
    assert config_diff(a, b) == ["train.steps", "controller.beta"]
    assert config_diff(b, a) == ["train.steps", "controller.beta"]
