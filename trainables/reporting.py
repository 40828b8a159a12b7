"""What a trial reports, for both engines' trainables and for the driver's callback.

One trial's report holds the latest values (scalars), the trace chunk of the steps since
the last report (``trace``: dict of lists, stored by the driver's `MlflowTraceCallback`),
the controller settings the chunk ran with (``settings``) and, in the first report, the
flattened ``params``. Only the scalars go to ``tune.report``; the three ``PAYLOAD_KEYS``
travel through the sweep's inbox (`trainables.channel`), so Tune's results, loggers and
experiment state never hold a copy of the traces. This module holds that format and the
cadence both trainables share; it imports neither engine, neither trainable, nor ray.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of the processes that only move reports (the inbox actor)
    from metalearner.tasks import Task

TRACE_KEY = "trace"  # the trace chunk in a report
SETTINGS_KEY = "settings"  # the controller settings a chunk ran with
PARAMS_KEY = "params"  # the flattened params, in a trial's first report
PAYLOAD_KEYS = (TRACE_KEY, SETTINGS_KEY, PARAMS_KEY)  # the non-scalar part: never a Tune result
INBOX_KEY = "inbox"  # the name of the inbox holding a report's payload (`trainables.channel`)
DIVERGED_KEY = "diverged"  # True in the last report of a run ended by train.max_nonfinite
NODE_KEY = "node_id"  # the Ray node a report came from (the driver tags the child run metalearner.node_id)
LATEST_KEYS = ("step", "loss", "rope_base", "window", "val_loss")  # what the driver shows per trial
# keys added to the trace at each report step (one point per report step, so one per step):
# cumulative training seconds (wall-clock to a target loss), and the two summary metrics a
# reviewer compares trials by in the MLflow UI: the steps done and the latest val loss
# (a trial a scheduler stops early still ends with both, at its last step)
REPORT_TRACE_KEYS = ("train_seconds", "steps_completed", "val_loss_final")


def cell_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a trial config into (run config, meta). Grid trials wrap theirs in ``cell``."""
    config = copy.deepcopy(config)
    if "cell" in config:
        config = {**config.pop("cell"), **config}
    meta = config.pop("meta", {})
    return config, meta


def task_key(cfg: Any) -> tuple:
    """What a task's data depends on: trials with equal keys can share one loaded task."""
    t = cfg.train
    return (repr(cfg.task), t.batch_size, t.seq_len, t.eval_batches)


def shared_task(task: Task | None, key: tuple | None, cfg: Any) -> Task | None:
    """Reuse the driver's task (data loaded once, shipped with ``tune.with_parameters``)
    when it matches this trial's data settings; only the batch stream's seed differs."""
    if task is None or key != task_key(cfg):
        return None
    mine = copy.copy(task)
    mine.seed = cfg.train.seed
    return mine


def cadence(cfg: Any) -> tuple[int, int]:
    """(report every, checkpoint every) of a trial, for both engines.

    A checkpoint goes with every report unless ``train.checkpoint_every`` asks for fewer
    (a multiple of ``report_every``). (Faults are injected from outside, never by a key
    the trial reads: the tests kill a trial's worker process.)
    """
    every = cfg.train.report_every
    ck = cfg.train.checkpoint_every
    return every, (ck if ck and ck % every == 0 else every)


def report_metrics(step: int, cfg: Any, records: list[dict[str, float]], last_val: dict[str, float],
                   train_seconds: float, meta: dict[str, Any], params: dict[str, Any] | None = None,
                   diverged: bool = False) -> dict[str, Any]:
    """What a trial reports (split by `trainables.channel.send_report` into the scalars
    Tune gets and the ``PAYLOAD_KEYS`` the inbox gets): the latest values, the trace chunk of ``records`` (dict of
    lists, read by the driver's MLflow writer; ``nonfinite_steps`` rides in it), the
    controller settings this process ran the chunk with (``settings``: PBT may have
    changed the trial's config since), ``diverged`` (the run ended by
    ``train.max_nonfinite``) and, in the first report, the params (settings that are None,
    e.g. a static controller's factor, are left out: a missing param reads as "not set",
    the string "null" as a value).

    The last record of the chunk also carries ``REPORT_TRACE_KEYS``: cumulative
    ``train_seconds``, ``steps_completed`` and ``val_loss_final`` (the latest val loss)."""
    last = records[-1]
    stamp = {"train_seconds": float(train_seconds), "steps_completed": float(step)}
    latest_val = last.get("val_loss", last_val.get("val_loss"))
    if latest_val is not None:
        stamp["val_loss_final"] = float(latest_val)
    records = [*records[:-1], {**last, **stamp}]
    metrics: dict[str, Any] = {
        "step": step,
        "total_steps": cfg.train.steps,
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
        metrics[PARAMS_KEY] = {k: v for k, v in params.items() if v is not None}
    return metrics


def _trace_keys(records: list[dict[str, float]]) -> list[str]:
    keys: list[str] = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    return keys
