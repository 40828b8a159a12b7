"""The trace channel: how a trial's non-scalar report payload reaches the driver's writer
without passing through Tune's results.

A trial's report has two parts (`trainables.reporting.report_metrics` builds both): scalars
(step, loss, knobs, val metrics, ...) and the payload (``trace``: the chunk of steps since
the last report, ``settings``: the controller settings it ran with, ``params``: in the
first report). Tune copies every result into ``trial.last_result``, its JSON logger, the
experiment state and its schedulers, so `send_report` hands only the scalars to
``tune.report``; the payload goes first to the sweep's *inbox*, a small Ray actor
(``num_cpus=0``, pinned to the driver's node, one per sweep) that the driver's
`MlflowTraceCallback` empties when it processes the report. The report names its inbox
(``inbox``: a short string among the scalars), so the callback needs no configuration.

Order: the trial waits for its ``put`` before it calls ``tune.report``, so when the driver
handles a report, that report's chunk (and every earlier one) is already in the inbox;
`take` returns the trial's chunks up to the report's step, in the order they were put.
A worker killed between ``put`` and ``tune.report`` leaves a chunk with no report; the
restarted trial replays its steps from its checkpoint, the orphan is taken with the first
replayed report at or past its step (ahead of that report's own chunk), and the writer
drops the steps it already holds: one point per step, the orphan's (a replay from a
checkpoint repeats the same values).

The inbox's name reaches trials through ``tune.with_parameters``, which ``Tuner.restore``
re-supplies: a resumed sweep's driver opens a new inbox and passes its name with the
trainable; its callbacks (unpickled with the experiment) read the name from each report.
What the old inbox held died with the old driver, and so did the reports it was waiting
for: the restarted trials replay those steps from their checkpoints.

Imports ray; imports neither engine.
"""

from __future__ import annotations

from typing import Any

import ray

from trainables.reporting import INBOX_KEY, PAYLOAD_KEYS

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


def _inbox(name: str) -> Any:
    if name not in _handles:
        _handles[name] = ray.get_actor(name)
    return _handles[name]


def split_report(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scalars for ``tune.report``, payload for the inbox) of a `report_metrics` dict."""
    scalars = {k: v for k, v in metrics.items() if k not in PAYLOAD_KEYS}
    payload = {k: metrics[k] for k in PAYLOAD_KEYS if k in metrics}
    return scalars, payload


def send_report(inbox: str | None, metrics: dict[str, Any], checkpoint: Any = None) -> None:
    """Report from inside a trial: the payload to the inbox (waited for), then the scalars,
    the inbox's name among them, and ``checkpoint`` to Tune.

    Args:
        inbox: the sweep's inbox name; None sends everything through ``tune.report``
            (a trainable run without a sweep runner's inbox).
        metrics: a `trainables.reporting.report_metrics` dict (``step`` included).
        checkpoint: a ``tune.Checkpoint`` or None.
    """
    from ray import tune

    if inbox is not None:
        metrics, payload = split_report(metrics)
        trial_id = tune.get_context().get_trial_id()
        ray.get(_inbox(inbox).put.remote(trial_id, int(metrics["step"]), payload))
        metrics[INBOX_KEY] = inbox
    tune.report(metrics, checkpoint=checkpoint)


def take_payloads(trial_id: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """On the driver: the payloads of ``result`` and of any earlier report of the trial
    still waiting, oldest first. A result that names no inbox carries its own payload."""
    inbox = result.get(INBOX_KEY)
    if inbox is None:
        return [{k: result[k] for k in PAYLOAD_KEYS if k in result}]
    step = int(result.get("step") or 0)
    try:
        return ray.get(_inbox(inbox).take.remote(trial_id, step))
    except Exception as e:  # gone (Ray down, actor killed) or unreachable: say which inbox
        raise RuntimeError(f"trace inbox {inbox!r} (actor on the driver's node): got {type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0]}, expected it to hand over trial "
                           f"{trial_id}'s chunks up to step {step}") from e


def drop_payloads(trial: Any) -> None:
    """On the driver: forget what an ended Tune trial left in its inbox."""
    inbox = (trial.last_result or {}).get(INBOX_KEY)
    if inbox is not None:
        _inbox(inbox).drop.remote(trial.trial_id)
