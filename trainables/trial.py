"""The Ray Tune function trainable of ``train.engine: torch``: one trial = one training run.

It builds task, model and controller from the trial config and drives the one train
loop (`metalearner.train.TrainingRun`). Every ``train.report_every`` steps it evaluates
and reports: the scalars to ``tune.report``, the trace chunk of the steps since the last
report to the sweep's inbox (`trainables.channel.send_report`; the driver's MLflow writer
stores it); a checkpoint goes with every report,
or with every ``train.checkpoint_every`` steps when that is a multiple of it. On (re)start it restores
from ``tune.get_checkpoint()`` — model, optimizer, controller *state*, RNG and step —
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

import ray
import torch
from ray import tune

from metalearner.config import load_run_config
from metalearner.tasks import Task
from metalearner.train import TrainingRun
from trainables.channel import send_report
from trainables.reporting import NODE_KEY, cadence, cell_config, report_metrics, shared_task


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
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            run.load(d)
    params = run.params()
    every, ckpt_every = cadence(cfg)
    first = True
    while not run.done:
        records = run.advance(every - run.step % every)
        if records and "val_loss" not in records[-1]:
            records[-1].update(run.evaluate())
        metrics = report_metrics(run.step, cfg, records, run.last_val, run.train_seconds, meta,
                                 params if first else None, diverged=run.diverged)
        first = False
        metrics[NODE_KEY] = ray.get_runtime_context().get_node_id()
        if run.step % ckpt_every == 0 or run.done:
            with tempfile.TemporaryDirectory() as d:
                run.save(d)
                send_report(inbox, metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            send_report(inbox, metrics)
