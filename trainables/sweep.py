"""Run an experiment spec on Ray Tune: searched arms first, then one equal-steps grid.

Layout of a sweep:
1. one MLflow parent run (the resolved spec as params and as a YAML artifact; tags for
   the searchers and schedulers);
2. for each arm with a ``search``: one Tuner (searcher + scheduler from the spec) on the
   arm's tuning seed; the best configuration is then, if ``search.confirm``, re-trained
   on every comparison seed, so that it is compared with the other arms on seeds it was
   not tuned on;
   an arm with ``search.per_seed`` runs one population per comparison seed instead, and
   each population's best member is that seed's comparison run (`trainables.phases`);
3. one grid Tuner over (fixed arms + confirmed tuned arms) x seeds, all at equal steps.
Every trial is a child MLflow run written by the driver (`MlflowTraceCallback`). This
module decides which phases run and what their results mean; each phase runs through
`trainables.phase_runner.PhaseRunner` (Tune, the live table, stop and restore).

The review (`metalearner.report.live.LiveReview`): once the parent run exists, before
the first trial, the sweep makes its MLflow link (a saved view under an id fixed for the
sweep) and tells the caller (``on_event``: a `SweepEvent` "link"); the view shows every
trial of the sweep while searches run and the comparison's trials from the first one on,
and the experiment's description says what runs now. The best controller of each
searched arm goes on the parent run as params ``best.<arm>.<setting>`` beside its
``best_<arm>.yaml``. ``on_event`` also hears each phase start, first trial and end.

Faults. A sweep's folder (``experiment_dir``) holds its spec, its durable state
(`SweepState`: phases done with their results, trial -> child run key) and its tracking
journal (every run key and last step), so ``resume=`` that folder continues a stopped
sweep through Tune's own ``Tuner.restore``: the same parent run (journal key ``sweep``),
the same child runs, finished phases not redone, no point written twice or skipped.
`request_stop` (the CLI's first SIGINT/SIGTERM) ends the running phase as Tune's first
Ctrl-C does; no later phase starts, and the parent and unfinished children end KILLED with
``metalearner.interrupted``. A trial whose worker dies restarts from its last checkpoint
up to ``resources.max_failures`` times. A searched arm without a completed trial has no
best: it is reported as failed with its first trial error, and nothing is exported or
confirmed for it.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from metalearner.config import flatten, load_run_config
from metalearner.environment import HF_OFFLINE, TUNE_QUIET, set_defaults
from metalearner.experiment import Arm, ExperimentSpec
from metalearner.journal import JOURNAL_DIR
from metalearner.report.export import best_params
from metalearner.report.live import LiveReview
from metalearner.runtime_env import driver_paths, importable
from metalearner.sweep_state import PARENT_KEY, SPEC_FILE, SweepState
from metalearner.tracking import INTERRUPTED_TAG, KIND_TAG, MlflowWriter, arm_colours, ui_features
from trainables.phase_runner import Phase, PhaseRunner, StopRequest
from trainables.phases import run_per_seed_populations, shows_compare
from trainables.reporting import cell_config, task_key
from trainables.storage import publish, storage_root, sweep_folder
from trainables.tuning import best_result

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    experiment: str
    best: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> best controller
    trials: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial id -> info
    errors: list[str] = field(default_factory=list)  # one line per failed trial
    failed_arms: dict[str, str] = field(default_factory=dict)  # searched arm without a completed trial -> first error
    interrupted: bool = False  # stopped by SIGINT/SIGTERM: resume with ``sweep --resume experiment_dir``
    experiment_dir: Path | None = None
    resumed: bool = False
    error_log: Path | None = None  # every failed trial's full error and trial folder
    seconds: float = 0.0
    spec_files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepEvent:
    """What a sweep tells its caller as it goes (``SweepRunner(on_event=...)``).

    Attributes:
        kind: ``"link"`` (the MLflow link exists: ``url``), ``"phase_start"``,
            ``"phase_trials"`` (the phase's first trial started) or ``"phase_end"``
            (the phase's outcome is read; for a per-seed population, before its best
            member is promoted).
        phase: the phase's key in the sweep's state (``search:ARM``, ``search:ARM:sSEED``,
            ``compare``); "" for the link.
        url: the link (kind "link").
        parent_run_id: the parent run's id ("" until the store has it).
    """

    kind: str
    phase: str = ""
    url: str = ""
    parent_run_id: str = ""


def review_plan(spec: ExperimentSpec, compared: bool = False) -> tuple[str, int, list[str]]:
    """What a sweep's view shows first, how many trials its charts draw, which settings it charts.

    Args:
        spec: the experiment.
        compared: the sweep (a resumed one) has comparison trials already.

    Returns:
        (``"trials"`` when a search runs first, else ``"compare"``; the most trials the sweep
        runs; the settings a population-based scheduler moves, e.g. ``controller.factor``).
    """
    searched = [a.search for a in spec.arms if a.search is not None]
    n_runs = sum(s.num_samples * (len(spec.seeds) if s.per_seed else 1) for s in searched)
    settings = sorted({k for s in searched if s.population_based for k in s.space})
    first = "compare" if compared or not searched else "trials"
    return first, n_runs + len(spec.arms) * len(spec.seeds), settings


class SweepRunner:
    """Runs an `ExperimentSpec`; see the module docstring for the layout.

    Args:
        on_event: called (in the driver's thread; the sweep waits for it) with each
            `SweepEvent`; the face prints the link, a test may look at the store.
    """

    def __init__(self, spec: ExperimentSpec, tracking_uri: str, storage: str | None = None,
                 address: str | None = None, progress: bool | None = False, num_cpus: int | None = None,
                 resume: str | Path | None = None, metrics_db: str | None = None,
                 on_event: Callable[[SweepEvent], None] | None = None) -> None:
        self.spec = spec
        self.on_event = on_event
        self.review: LiveReview | None = None  # the link, view and description, once the parent run is journaled
        self._linked = False  # the "link" event was told
        self._t0 = time.perf_counter()
        self.metrics_db = metrics_db  # trace points in bulk into the server's PostgreSQL (MlflowWriter)
        self.tracking_uri = tracking_uri
        self.address = address
        self.progress = progress
        self.num_cpus = num_cpus
        self.resume_dir = Path(resume).resolve() if resume is not None else None
        if self.resume_dir is None:
            self.storage = storage_root(storage)  # a URI goes to Ray unchanged (trainables.storage)
            self.stamp = time.strftime("%Y%m%d-%H%M%S")
            self.folder = sweep_folder(self.storage, f"{spec.name}-{self.stamp}")  # the sweep's own files
        else:  # the folders of the sweep being resumed
            state = SweepState.load(self.resume_dir)
            self.storage, self.stamp, self.folder = state.storage, state.stamp, self.resume_dir
        self.stop = StopRequest()  # set by `request_stop`; read between and relayed into phases
        self.inbox: str | None = None  # the trace inbox's name, once a trainable is made (`_open_inbox`)

    # ------------------------------------------------------------ pieces
    def init_ray(self) -> None:
        """Start (or join, with ``address``) Ray for this sweep, keeping the face's SIGTERM handler."""
        import ray

        # the sweep is where Ray starts: its environment is set here (workers inherit it)
        set_defaults(TUNE_QUIET, HF_OFFLINE)
        if ray.is_initialized():
            if self.spec.runtime_env:
                log.warning("Ray was started before the sweep: the spec's runtime_env %s is not applied (give it "
                            "to your ray.init, or let the sweep start Ray)", self.spec.runtime_env)
            return
        # ray.init installs a SIGTERM handler of its own (sys.exit(15)); the face's (the
        # CLI's stop_on_signals: stop the sweep, exit 130) stays in force
        main = threading.current_thread() is threading.main_thread()
        term = signal.getsignal(signal.SIGTERM) if main else None
        # the code every worker must import (a plugin controller): Ray ships it to the cluster
        env = {"runtime_env": self.spec.runtime_env} if self.spec.runtime_env else {}
        try:
            if self.address:
                ray.init(address=self.address, include_dashboard=False, logging_level="WARNING", **env)
            else:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False,  # None: Ray's own (cgroup-aware) count
                         logging_level="WARNING", log_to_driver=False, configure_logging=True, **env)
        finally:
            if main and term is not None:
                signal.signal(signal.SIGTERM, term)

    def _open_inbox(self) -> str:
        """Start the sweep's trace inbox (`trainables.channel`) on the driver's node (Ray
        is up); the trainable gets its name, and each report names it to the callback."""
        from trainables.channel import inbox_name, open_inbox

        self.inbox = open_inbox(inbox_name(self.folder.name))
        return self.inbox

    def _shared_task(self) -> tuple[Any, tuple | None]:
        """Load the data once on the driver (shipped to trials with tune.with_parameters)."""
        from metalearner.tasks import build_task

        cfg = load_run_config(self.spec.run_config(self.spec.arms[0], self.spec.seeds[0]))
        t = cfg.train
        task = build_task(cfg.task, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed,
                          eval_batches=t.eval_batches)
        return task, task_key(cfg)

    def trainable(self) -> Any:
        """The sweep's trainable (Ray is up): the engine's trial function with the driver's
        task (data loaded once) and the trial resources."""
        task, key = self._shared_task()
        return self._trainable(task, key)

    def _trainable(self, task: Any, key: tuple | None) -> Any:
        """The engine's trainable (``train.engine``), with the shared task and resources."""
        from ray import tune

        if load_run_config(self.spec.run_config(self.spec.arms[0], self.spec.seeds[0])).train.engine == "hf":
            from trainables.hf_trial import train_trial_hf as train_trial
        else:
            from trainables.trial import train_trial

        r = self.spec.resources
        fn = tune.with_parameters(train_trial, task=task, task_key=key, threads=max(1, int(r.cpus_per_trial)),
                                  inbox=self.inbox or self._open_inbox())
        return tune.with_resources(fn, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})

    # ------------------------------------------------------------ the sweep
    @property
    def experiment_dir(self) -> Path:
        """The sweep's folder: spec, durable state, tracking journal, best controllers,
        errors, report (what ``metalearner sweep --resume`` is given)."""
        return self.folder

    def request_stop(self) -> None:
        """Stop the sweep as Tune's first Ctrl-C does (the face calls this on SIGINT and
        SIGTERM): the running Tune loop saves its experiment state and stops the trials,
        whose last reported checkpoints a resume continues from; no later phase starts."""
        self.stop.set()

    def _open(self, writer: MlflowWriter) -> tuple[SweepState, set[str]]:
        """A new sweep: the parent run, the spec file, the state file. A resumed one: its
        state; the parent is reopened and the child runs its dead driver left RUNNING are
        set KILLED with ``metalearner.interrupted`` (a trial that goes on reopens its run).

        Returns:
            (the state, the run keys set right).
        """
        spec = self.spec
        searchers = sorted({a.search.searcher for a in spec.arms if a.search}) or ["grid"]
        schedulers = sorted({a.search.scheduler.name for a in spec.arms if a.search}) or ["fifo"]
        if self.resume_dir is not None:
            state = SweepState.load(self.resume_dir)
            set_right = {k for k in writer.run_keys() if k != PARENT_KEY and writer.run_status(k) == "RUNNING"}
            for key in sorted(set_right):
                writer.set_tags(key, {INTERRUPTED_TAG: "the sweep's driver stopped; the sweep was resumed"})
                writer.terminate(key, "KILLED")
            writer.create_run(spec.name, f"{spec.name}-{self.stamp}", key=PARENT_KEY)  # reopens it
            writer.delete_tags(PARENT_KEY, [INTERRUPTED_TAG])
            writer.flush()
            return state, set_right
        writer.create_run(spec.name, f"{spec.name}-{self.stamp}", key=PARENT_KEY, tags={
            KIND_TAG: "sweep", "metalearner.searcher": ",".join(searchers),
            "metalearner.scheduler": ",".join(schedulers), "metalearner.arms": ",".join(a.name for a in spec.arms),
            "metalearner.seeds": ",".join(map(str, spec.seeds)), "mlflow.note.content": spec.description,
        })
        writer.log_params(PARENT_KEY, flatten({k: v for k, v in spec.raw.items() if k not in ("smoke", "arms")}))
        writer.log_params(PARENT_KEY, {f"arms.{a.name}": yaml.safe_dump(
            {"controller": a.controller, "search": bool(a.search), **a.tags()}, default_flow_style=True).strip()
            for a in spec.arms})
        spec_file = self.folder / SPEC_FILE
        spec_file.write_text(yaml.safe_dump(spec.raw, sort_keys=False))
        writer.log_artifact(PARENT_KEY, spec_file)
        return SweepState.create(self.folder, self.tracking_uri, self.stamp, self.storage), set()

    # ------------------------------------------------------------ the review
    def _tell(self, kind: str, phase: str = "", url: str = "") -> None:
        if self.on_event is not None:
            pid = (self.review.parent_run_id if self.review is not None else None) or ""
            self.on_event(SweepEvent(kind, phase, url, pid))

    def _start_review(self, writer: MlflowWriter, state: SweepState) -> None:
        """The link and the first view, once the store has the parent run (before the first trial)."""
        first, n_runs, settings = review_plan(self.spec, shows_compare(state))
        self.review = LiveReview(writer, PARENT_KEY, f"{self.spec.name}-{self.stamp}", n_runs, settings,
                                 self.spec.metric, self.spec.description)
        self.review.open(first, "starting", timeout=120.0)
        self._link()

    def _link(self) -> None:
        """Tell the link once it exists (at the start, or later if the store was away then)."""
        if self.review is not None and self.review.url and not self._linked:
            self._linked = True
            self._tell("link", url=self.review.url)

    def _on_phase(self, event: str, phase: Phase) -> None:
        """A phase's event (`PhaseRunner`): the view and description follow it, then the caller hears it."""
        if self.review is not None:
            if event == "start":
                self.review.show(doing=f"running: {phase.title.split(': ', 1)[-1]}; the verdict appears "
                                       "here when the sweep ends")
            elif event == "trials" and phase.key == "compare":
                self.review.show("compare")
            self._link()
        self._tell({"start": "phase_start", "trials": "phase_trials", "end": "phase_end"}[event], phase.key)

    def _end_review(self, state: SweepState, result: SweepResult, status: str) -> None:
        """The view and description a sweep leaves (the report, when it runs, writes its own)."""
        if self.review is None:
            return
        if result.interrupted:
            doing = f"stopped after {time.perf_counter() - self._t0:.0f} s; resume it: metalearner sweep --resume " \
                    f"{self.folder}"
        else:
            doing = (f"finished in {time.perf_counter() - self._t0:.0f} s"
                     + ("" if status == "FINISHED" else f", with failed trials ({self.folder / 'trial_errors.log'})")
                     + f"; the verdict: metalearner compare {self.spec.name}")
        self.review.show("compare" if shows_compare(state) else "trials", doing)

    def run(self) -> SweepResult:
        """Run the sweep (see the module docstring); while it runs, the code its spec's
        ``runtime_env`` ships is importable on the driver too, as on the workers."""
        with importable(driver_paths(self.spec.runtime_env)):
            return self._run()

    def _run(self) -> SweepResult:
        spec = self.spec
        t0 = self._t0 = time.perf_counter()
        # PBT's explore step and the random searcher draw from these: a seeded sweep
        random.seed(spec.seed)
        np.random.seed(spec.seed)
        out_dir = self.folder
        out_dir.mkdir(parents=True, exist_ok=True)
        # every MLflow write is journaled in the experiment folder first (metalearner sync
        # delivers leftovers; a resume continues the journal, its run keys and last steps)
        writer = MlflowWriter(self.tracking_uri, journal_dir=out_dir / JOURNAL_DIR,
                              outage_s=spec.tracking.outage_s, metrics_db=self.metrics_db)
        result = SweepResult(parent_run_id="", tracking_uri=self.tracking_uri, experiment=spec.name,
                             experiment_dir=out_dir, resumed=self.resume_dir is not None)
        error_log = out_dir / "trial_errors.log"

        status = "FAILED"
        try:
            state, set_right = self._open(writer)
            self.init_ray()  # meanwhile the writer's thread makes the parent run (a new store: its tables too)
            self._start_review(writer, state)
            phases = PhaseRunner(
                spec, self.storage, self.trainable(), writer, state, PARENT_KEY, self.stop,
                self.resume_dir, load_run_config(spec.run_config(spec.arms[0], spec.seeds[0])).train.steps,
                error_log, colours=arm_colours(a.name for a in spec.arms) if ui_features()["run_color"] else None,
                set_right=set_right, progress=self.progress, on_phase=self._on_phase)
            cells: list[dict[str, Any]] = []
            for arm in spec.arms:
                if arm.search is None:
                    cells += [{**spec.run_config(arm, s), "meta": {"arm": arm.name, "phase": "compare",
                                                                   **({"tags": arm.tags()} if arm.source else {})}}
                              for s in spec.seeds]
                elif arm.search.per_seed:  # one population per seed, its best member is the seed's run
                    result.interrupted = run_per_seed_populations(phases, arm, result)
                else:
                    result.interrupted = self._search(phases, arm, result)
                    if not result.interrupted and arm.name in result.best and arm.search.confirm:
                        cells += [{**spec.run_config(arm, seed, controller=result.best[arm.name]),
                                   "meta": {"arm": arm.name, "phase": "compare"}} for seed in spec.seeds]
                if result.interrupted:
                    break
            if cells and not result.interrupted:
                result.interrupted = self._compare(phases, cells, result)
            if result.errors or result.failed_arms:
                result.error_log = error_log
            if result.interrupted:
                status = "KILLED"
                writer.set_tags(PARENT_KEY, {INTERRUPTED_TAG: "stopped by SIGINT/SIGTERM; resume the sweep"})
            else:
                status = "FINISHED" if not (result.errors or result.failed_arms) else "FAILED"
                publish(out_dir, self.storage, out_dir.name)  # a URI storage gets the sweep's files too
            self._end_review(state, result, status)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            result.seconds = time.perf_counter() - t0
            writer.terminate(PARENT_KEY, status)
            writer.close()  # what is left undelivered stays in the journal: the CLI counts it
            result.parent_run_id = writer.run_id(PARENT_KEY) or ""
            if self.inbox is not None:  # last: a failure here must not hide the sweep's outcome
                from trainables.channel import close_inbox

                try:
                    close_inbox(self.inbox)
                except Exception as e:  # e.g. Ray went down under it (the actor went with it)
                    log.warning("could not close the trace inbox %r: %s: %s", self.inbox, type(e).__name__,
                                (str(e).strip().splitlines() or [""])[0])
        return result

    def _search(self, phases: PhaseRunner, arm: Arm, result: SweepResult) -> bool:
        """The search phase of a searched arm (on its tuning seed), unless it finished before;
        its best configuration becomes ``best_ARM.yaml``, logged to the parent run.

        Returns:
            True if a stop request came before or during the phase (no later phase may start).
        """
        spec, state, s = self.spec, phases.state, arm.search
        assert s is not None
        phase = f"search:{arm.name}"
        done = state.phase(phase)
        if not done.get("done"):
            if self.stop.is_set():
                return True
            out = phases.search(arm, spec.run_config(arm, s.seed), {"arm": arm.name, "phase": "search"}, phase,
                                f"{spec.name}-{arm.name}-{self.stamp}", f"{spec.name}: tuning {arm.name}")
            result.trials.update(out.trials)
            if out.interrupted:  # no best from a search that did not end: nothing confirmed
                return True
            best = best_result(out.grid, spec.metric, spec.mode, s)
            done = {"errors": out.errors,
                    "best": dict(cell_config(best.config)[0]["controller"]) if best is not None else None,
                    "failed": None if best is not None else (
                        out.first_error or f"no trial reported a finite {spec.metric} "
                                           "(each diverged or was stopped)")}
            state.finish_phase(phase, **done)
        result.errors += done.get("errors", [])
        if done.get("best") is None:
            result.failed_arms[arm.name] = done["failed"]
            return False
        result.best[arm.name] = dict(done["best"])
        best_file = self.folder / f"best_{arm.name}.yaml"
        if not best_file.is_file():
            best_file.write_text(yaml.safe_dump({"controller": result.best[arm.name]}, sort_keys=False))
            phases.writer.log_artifact(PARENT_KEY, best_file)
        phases.writer.log_params(PARENT_KEY, best_params(arm.name, result.best[arm.name]))  # names it has are skipped
        result.spec_files[arm.name] = best_file
        return False

    def _compare(self, phases: PhaseRunner, cells: list[dict[str, Any]], result: SweepResult) -> bool:
        """The comparison phase: one grid over ``cells`` at equal steps, unless it finished before.

        Returns:
            True if a stop request came before or during the phase.
        """
        from ray import tune

        done = phases.state.phase("compare")
        if not done.get("done"):
            if self.stop.is_set():
                return True
            out = phases.run(Phase(key="compare", name=f"{self.spec.name}-compare-{self.stamp}",
                                   title=f"{self.spec.name}: comparison at equal steps",
                                   space={"cell": tune.grid_search(cells)}))
            result.trials.update(out.trials)
            if out.interrupted:
                return True
            done = {"errors": out.errors}
            phases.state.finish_phase("compare", **done)
        result.errors += done.get("errors", [])
        return False
