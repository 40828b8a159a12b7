"""Run the phases of a sweep on Ray Tune: the one place a phase's Tune experiment is built
or restored, fitted, shown, stopped and read back.

A sweep is a series of phases, each one Tune experiment and one entry of the sweep's
state: a searched arm's search, each population of a per-seed arm (`trainables.phases`),
the comparison grid. `trainables.sweep` decides which phases run, in which order, and
what their results mean; every phase runs through `PhaseRunner.run`:
1. the phase's trace callback (`MlflowTraceCallback`) and, if asked, its live table;
2. a new Tuner, or, in a resumed sweep, ``Tuner.restore`` of the phase's own Tune
   experiment (its finished trials are not rerun, the unfinished ones continue);
3. ``fit()``, during which a `StopRequest` is relayed into Tune as its own first Ctrl-C;
4. the outcome: the result grid, the trials' child runs, failed trials' errors (appended
   to the sweep's error log) and diverged trials (read from the grid, so also those an
   earlier, interrupted driver saw); or, when a stop request ended the phase, its
   unfinished children tagged ``metalearner.interrupted``.
Around these, ``on_phase`` (the sweep's) hears ``"start"``, ``"trials"`` (the phase's
first trial started) and ``"end"``.

Imports ray only inside functions.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metalearner.config import load_run_config
from metalearner.environment import HF_OFFLINE, TUNE_QUIET, set_defaults
from metalearner.experiment import Arm, ExperimentSpec
from metalearner.sweep_state import SweepState
from metalearner.tracking import INTERRUPTED_TAG, MlflowWriter
from trainables.storage import experiment_uri
from trainables.tuning import (
    diverged_errors,
    log_trial_errors,
    make_scheduler,
    make_searcher,
    make_tuner,
    search_space,
)

log = logging.getLogger(__name__)


class StopRequest:
    """A sweep's stop request: the face's first SIGINT/SIGTERM.

    Between phases it is a flag (no later phase starts). While a phase's ``fit()`` runs,
    `set` also calls the stop handler Tune installs for SIGUSR1 (its own first Ctrl-C):
    the Tune loop saves its experiment state and stops the trials, whose last reported
    checkpoints a resume continues from.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._fitting = False

    def set(self) -> None:
        """Request the stop (safe from a signal handler)."""
        self._event.set()
        if self._fitting:
            handler = signal.getsignal(signal.SIGUSR1)  # Tune's, while fit() runs
            if callable(handler):
                handler(signal.SIGUSR1, None)

    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self._event.is_set()

    @contextmanager
    def fitting(self) -> Iterator[None]:
        """The span of a ``fit()``: a stop requested in it is relayed into Tune."""
        self._fitting = True
        try:
            yield
        finally:
            self._fitting = False


@dataclass(frozen=True)
class Phase:
    """One phase of a sweep: one Tune experiment.

    Attributes:
        key: its entry in the sweep's state (``search:ARM``, ``search:ARM:sSEED``, ``compare``).
        name: the Tune experiment's name (its folder under the sweep's storage).
        title: the live table's title.
        space: the param space.
        mutable_keys: config keys the scheduler changes mid-run (PBT), logged as metrics.
        scheduler: the scheduler's name, for the child runs' tags ("" for the grid).
        tuner_args: searcher, scheduler, samples, actor reuse, checkpoints kept (`make_tuner`).
    """

    key: str
    name: str
    title: str
    space: dict[str, Any]
    mutable_keys: list[str] = field(default_factory=list)
    scheduler: str = ""
    tuner_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class PhaseOutcome:
    """What a phase left.

    Attributes:
        grid: Tune's result grid.
        trials: trial id -> its info (arm, seed, phase, child run key), for the trials this
            driver saw.
        run_keys: trial id -> its child run's key in the sweep's journal (this driver's).
        interrupted: a stop request ended the phase before all its trials did.
        errors: one line per failed or diverged trial (empty when interrupted).
        first_error: the first failed trial's full error and folder, or None.
    """

    grid: Any
    trials: dict[str, dict[str, Any]]
    run_keys: dict[str, str]
    interrupted: bool
    errors: list[str] = field(default_factory=list)
    first_error: str | None = None


class PhaseRunner:
    """Runs the phases of one sweep (see the module docstring).

    Args:
        spec: the experiment.
        storage: Tune's storage (a folder or a URI).
        trainable: the sweep's trainable.
        writer: the sweep's `MlflowWriter`.
        state: the sweep's durable state.
        parent: the parent run's key.
        stop: the sweep's stop request.
        resume_dir: the folder of the sweep being resumed, or None for a new sweep.
        steps: training steps of a trial (the live table's total).
        error_log: the file failed trials' full errors are appended to.
        colours: arm -> colour for the UI, or None.
        set_right: run keys a resume set KILLED (handed to each phase's callback).
        progress: False shows nothing; True a live table; None a live table on a terminal,
            plain lines elsewhere.
        on_phase: called with ``("start", phase)`` before a phase's Tune run, ``("trials",
            phase)`` when its first trial starts (its child run journaled) and ``("end",
            phase)`` once its outcome is read; None: nothing is called.
    """

    def __init__(self, spec: ExperimentSpec, storage: str, trainable: Any, writer: MlflowWriter,
                 state: SweepState, parent: str, stop: StopRequest, resume_dir: Path | None, steps: int,
                 error_log: Path, colours: dict[str, str] | None = None, set_right: set[str] | None = None,
                 progress: bool | None = False,
                 on_phase: Callable[[str, Phase], None] | None = None) -> None:
        self.spec = spec
        self.storage = storage
        self.trainable = trainable
        self.writer = writer
        self.state = state
        self.parent = parent
        self.stop = stop
        self.resume_dir = resume_dir
        self.steps = steps
        self.error_log = error_log
        self.colours = colours
        self.set_right = set(set_right or ())
        self.progress = progress
        self.on_phase = on_phase

    def _tell(self, event: str, phase: Phase) -> None:
        if self.on_phase is not None:
            self.on_phase(event, phase)

    def search(self, arm: Arm, config: dict[str, Any], meta: dict[str, Any], key: str, name: str,
               title: str) -> PhaseOutcome:
        """Run a search phase of ``arm``: its searcher, scheduler and space on ``config``.

        Args:
            arm: an arm with a ``search`` block.
            config: the nested run config the search starts from (its seed included).
            meta: the trials' meta (``arm``, ``phase`` = ``search``, ...).
            key: the phase's key in the sweep's state.
            name: the Tune experiment's name.
            title: the live table's title.
        Returns:
            The phase's `PhaseOutcome`.
        """
        s = arm.search
        assert s is not None
        report_every = load_run_config(config).train.report_every
        pb = s.population_based
        return self.run(Phase(
            key=key, name=name, title=title, space=search_space(config, s.space, meta),
            mutable_keys=list(s.space) if pb else [], scheduler=s.scheduler.name,
            tuner_args={"search_alg": make_searcher(arm, self.spec),
                        "scheduler": make_scheduler(arm, self.steps, report_every), "num_samples": s.num_samples,
                        "reuse": not pb, "keep": None if pb else 2}))

    def run(self, phase: Phase) -> PhaseOutcome:
        """Run (or, in a resumed sweep, restore and continue) one phase to its end or to a
        stop request.

        Args:
            phase: the phase.
        Returns:
            Its `PhaseOutcome`; when ``interrupted``, its unfinished child runs are tagged
            ``metalearner.interrupted`` and no errors are read.
        """
        from trainables.callback import MlflowTraceCallback
        from trainables.progress import ProgressTable

        name = self.spec.name
        self._tell("start", phase)
        progress = None if self.progress is False else ProgressTable(self.steps, phase.title, self.progress)
        try:
            cb = MlflowTraceCallback(self.writer, name, self.parent, mutable_keys=phase.mutable_keys,
                                     progress=progress, tags={"metalearner.sweep": name}, colours=self.colours,
                                     scheduler=phase.scheduler, state=self.state, phase=phase.key,
                                     set_right=self.set_right)
            grid = self._fit(phase, cb)
        finally:
            if progress is not None:
                progress.stop()
        # a stop that came when every trial had ended leaves a finished phase (the next one
        # does not start); the time budget's unfinished trials are not an interrupt
        if self.stop.is_set() and cb.unfinished:
            for tid in cb.unfinished:
                self.writer.set_tags(cb.run_ids[tid], {INTERRUPTED_TAG: "stopped by SIGINT/SIGTERM; resume the sweep"})
            outcome = PhaseOutcome(grid, cb.trial_info, cb.run_ids, interrupted=True)
        else:
            errors, first_error = log_trial_errors(grid, self.error_log)
            outcome = PhaseOutcome(grid, cb.trial_info, cb.run_ids, interrupted=False,
                                   errors=errors + diverged_errors(grid), first_error=first_error)
        self._tell("end", phase)
        return outcome

    def _fit(self, phase: Phase, cb: Any) -> Any:
        """Fit the phase's Tune experiment: restored if a resumed sweep left one, else new.

        Returns:
            The result grid.
        """
        from ray import tune
        from ray.tune.logger import JsonLoggerCallback

        from trainables.phase_events import FirstTrialStarted
        from trainables.restore import repair_checkpoints

        started = FirstTrialStarted(lambda: self._tell("trials", phase))
        tune_dir = experiment_uri(self.storage, phase.name)
        self.state.start_phase(phase.key, tune_dir)
        if self.resume_dir is not None and tune.Tuner.can_restore(tune_dir):
            for repair in repair_checkpoints(tune_dir):  # a checkpoint Tune's saved state names may be gone
                log.warning("%s", repair.describe())
            set_defaults(TUNE_QUIET, HF_OFFLINE)
            tuner = tune.Tuner.restore(tune_dir, self.trainable, resume_unfinished=True, resume_errored=False,
                                       param_space=phase.space)
            # Tune restores the run config it pickled, callbacks included, and a pickled
            # callback has no writer (it stays with the driver): hand it the live ones
            # (Ray has no public way to replace a restored run config's callbacks)
            tuner._local_tuner.get_run_config().callbacks = [cb, started, JsonLoggerCallback()]
        else:
            tuner = make_tuner(self.spec, self.storage, self.trainable, phase.space, phase.name, [cb, started],
                               **phase.tuner_args)
        with self.stop.fitting():
            return tuner.fit()
