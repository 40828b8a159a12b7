"""Trace sinks: where the per-step records of a training run go.

A record is a flat dict of floats for one optimizer step (``loss``, ``loss_ewma``,
``rope_base``, ``window``, ``lr``, and ``val_loss`` at evaluation steps). Every trace
enters through the `TraceSink` protocol, whichever engine runs and wherever: ``metalearner
train`` feeds `metalearner.tracking.MlflowSink` (and `CsvSink`), a Ray trial feeds
`trainables.channel.TrialSink`, which ships its rows to the sweep's driver, whose
`MlflowWriter` journals them. A sink keeps no "one point per step" rule of its own: the
writer is the one place that does. This module has the protocol and the sinks that need
nothing but the standard library.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# The trace keys of DESIGN.md, defined here once: every optimizer step logs STEP_KEYS
# (``loss_ewma`` where the controller keeps one), evaluation steps add EVAL_KEYS.
STEP_KEYS = ("loss", "loss_ewma", "rope_base", "window", "lr")
EVAL_KEYS = ("val_loss",)
TRACE_KEYS = (*STEP_KEYS, *EVAL_KEYS)
NONFINITE_KEY = "nonfinite_steps"  # non-finite (skipped) steps so far, logged where the count changes


@runtime_checkable
class TraceSink(Protocol):
    """Where a run's params and per-step trace records go (``close`` ends the run)."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class MemorySink:
    """Keeps everything in memory (tests, notebooks)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.rows: list[dict[str, float]] = []
        self.status: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append({"step": step, **metrics})

    def close(self, status: str = "FINISHED") -> None:
        self.status = status


class CsvSink:
    """One CSV row per step (``--trace-csv``); columns are fixed by the first row plus
    ``val_loss`` and any evaluation metrics, blank where a step has none."""

    def __init__(self, path: str | Path, extra_columns: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._columns = ["step", *TRACE_KEYS, NONFINITE_KEY, *extra_columns]
        self._fh = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self._columns, extrasaction="ignore")
        self._writer.writeheader()

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._writer.writerow({"step": step, **metrics})

    def close(self, status: str = "FINISHED") -> None:
        if not self._fh.closed:
            self._fh.close()


class MultiSink:
    """Sends every call to each of several sinks."""

    def __init__(self, *sinks: TraceSink) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def log_params(self, params: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log_metrics(metrics, step)

    def close(self, status: str = "FINISHED") -> None:
        for s in self.sinks:
            s.close(status)
