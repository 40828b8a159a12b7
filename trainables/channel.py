"""The trace channel: a Ray trial's `TraceSink`, and how what it collects reaches the
driver's writer without passing through Tune's results.

A trial feeds its trace to a `TrialSink`, the same `metalearner.trace.TraceSink`
protocol that ``metalearner train`` feeds: one row per step (``{"step": s, "loss": ...}``).
At each report the sink ships its rows, as rows, with the controller settings and (the
first time) the params, to the sweep's *inbox*: a small Ray actor (``num_cpus=0``, pinned
to the driver's node, one per sweep) that the driver's `MlflowTraceCallback` empties when
it handles the report; the scalars (step, loss, knobs, val metrics, ...) go to
``tune.report``. Tune copies every result into ``trial.last_result``, its JSON logger, the
experiment state and its schedulers; the traces stay out of all of them. The report
names its inbox (``inbox``: a short string among the scalars), so the callback needs no
configuration.

Order: the trial waits for its ``put`` before it calls ``tune.report``, so when the driver
handles a report, that report's chunk (and every earlier one) is already in the inbox;
`take_payloads` returns the trial's chunks up to the report's step, in the order they
were put. A worker killed between ``put`` and ``tune.report`` leaves a chunk with no
report; the restarted trial replays its steps from its checkpoint, the orphan is taken
with the first replayed report at or past its step (ahead of that report's own chunk),
and the writer keeps one point per step (`MlflowWriter.log_rows`: the orphan's, since a
replay from a checkpoint repeats the same values).

The inbox's name reaches trials through ``tune.with_parameters``, which ``Tuner.restore``
re-supplies: a resumed sweep's driver opens a new inbox and passes its name with the
trainable; its callbacks (unpickled with the experiment) read the name from each report.
What the old inbox held died with the old driver, and so did the reports it was waiting
for: the restarted trials replay those steps from their checkpoints.

Imports ray; imports neither engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray

from trainables.reporting import (
    INBOX_KEY,
    NODE_KEY,
    ORIGIN_FILE,
    ORIGIN_KEY,
    PARAMS_KEY,
    PAYLOAD_KEYS,
    ROWS_KEY,
    SETTINGS_KEY,
    AttentionMeter,
    chunk_stamp,
    report_metrics,
    run_settings,
)

_handles: dict[str, Any] = {}  # inbox name -> actor handle, per process


class Inbox:
    """Payloads put by trials and not yet taken by the driver, per trial id."""

    def __init__(self) -> None:
        self._pending: dict[str, list[tuple[int, dict[str, Any]]]] = {}

    def put(self, trial_id: str, step: int, payload: dict[str, Any]) -> None:
        self._pending.setdefault(trial_id, []).append((int(step), payload))

    def take(self, trial_id: str, upto: int) -> list[dict[str, Any]]:
        """The trial's payloads put for steps <= ``upto``, oldest first (removed)."""
        mine = self._pending.get(trial_id, [])
        out = [p for s, p in mine if s <= upto]
        rest = [(s, p) for s, p in mine if s > upto]
        if rest:
            self._pending[trial_id] = rest
        else:
            self._pending.pop(trial_id, None)
        return out

    def drop(self, trial_id: str) -> int:
        """Forget the trial's payloads (it ended); returns how many there were."""
        return len(self._pending.pop(trial_id, []))

    def pending(self) -> dict[str, int]:
        """Trial id -> payloads waiting (for tests and diagnostics)."""
        return {t: len(p) for t, p in self._pending.items()}


def inbox_name(folder_name: str) -> str:
    """The inbox name of the sweep whose experiment folder is ``folder_name`` (unique on a
    cluster: the folder name holds the sweep's name and start time)."""
    return f"metalearner-inbox-{folder_name}"


def open_inbox(name: str) -> str:
    """Start the inbox actor ``name`` on this (the driver's) node, or reuse a live one;
    returns ``name``. Call after ``ray.init``."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(Inbox).options(
        name=name, get_if_exists=True, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote()
    ray.get(actor.pending.remote())  # started and reachable before any trial looks for it
    _handles[name] = actor
    return name


def close_inbox(name: str) -> None:
    """End the inbox actor ``name`` (what it still holds is dropped); nothing to do when
    Ray is already down (the actor went with it)."""
    actor = _handles.pop(name, None)
    if not ray.is_initialized():
        return
    try:
        ray.kill(actor if actor is not None else ray.get_actor(name))
    except ValueError:  # no such actor (any more)
        pass


def inbox_actor(name: str) -> Any:
    """The handle of the inbox actor ``name`` (looked up once per process)."""
    if name not in _handles:
        _handles[name] = ray.get_actor(name)
    return _handles[name]


class TrialSink:
    """The `TraceSink` of a Ray trial (both engines): keeps the rows of the steps since
    the last report and ships them with the next one (`report`).

    Args:
        inbox: the sweep's inbox name; None sends everything through ``tune.report``
            (a trainable run without a sweep runner's inbox).
        cfg: the trial's run config (its controller settings go with each chunk).
        meta: the trial's arm and phase.
    """

    def __init__(self, inbox: str | None, cfg: Any, meta: dict[str, Any]) -> None:
        self.inbox, self.cfg, self.meta = inbox, cfg, meta
        self.rows: list[dict[str, float]] = []
        self.params: dict[str, Any] | None = None
        self.reported = False  # the first report also says whose checkpoint the trial started from
        self.meter = AttentionMeter()  # attn_compute; `restore` reads its total from a checkpoint

    def restore(self, checkpoint_dir: Any) -> None:
        """Go on from a checkpoint: the attention compute spent up to its step."""
        self.meter.load(checkpoint_dir)

    def log_params(self, params: dict[str, Any]) -> None:
        # settings that are None (e.g. a static controller's factor) are left out: a
        # missing param reads as "not set", the string "null" as a value
        self.params = {k: v for k, v in params.items() if v is not None}
        self.meter.configure(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append({"step": step, **metrics})

    def close(self, status: str = "FINISHED") -> None:
        """Nothing to do: every row leaves with a report (`report`), and the run's status is
        set by the driver's callback when Tune ends the trial."""

    def report(self, step: int, last_val: dict[str, float], train_seconds: float, diverged: bool = False,
               checkpoint_dir: Any = None, evaluated: dict[str, float] | None = None) -> None:
        """Report from inside the trial: the rows since the last report (the last one
        completed with ``evaluated`` and `chunk_stamp`), the settings and, the first time,
        the params and whose checkpoint the trial started from (`checkpoint_origin`), to
        the inbox (waited for); then the scalars, and the checkpoint folder
        ``checkpoint_dir`` (or None, else stamped with this trial and step), to Tune.

        Args:
            step: the last step done.
            last_val: the latest evaluation (``val_loss`` + the task's metrics).
            train_seconds: the training seconds so far.
            diverged: the run was ended by ``train.max_nonfinite``.
            checkpoint_dir: a folder holding this step's checkpoint, or None.
            evaluated: an evaluation of the last step done after its row was logged.
        """
        from ray import tune

        rows, self.rows = self.rows, []
        self.meter.add(rows)
        last = {**rows[-1], **(evaluated or {})}
        rows[-1] = {**last, **chunk_stamp(step, train_seconds, last, last_val), **self.meter.stamp()}
        scalars = {**report_metrics(step, self.cfg, last, last_val, train_seconds, self.meta, diverged),
                   **self.meter.stamp()}
        scalars[NODE_KEY] = ray.get_runtime_context().get_node_id()
        payload: dict[str, Any] = {ROWS_KEY: rows, SETTINGS_KEY: run_settings(self.cfg)}
        if self.params is not None:
            payload[PARAMS_KEY], self.params = self.params, None
        trial_id = tune.get_context().get_trial_id()
        if not self.reported:
            self.reported = True
            origin = checkpoint_origin(tune.get_checkpoint())
            if origin is not None:
                payload[ORIGIN_KEY] = origin
        if self.inbox is not None:
            ray.get(inbox_actor(self.inbox).put.remote(trial_id, step, payload))
            scalars[INBOX_KEY] = self.inbox
        else:
            scalars.update(payload)
        checkpoint = None
        if checkpoint_dir is not None:
            self.meter.save(checkpoint_dir)
            (Path(checkpoint_dir) / ORIGIN_FILE).write_text(json.dumps({"trial_id": trial_id, "step": int(step)}))
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
        tune.report(scalars, checkpoint=checkpoint)


def checkpoint_origin(checkpoint: Any) -> dict[str, Any] | None:
    """The trial and step that wrote ``checkpoint`` (its `ORIGIN_FILE`, read through the
    checkpoint's own filesystem, so a checkpoint in cloud storage is not downloaded):
    ``{"trial_id": ..., "step": ...}``; None for no checkpoint or one without the file."""
    if checkpoint is None:
        return None
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{ORIGIN_FILE}") as f:
            origin = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):  # not there (a checkpoint of an older version), or unreadable
        return None
    return {"trial_id": str(origin["trial_id"]), "step": int(origin["step"])} if "trial_id" in origin else None


def take_payloads(trial_id: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """On the driver: the payloads of ``result`` and of any earlier report of the trial
    still waiting, oldest first. A result that names no inbox carries its own payload."""
    inbox = result.get(INBOX_KEY)
    if inbox is None:
        return [{k: result[k] for k in PAYLOAD_KEYS if k in result}]
    step = int(result.get("step") or 0)
    try:
        return ray.get(inbox_actor(inbox).take.remote(trial_id, step))
    except Exception as e:  # gone (Ray down, actor killed) or unreachable: say which inbox
        raise RuntimeError(f"trace inbox {inbox!r} (actor on the driver's node): got {type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0]}, expected it to hand over trial "
                           f"{trial_id}'s chunks up to step {step}") from e


def drop_payloads(trial: Any) -> None:
    """On the driver: forget what an ended Tune trial left in its inbox."""
    inbox = (trial.last_result or {}).get(INBOX_KEY)
    if inbox is not None:
        inbox_actor(inbox).drop.remote(trial.trial_id)
