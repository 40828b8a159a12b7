"""The Ray Tune function trainable of ``train.engine: torch``: one trial = one training run.

It builds task, model and controller from the trial config and drives the one train
loop (`metalearner.train.TrainingRun.advance`) into a `trainables.channel.TrialSink`, the
same `TraceSink` protocol ``metalearner train`` feeds. Every ``train.report_every`` steps
it evaluates and reports: the sink ships the rows of the steps since the last report to
the sweep's inbox (the driver's MLflow writer journals them) and the scalars to
``tune.report``; a checkpoint goes with every report, or with every
``train.checkpoint_every`` steps when that is a multiple of it. On (re)start it restores
from ``tune.get_checkpoint()`` — model, optimizer, controller *state*, RNG, step and the
attention compute spent (``attn_compute``, `trainables.reporting.AttentionMeter`) —
while the controller's *settings* always come from the trial config, so a PBT/PB2
perturbation takes effect from the next step on.

A run that diverges (``train.max_nonfinite`` non-finite steps in a row) stops at once:
its last report carries ``diverged: True`` and a checkpoint, and the trial returns (no
exception, so Ray neither logs a traceback nor retries it); the driver's callback tags
the child run ``metalearner.diverged`` and the sweep counts the trial as failed.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from ray import tune

from metalearner.config import load_run_config
from metalearner.tasks import Task
from metalearner.train import TrainingRun
from trainables.channel import TrialSink
from trainables.reporting import cadence, cell_config, shared_task


def train_trial(config: dict[str, Any], task: Task | None = None, task_key: tuple | None = None,
                threads: int = 1, inbox: str | None = None) -> None:
    """Ray Tune function trainable (wrapped with `tune.with_parameters`), PyTorch engine.

    The sweep runner picks it, or `trainables.hf_trial.train_trial_hf`, by ``train.engine``.
    ``inbox`` names the sweep's trace inbox (`trainables.channel`); None: the trace
    chunks ride in the Tune results.
    """
    torch.set_num_threads(max(1, int(threads)))
    run_dict, meta = cell_config(config)
    cfg = load_run_config(run_dict)
    run = TrainingRun(cfg, task=shared_task(task, task_key, cfg))
    checkpoint = tune.get_checkpoint()
    sink = TrialSink(inbox, cfg, meta)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            run.load(d)
            sink.restore(d)
    sink.log_params(run.params())
    every, ckpt_every = cadence(cfg)
    while not run.done:
        rows = run.advance(every - run.step % every, sink)
        evaluated = {} if "val_loss" in rows[-1] else run.evaluate()  # every report step is evaluated
        progress = (run.step, run.last_val, run.train_seconds, run.diverged)
        if run.step % ckpt_every == 0 or run.done:
            with tempfile.TemporaryDirectory() as d:
                run.save(d)
                sink.report(*progress, checkpoint_dir=d, evaluated=evaluated)
        else:
            sink.report(*progress, evaluated=evaluated)
