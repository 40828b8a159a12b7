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
Every trial is a child MLflow run written by the driver (`MlflowTraceCallback`).

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

import copy
import logging
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from metalearner.config import flatten, load_run_config
from metalearner.environment import HF_OFFLINE, TUNE_QUIET, set_defaults
from metalearner.experiment import ExperimentSpec
from metalearner.journal import JOURNAL_DIR
from metalearner.sweep_state import PARENT_KEY, SPEC_FILE, SweepState
from metalearner.tracking import INTERRUPTED_TAG, KIND_TAG, MlflowWriter, arm_colours, ui_features
from trainables.phases import run_per_seed_populations
from trainables.reporting import cell_config, task_key
from trainables.storage import experiment_uri, publish, storage_root, sweep_folder
from trainables.tuning import ClampToSpace as ClampToSpace  # re-exported: the sweep's public names
from trainables.tuning import (
    _log_errors,
    _merge,
    _nested_space,
    best_result,
    diverged_errors,
    make_scheduler,
    make_searcher,
)
from trainables.tuning import to_tune_domain as to_tune_domain

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


class SweepRunner:
    """Runs an `ExperimentSpec`; see the module docstring for the layout."""

    def __init__(self, spec: ExperimentSpec, tracking_uri: str, storage: str | None = None,
                 address: str | None = None, progress: bool | None = False, num_cpus: int | None = None,
                 resume: str | Path | None = None, metrics_db: str | None = None) -> None:
        self.spec = spec
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
        self._stop = threading.Event()
        self._in_fit = False
        self.inbox: str | None = None  # the trace inbox's name, once a trainable is made (`_open_inbox`)

    # ------------------------------------------------------------ pieces
    def _init_ray(self) -> None:
        import ray

        # the sweep is where Ray starts: its environment is set here (workers inherit it)
        set_defaults(TUNE_QUIET, HF_OFFLINE)
        if ray.is_initialized():
            return
        # ray.init installs a SIGTERM handler of its own (sys.exit(15)); the face's (the
        # CLI's stop_on_signals: stop the sweep, exit 130) stays in force
        main = threading.current_thread() is threading.main_thread()
        term = signal.getsignal(signal.SIGTERM) if main else None
        try:
            if self.address:
                ray.init(address=self.address, include_dashboard=False, logging_level="WARNING")
            else:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False,  # None: Ray's own (cgroup-aware) count
                         logging_level="WARNING", log_to_driver=False, configure_logging=True)
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

    def _tuner(self, trainable: Any, param_space: dict[str, Any], name: str, callback: Any,
               search_alg: Any = None, scheduler: Any = None, num_samples: int = 1, reuse: bool = True,
               keep: int | None = 2) -> Any:
        from ray import tune
        from ray.tune.logger import JsonLoggerCallback

        # keep=None for population-based phases: PBT restores a member from another's checkpoint of the
        # last perturbation, and the donor keeps checkpointing while the recipient's actor restarts, so
        # a pruned checkpoint fails the exploit (and with synch=True the population then waits forever;
        # Ray issue #8441). Every checkpoint of a PBT trial is kept.
        set_defaults(TUNE_QUIET, HF_OFFLINE)  # the sweep's environment, also when Ray was started elsewhere
        r = self.spec.resources
        return tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=self.spec.metric, mode=self.spec.mode, search_alg=search_alg, scheduler=scheduler,
                num_samples=num_samples, max_concurrent_trials=r.max_concurrent or None, reuse_actors=reuse,
                time_budget_s=self.spec.time_budget_s or None,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                # our callback is the logger that matters (MLflow); Tune's JSON log keeps
                # its own result bookkeeping working (the CSV/TensorBoard ones are off)
                name=name, storage_path=self.storage, callbacks=[callback, JsonLoggerCallback()], verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
                failure_config=tune.FailureConfig(max_failures=r.max_failures),
            ),
        )

    def _progress(self, table: Any, steps: int, title: str) -> Any:
        """The live table of a phase, or None: the runner shows nothing unless asked (the
        CLI asks; ``progress=None`` picks a live display on a terminal, plain lines elsewhere)."""
        return None if self.progress is False else table(steps, title, self.progress)

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
        self._stop.set()
        if self._in_fit:
            # while fit() runs, Tune's own stop handler is installed for SIGUSR1
            handler = signal.getsignal(signal.SIGUSR1)
            if callable(handler):
                handler(signal.SIGUSR1, None)

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
            {"controller": a.controller, "search": bool(a.search)}, default_flow_style=True).strip()
            for a in spec.arms})
        spec_file = self.folder / SPEC_FILE
        spec_file.write_text(yaml.safe_dump(spec.raw, sort_keys=False))
        writer.log_artifact(PARENT_KEY, spec_file)
        return SweepState.create(self.folder, self.tracking_uri, self.stamp, self.storage), set()

    def _fit(self, state: SweepState, phase: str, name: str, trainable: Any, space: dict[str, Any],
             cb: Any, **tuner_args: Any) -> tuple[Any, bool]:
        """Run (or, in a resumed sweep, restore and continue) one phase's Tune experiment.

        Returns:
            (the result grid, whether the phase was interrupted).
        """
        from ray import tune
        from ray.tune.logger import JsonLoggerCallback

        from trainables.restore import repair_checkpoints

        tune_dir = experiment_uri(self.storage, name)
        state.start_phase(phase, tune_dir)
        if self.resume_dir is not None and tune.Tuner.can_restore(tune_dir):
            for repair in repair_checkpoints(tune_dir):  # a checkpoint Tune's saved state names may be gone
                log.warning("%s", repair.describe())
            set_defaults(TUNE_QUIET, HF_OFFLINE)
            tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=False,
                                       param_space=space)
            # Tune restores the run config it pickled, callbacks included, and a pickled
            # callback has no writer (it stays with the driver): hand it the live ones
            tuner._local_tuner.get_run_config().callbacks = [cb, JsonLoggerCallback()]
        else:
            tuner = self._tuner(trainable, space, name, cb, **tuner_args)
        self._in_fit = True
        try:
            grid = tuner.fit()
        finally:
            self._in_fit = False
        # a stop that came when every trial had ended leaves a finished phase (the next one
        # does not start); the time budget's unfinished trials are not an interrupt
        return grid, self._stop.is_set() and bool(cb.unfinished)

    def _mark_interrupted(self, writer: MlflowWriter, cb: Any) -> None:
        for tid in cb.unfinished:
            writer.set_tags(cb.run_ids[tid], {INTERRUPTED_TAG: "stopped by SIGINT/SIGTERM; resume the sweep"})

    def run(self) -> SweepResult:
        from trainables.callback import MlflowTraceCallback
        from trainables.progress import ProgressTable

        spec = self.spec
        t0 = time.perf_counter()
        # PBT's explore step and the random searcher draw from these: a seeded sweep
        random.seed(spec.seed)
        np.random.seed(spec.seed)
        out_dir = self.folder
        out_dir.mkdir(parents=True, exist_ok=True)
        # every MLflow write is journaled in the experiment folder first (metalearner sync
        # delivers leftovers; a resume continues the journal, its run keys and last steps)
        writer = MlflowWriter(self.tracking_uri, journal_dir=out_dir / JOURNAL_DIR,
                              outage_s=spec.tracking.outage_s, metrics_db=self.metrics_db)
        parent = PARENT_KEY
        result = SweepResult(parent_run_id="", tracking_uri=self.tracking_uri, experiment=spec.name,
                             experiment_dir=out_dir, resumed=self.resume_dir is not None)
        colours = arm_colours(a.name for a in spec.arms) if ui_features()["run_color"] else None
        error_log = out_dir / "trial_errors.log"

        status = "FAILED"
        progress: ProgressTable | None = None
        try:
            state, set_right = self._open(writer)
            self._init_ray()
            task, task_key = self._shared_task()
            trainable = self._trainable(task, task_key)
            steps = load_run_config(spec.run_config(spec.arms[0], spec.seeds[0])).train.steps
            cells: list[dict[str, Any]] = []
            for arm in spec.arms:
                if arm.search is None:
                    cells += [{**spec.run_config(arm, s), "meta": {"arm": arm.name, "phase": "compare"}}
                              for s in spec.seeds]
                    continue
                if arm.search.per_seed:  # one population per seed, its best member is the seed's run
                    if run_per_seed_populations(self, arm, trainable, writer, parent, colours, steps, result,
                                                error_log, state, set_right):
                        result.interrupted = True
                        break
                    continue
                s = arm.search
                phase = f"search:{arm.name}"
                done = state.phase(phase)
                if not done.get("done"):
                    if self._stop.is_set():
                        result.interrupted = True
                        break
                    base = spec.run_config(arm, s.seed)
                    report_every = load_run_config(base).train.report_every
                    progress = self._progress(ProgressTable, steps, f"{spec.name}: tuning {arm.name}")
                    cb = MlflowTraceCallback(writer, spec.name, parent,
                                             mutable_keys=list(s.space) if s.population_based else [],
                                             progress=progress, tags={"metalearner.sweep": spec.name},
                                             colours=colours, scheduler=s.scheduler.name,
                                             state=state, phase=phase, set_right=set_right)
                    space = {**copy.deepcopy(base), "meta": {"arm": arm.name, "phase": "search"}}
                    for key, dom in _nested_space(s.space).items():
                        space[key] = _merge(space.get(key, {}), dom)
                    grid, interrupted = self._fit(
                        state, phase, f"{spec.name}-{arm.name}-{self.stamp}", trainable, space, cb,
                        search_alg=make_searcher(arm, spec), scheduler=make_scheduler(arm, steps, report_every),
                        num_samples=s.num_samples, reuse=not s.population_based,
                        keep=None if s.population_based else 2)
                    if progress is not None:
                        progress.stop()
                    result.trials.update(cb.trial_info)
                    if interrupted:  # no best from a search that did not end: nothing confirmed
                        self._mark_interrupted(writer, cb)
                        result.interrupted = True
                        break
                    errors, first_error = _log_errors(grid, error_log)
                    best = best_result(grid, spec.metric, spec.mode)
                    done = {"errors": errors + diverged_errors(grid),
                            "best": dict(cell_config(best.config)[0]["controller"]) if best is not None else None,
                            "failed": None if best is not None else (
                                first_error or f"no trial reported a finite {spec.metric} "
                                               "(each diverged or was stopped)")}
                    state.finish_phase(phase, **done)
                result.errors += done.get("errors", [])
                if done.get("best") is None:
                    result.failed_arms[arm.name] = done["failed"]
                    continue
                result.best[arm.name] = dict(done["best"])
                best_file = out_dir / f"best_{arm.name}.yaml"
                if not best_file.is_file():
                    best_file.write_text(yaml.safe_dump({"controller": result.best[arm.name]}, sort_keys=False))
                    writer.log_artifact(parent, best_file)
                result.spec_files[arm.name] = best_file
                if s.confirm:
                    cells += [{**spec.run_config(arm, seed, controller=result.best[arm.name]),
                               "meta": {"arm": arm.name, "phase": "compare"}} for seed in spec.seeds]
            if cells and not result.interrupted:
                from ray import tune

                done = state.phase("compare")
                if not done.get("done") and self._stop.is_set():
                    result.interrupted = True
                elif not done.get("done"):
                    progress = self._progress(ProgressTable, steps, f"{spec.name}: comparison at equal steps")
                    cb = MlflowTraceCallback(writer, spec.name, parent, progress=progress,
                                             tags={"metalearner.sweep": spec.name}, colours=colours,
                                             state=state, phase="compare", set_right=set_right)
                    grid, interrupted = self._fit(state, "compare", f"{spec.name}-compare-{self.stamp}",
                                                  trainable, {"cell": tune.grid_search(cells)}, cb)
                    if progress is not None:
                        progress.stop()
                    result.trials.update(cb.trial_info)
                    if interrupted:
                        self._mark_interrupted(writer, cb)
                        result.interrupted = True
                    else:
                        done = {"errors": _log_errors(grid, error_log)[0] + diverged_errors(grid)}
                        state.finish_phase("compare", **done)
                result.errors += done.get("errors", [])
            if result.errors or result.failed_arms:
                result.error_log = error_log
            if result.interrupted:
                status = "KILLED"
                writer.set_tags(parent, {INTERRUPTED_TAG: "stopped by SIGINT/SIGTERM; resume the sweep"})
            else:
                status = "FINISHED" if not (result.errors or result.failed_arms) else "FAILED"
                publish(out_dir, self.storage, out_dir.name)  # a URI storage gets the sweep's files too
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if progress is not None:
                progress.stop()
            result.seconds = time.perf_counter() - t0
            writer.terminate(parent, status)
            writer.close()  # what is left undelivered stays in the journal: the CLI counts it
            result.parent_run_id = writer.run_id(parent) or ""
            if self.inbox is not None:  # last: a failure here must not hide the sweep's outcome
                from trainables.channel import close_inbox

                try:
                    close_inbox(self.inbox)
                except Exception as e:  # e.g. Ray went down under it (the actor went with it)
                    log.warning("could not close the trace inbox %r: %s: %s", self.inbox, type(e).__name__,
                                (str(e).strip().splitlines() or [""])[0])
        return result


def trial_name(trial: Any) -> str:
    """Short trial names: ``ARM-sSEED-ID`` instead of the whole config."""
    run_cfg, meta = cell_config(trial.config)
    seed = run_cfg.get("train", {}).get("seed", "")
    return f"{meta.get('arm', 'trial')}-s{seed}-{trial.trial_id}"
