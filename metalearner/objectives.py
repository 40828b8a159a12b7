"""Multi-objective searches: the ``objectives`` of a spec's ``search`` block, checked before
Ray starts (`metalearner.experiment` calls these).

A search with objectives ranks each trial on every one of them (Optuna's multi-objective
TPE through Ray Tune's ``OptunaSearch``, or random search); the spec's ``metric`` must be
one of them, so that ``compare`` ranks the arms on it. ``attn_compute`` (the attention
compute a trial has spent, `trainables.reporting.ATTN_KEY`) is an objective only here.
Schedulers that rank trials on one metric (ASHA, PBT, PB2) are refused, and so is
HyperOpt. Which trial of the Pareto front is confirmed on the seeds is ``pick``
(`metalearner.report.pareto.pick`). Must not import ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from metalearner.schema import ConfigError, load_dataclass, short

# what a trial reports that only a multi-objective search may rank on, and its direction
OBJECTIVE_METRIC_MODES: dict[str, str] = {"attn_compute": "min"}
MO_SEARCHERS = ("optuna", "random")  # the searchers that rank trials on several objectives
MAX_OBJECTIVES = 4


@dataclass
class Objective:
    """One objective: a metric a trial reports and its direction (None: the metric's own)."""

    metric: str
    mode: Literal["min", "max"] | None = None


def load_objectives(data: Any, searcher: str, scheduler: str, where: str) -> list[Objective]:
    """Parse a search block's ``objectives`` and check the searcher and scheduler they need
    (the metrics are checked against the task by `check_objectives`).

    Args:
        data: the block's ``objectives`` value (None: a single-objective search).
        searcher: ``search.searcher``.
        scheduler: ``search.scheduler.name``.
        where: the search block's field (``search`` or ``arms[i].search``).
    Returns:
        The objectives, in the spec's order (empty for None).
    Raises:
        ConfigError: one line naming the field.
    """
    if data is None:
        return []
    if not isinstance(data, list) or not 2 <= len(data) <= MAX_OBJECTIVES:
        raise ConfigError(f"{where}.objectives: got {short(data)}, expected a list of 2 to {MAX_OBJECTIVES} "
                          "{metric: ..., mode: min|max} (one objective: use 'metric' and 'mode')")
    out = [load_dataclass(Objective, item, f"{where}.objectives[{i}].") for i, item in enumerate(data)]
    names = [o.metric for o in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.objectives: got metrics {names}, expected each metric once")
    if searcher not in MO_SEARCHERS:
        raise ConfigError(f"{where}.searcher: got {searcher!r} with objectives, expected one of {list(MO_SEARCHERS)} "
                          f"({searcher} ranks trials on one metric)")
    if scheduler != "fifo":
        raise ConfigError(f"{where}.scheduler.name: got {scheduler!r} with objectives, expected 'fifo': ASHA, PBT "
                          "and PB2 rank trials on one metric, and a trial stopped early would look cheap in compute")
    return out


def check_objectives(objectives: list[Objective], modes: dict[str, str], metric: str, task: str, where: str) -> None:
    """Each objective is a metric the trial reports, in its direction (a missing mode is
    filled in, in place), and the spec's ``metric`` is one of them.

    Args:
        objectives: from `load_objectives`.
        modes: what a trial of the task reports and may be ranked on -> its direction
            (without `OBJECTIVE_METRIC_MODES`, added here).
        metric: the spec's metric.
        task: the task's name, for the message.
        where: the search block's field.
    Raises:
        ConfigError: one line naming the field.
    """
    if not objectives:
        return
    modes = {**modes, **OBJECTIVE_METRIC_MODES}
    for i, o in enumerate(objectives):
        if o.metric not in modes:
            raise ConfigError(f"{where}.objectives[{i}].metric: got {o.metric!r}, expected one that a {task} trial "
                              f"reports: {sorted(modes)}")
        if o.mode is None:
            o.mode = modes[o.metric]  # type: ignore[assignment]
        elif o.mode != modes[o.metric]:
            raise ConfigError(f"{where}.objectives[{i}].mode: got {o.mode!r}, expected {modes[o.metric]!r} for "
                              f"metric {o.metric!r}")
    names = [o.metric for o in objectives]
    if metric not in names:
        raise ConfigError(f"{where}.objectives: got metrics {names}, expected the spec's metric {metric!r} among "
                          "them (compare ranks the arms on it)")
