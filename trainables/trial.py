"""The Ray Tune function trainable: one trial = one controlled training run.

It builds task, model and controller from the trial config and drives the one train
loop (`metalearner.train.TrainingRun`). Every ``train.report_every`` steps it evaluates
and calls ``tune.report`` with the metrics and the trace chunk of the steps since the
last report (the driver's MLflow writer stores it); a checkpoint goes with every report,
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

import copy
import tempfile
from typing import Any

import torch
from ray import tune

from metalearner.config import load_run_config
from metalearner.tasks import Task
from metalearner.train import TrainingRun

TRACE_KEY = "trace"
SETTINGS_KEY = "settings"
DIVERGED_KEY = "diverged"


def cell_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a trial config into (run config, meta). Grid trials wrap theirs in ``cell``."""
    config = copy.deepcopy(config)
    if "cell" in config:
        config = {**config.pop("cell"), **config}
    meta = config.pop("meta", {})
    return config, meta


def _task_key(cfg: Any) -> tuple:
    t = cfg.train
    return (repr(cfg.task), t.batch_size, t.seq_len, t.eval_batches)


def shared_task(task: Task | None, task_key: tuple | None, cfg: Any) -> Task | None:
    """Reuse the driver's task (data loaded once, shipped with ``tune.with_parameters``)
    when it matches this trial's data settings; only the batch stream's seed differs."""
    if task is None or task_key != _task_key(cfg):
        return None
    mine = copy.copy(task)
    mine.seed = cfg.train.seed
    return mine


def train_trial(config: dict[str, Any], task: Task | None = None, task_key: tuple | None = None,
                threads: int = 1) -> None:
    """Ray Tune function trainable (wrapped with `tune.with_parameters`)."""
    torch.set_num_threads(max(1, int(threads)))
    run_dict, meta = cell_config(config)
    cfg = load_run_config(run_dict)
    if cfg.train.engine == "hf":  # the Hugging Face Trainer drives the same controller
        from trainables.hf_trial import train_trial_hf

        return train_trial_hf(config, task=task, task_key=task_key, threads=threads)
    run = TrainingRun(cfg, task=shared_task(task, task_key, cfg))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            run.load(d)
    params = run.params()
    every, ckpt_every, fail_at = cadence(cfg, meta, restored=checkpoint is not None)
    first = True
    while not run.done:
        records = run.advance(every - run.step % every)
        if records and "val_loss" not in records[-1]:
            records[-1].update(run.evaluate())
        metrics = report_metrics(run.step, cfg, records, run.last_val, run.train_seconds, meta,
                                 params if first else None, diverged=run.diverged)
        first = False
        if run.step % ckpt_every == 0 or run.done:
            with tempfile.TemporaryDirectory() as d:
                run.save(d)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)
        if fail_at and run.step >= fail_at:
            raise RuntimeError(f"injected failure at step {run.step} (meta.fail_at_step)")


def cadence(cfg: Any, meta: dict[str, Any], restored: bool) -> tuple[int, int, int]:
    """(report every, checkpoint every, fail at step) of a trial, for both engines.

    A checkpoint goes with every report unless ``train.checkpoint_every`` asks for fewer
    (a multiple of ``report_every``). ``meta.fail_at_step`` is fault injection for the
    tests of checkpoint recovery: the trial fails once, on its first attempt (0 = never).
    """
    every = cfg.train.report_every
    ck = cfg.train.checkpoint_every
    fail_at = 0 if restored else int(meta.get("fail_at_step", 0))
    return every, (ck if ck and ck % every == 0 else every), fail_at


def report_metrics(step: int, cfg: Any, records: list[dict[str, float]], last_val: dict[str, float],
                   train_seconds: float, meta: dict[str, Any], params: dict[str, Any] | None = None,
                   diverged: bool = False) -> dict[str, Any]:
    """What a trial reports: the latest values, the trace chunk of ``records`` (dict of
    lists, read by the driver's MLflow writer; ``nonfinite_steps`` rides in it), the
    controller settings this process ran the chunk with (``settings``: PBT may have
    changed the trial's config since), ``diverged`` (the run ended by
    ``train.max_nonfinite``) and, in the first report, the params."""
    last = records[-1]
    total_steps = cfg.train.steps
    metrics: dict[str, Any] = {
        "step": step,
        "total_steps": total_steps,
        "loss": last["loss"],
        "rope_base": last["rope_base"],
        "window": last["window"],
        "train_seconds": train_seconds,
        DIVERGED_KEY: bool(diverged),
        TRACE_KEY: {k: [r.get(k) for r in records] for k in _trace_keys(records)},
        "arm": meta.get("arm", ""),
        "phase": meta.get("phase", ""),
        SETTINGS_KEY: {f"controller.{k}": v for k, v in cfg.controller.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)},
        **last_val,
    }
    if params is not None:
        metrics["params"] = params
    return metrics


def _trace_keys(records: list[dict[str, float]]) -> list[str]:
    keys: list[str] = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    return keys
