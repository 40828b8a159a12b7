"""The train loop: one point per step, knobs move only in training, exact resume."""

import math

import pytest

from metalearner.config import load_run_config
from metalearner.trace import MemorySink
from metalearner.train import TrainingRun, lr_at, train


def make_cfg(steps=24, controller=None, task=None, **train):
    return load_run_config({
        "task": task or {"name": "recall", "n_pairs": 4, "distance": 16},
        "model": {"preset": "tiny", "window": 4},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "eval_every": 8, "eval_batches": 1,
                  "warmup_steps": 4, **train},
        "controller": controller or {"name": "ewma", "factor": 1.2, "beta": 0.5, "threshold": 0.0},
    })


def test_every_step_traced_once_with_the_knobs_it_used():
    run = TrainingRun(make_cfg())
    sink = MemorySink()
    summary = train(run, sink, progress=False)
    steps = [r["step"] for r in sink.rows]
    assert steps == list(range(1, 25))
    for r in sink.rows:
        assert {"loss", "loss_ewma", "rope_base", "window", "lr"} <= set(r)
    assert [r["step"] for r in sink.rows if "val_loss" in r] == [8, 16, 24]
    # the knobs recorded at step s are those the controller chose after step s-1
    windows = [r["window"] for r in sink.rows]
    assert windows[0] == 4 and len(set(windows)) > 1
    assert summary.window_range == (min(windows), max(windows))
    assert max(windows) <= 32  # capped at the sequence length


def test_loss_falls_on_text():
    run = TrainingRun(load_run_config({
        "task": {"name": "text"}, "model": {"preset": "tiny"},
        "train": {"steps": 60, "batch_size": 8, "seq_len": 64, "eval_every": 60, "eval_batches": 1},
    }))
    recs = run.advance(60)
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_evaluation_moves_nothing():
    run = TrainingRun(make_cfg())
    run.advance(5)
    knobs, state = run.model.knobs, run.controller.state_dict()
    run.evaluate()
    assert run.model.knobs == knobs and run.controller.state_dict() == state


@pytest.mark.parametrize("controller", [
    {"name": "ewma", "factor": 1.3, "beta": 0.5, "threshold": 0.0},
    {"name": "plateau", "factor": 1.5, "patience": 2, "cooldown": 1, "beta": 0.0},
    {"name": "schedule", "final_window": 32, "final_base": 40_000.0, "warmup_steps": 20},
])
def test_resume_from_checkpoint_is_exact(tmp_path, controller):
    straight = TrainingRun(make_cfg(controller=controller)).advance(24)

    first = TrainingRun(make_cfg(controller=controller))
    part1 = first.advance(11)
    first.save(tmp_path)
    resumed = TrainingRun(make_cfg(controller=controller))
    resumed.load(tmp_path)
    part2 = resumed.advance(24)
    assert part1 + part2 == straight
    assert len({r["window"] for r in straight}) > 1 or controller["name"] == "plateau"


def test_settings_come_from_the_config_not_the_checkpoint(tmp_path):
    """A checkpoint restores the controller's state (its knobs, running loss) but its
    settings stay those of the config that loads it: here factor 1.5 instead of 1.01."""
    beta = 0.5
    run = TrainingRun(make_cfg(controller={"name": "ewma", "factor": 1.01, "beta": beta, "threshold": 0.0}))
    run.advance(6)
    run.save(tmp_path)
    saved = run.controller.state_dict()
    other = TrainingRun(make_cfg(controller={"name": "ewma", "factor": 1.5, "beta": beta, "threshold": 0.0}))
    other.load(tmp_path)
    assert other.controller.settings()["factor"] == 1.5
    assert other.controller.state_dict() == saved  # the state is the checkpoint's
    assert other.model.knobs == run.model.knobs != TrainingRun(make_cfg()).model.knobs

    # with threshold 0 every step moves both knobs by the factor, up when the loss is
    # below its running average: derive each expected move from the loss alone
    running, base, window_f = saved["running"], saved["base_f"], saved["window_f"]
    moves = set()
    for rec in other.advance(24):
        assert rec["rope_base"] == pytest.approx(base)  # the knobs chosen after the step before
        assert rec["window"] == float(math.floor(window_f + 0.5))
        running = beta * running + (1 - beta) * rec["loss"]
        assert rec["loss_ewma"] == pytest.approx(running)
        m = 1.5 if rec["loss"] < running else 1 / 1.5
        base, window_f = base * m, min(max(window_f * m, 1.0), 32.0)
        moves.add(m)
    assert moves == {1.5, 1 / 1.5}  # both directions were exercised
    assert other.model.knobs.rope_base == pytest.approx(base)


def test_lr_schedule_warmup_then_cosine():
    cfg = make_cfg(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1).train
    assert lr_at(1, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1, abs=0.02)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_params_are_flat_and_carry_the_effective_window_cap():
    run = TrainingRun(make_cfg())
    p = run.params()
    assert p["controller.name"] == "ewma" and p["controller.factor"] == 1.2
    assert p["controller.max_window"] == 32  # the sequence length caps the window
    assert p["model.d_model"] == 32 and p["train.seq_len"] == 32 and p["task.name"] == "recall"
    assert all("." in k for k in p)
