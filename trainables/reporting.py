"""What a trial reports, for both engines' trainables and for the driver's callback.

One trial's report has two parts. The scalars (the latest step, loss, knobs, val metrics,
``diverged``; `report_metrics`) go to ``tune.report``. The payload travels through the
sweep's inbox (`trainables.channel`), so Tune's results, loggers and experiment state
never hold a copy of the traces: ``rows`` (the trace rows of the steps since the last
report, one dict per step, as the trial's `TraceSink` received them; the last one also
carries `chunk_stamp`), ``settings`` (the controller settings the chunk ran with) and, in
the first report, ``params`` and, when the trial (re)started from a checkpoint,
``restored_from``: the trial and step that wrote it (`ORIGIN_FILE`, in every checkpoint a
trial reports; a checkpoint of *another* trial means a PBT/PB2 exploit copied that trial's
weights, and the driver records the perturbation: `metalearner.tracking.lineage`). Every
report also carries ``attn_compute``, the attention compute the run has spent so far
(`AttentionMeter`), among the scalars (a multi-objective search ranks trials on it) and in
the last row of the chunk. This module holds that format and the cadence both trainables
share; it imports neither engine, neither trainable, nor ray.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of the processes that only move reports (the inbox actor)
    from metalearner.tasks import Task

ROWS_KEY = "rows"  # the trace chunk of a report: one dict per step ({"step": s, key: value, ...})
SETTINGS_KEY = "settings"  # the controller settings a chunk ran with
PARAMS_KEY = "params"  # the flattened params, in a trial's first report
ORIGIN_KEY = "restored_from"  # {"trial_id", "step"}: whose checkpoint a (re)started trial loaded
PAYLOAD_KEYS = (ROWS_KEY, SETTINGS_KEY, PARAMS_KEY, ORIGIN_KEY)  # the non-scalar part: never a Tune result
ORIGIN_FILE = "metalearner_origin.json"  # in each checkpoint a trial reports: the trial and step that wrote it
INBOX_KEY = "inbox"  # the name of the inbox holding a report's payload (`trainables.channel`)
DIVERGED_KEY = "diverged"  # True in the last report of a run ended by train.max_nonfinite
NODE_KEY = "node_id"  # the Ray node a report came from (the driver tags the child run metalearner.node_id)
LATEST_KEYS = ("step", "loss", "rope_base", "window", "val_loss")  # what the driver shows per trial
# keys added to the trace at each report step (one point per report step, so one per step):
# cumulative training seconds (wall-clock to a target loss), and the two summary metrics a
# reviewer compares trials by in the MLflow UI: the steps done and the latest val loss
# (a trial a scheduler stops early still ends with both, at its last step)
REPORT_TRACE_KEYS = ("train_seconds", "steps_completed", "val_loss_final")
# the attention compute spent so far (`AttentionMeter`): a report scalar and a trace key of
# each report step, like REPORT_TRACE_KEYS
ATTN_KEY = "attn_compute"


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


def report_metrics(step: int, cfg: Any, last: dict[str, float], last_val: dict[str, float], train_seconds: float,
                   meta: dict[str, Any], diverged: bool = False) -> dict[str, Any]:
    """The scalars of a report (what ``tune.report`` gets): the latest values (of the
    chunk's ``last`` row), the trial's arm and phase, and ``diverged`` (the run ended by
    ``train.max_nonfinite``)."""
    return {
        "step": step,
        "total_steps": cfg.train.steps,
        "loss": last["loss"],
        "rope_base": last["rope_base"],
        "window": last["window"],
        "train_seconds": train_seconds,
        DIVERGED_KEY: bool(diverged),
        "arm": meta.get("arm", ""),
        "phase": meta.get("phase", ""),
        **last_val,
    }


def chunk_stamp(step: int, train_seconds: float, last: dict[str, float],
                last_val: dict[str, float]) -> dict[str, float]:
    """The `REPORT_TRACE_KEYS` the last row of a chunk carries: cumulative
    ``train_seconds``, ``steps_completed`` and ``val_loss_final`` (the latest val loss)."""
    stamp = {"train_seconds": float(train_seconds), "steps_completed": float(step)}
    latest_val = last.get("val_loss", last_val.get("val_loss"))
    if latest_val is not None:
        stamp["val_loss_final"] = float(latest_val)
    return stamp


def run_settings(cfg: Any) -> dict[str, float]:
    """The numeric controller settings this process runs with (``settings``: PBT may have
    changed the trial's config since), as dotted keys."""
    return {f"controller.{k}": v for k, v in cfg.controller.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class AttentionMeter:
    """The attention compute a run has spent: the report's cost model (query-key pairs one
    attention layer scores per sequence at the step's window,
    `metalearner.report.stats.attention_cost`) summed over the steps done, so a trial's
    ``attn_compute`` is the figure ``compare`` computes from its ``window`` trace.

    The shape comes from the run's flattened params (the keys the report reads:
    ``train.seq_len``, ``model.n_heads``, ``model.n_global_heads``, ``model.arch``); the
    total travels in each checkpoint (`FILE`), so a restored trial (a retry, a resumed
    sweep, a PBT exploit) goes on from the checkpoint's step.
    """

    FILE = "attn_compute.json"

    def __init__(self) -> None:
        self.total = 0.0
        self.shape: tuple[int, int, int, bool] | None = None

    def configure(self, params: dict[str, Any]) -> None:
        """Take the attention shape from a run's flattened params (None when they lack it)."""
        try:
            self.shape = (int(params["train.seq_len"]), int(params["model.n_heads"]),
                          int(params["model.n_global_heads"]), params.get("model.arch") != "encoder_decoder")
        except (KeyError, TypeError, ValueError):
            self.shape = None

    def add(self, rows: Iterable[dict[str, float]]) -> None:
        """Count the steps of ``rows`` (each with the ``window`` its step used)."""
        windows = [float(r["window"]) for r in rows if math.isfinite(r.get("window", math.nan))]
        if self.shape is None or not windows:
            return
        from metalearner.report.stats.to_target import attention_cost  # numpy only; the report's one cost model

        self.total += float(sum(attention_cost(windows, *self.shape)))  # type: ignore[arg-type]

    def stamp(self) -> dict[str, float]:
        """``{ATTN_KEY: total}`` for a report, or nothing when the shape is unknown."""
        return {} if self.shape is None else {ATTN_KEY: self.total}

    def save(self, directory: str | Path) -> None:
        """Write the total into a checkpoint folder."""
        (Path(directory) / self.FILE).write_text(json.dumps({ATTN_KEY: self.total}))

    def load(self, directory: str | Path) -> None:
        """Read the total from a checkpoint folder (0 when it has none: a checkpoint from
        before the meter)."""
        f = Path(directory) / self.FILE
        self.total = float(json.loads(f.read_text())[ATTN_KEY]) if f.is_file() else 0.0
