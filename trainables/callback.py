"""Driver-side Tune callback: the sweep's single MLflow writer (the live display of the
trials is `trainables.progress.ProgressTable`, which this callback feeds).

Trials never talk to MLflow. Each report's chunk of trace rows (the steps since the last
report, as the trial's `trainables.channel.TrialSink` received them) waits in the
sweep's inbox (Tune's results carry scalars only; a report names its inbox); this
callback (on the driver) takes it when it handles the report and journals it, rows as
they came, through one `MlflowWriter` (`log_rows`: one journal append per report), whose
delivery thread sends it with batched ``log_batch`` calls, so parallel trials cannot lock
the SQLite store and Tune's event loop never waits on the store (a child run is a local
run key ``trial-TRIAL_ID`` until the writer has created it). The writer, and nothing
here, keeps exactly one point per step per key when a trial restarts from a checkpoint or
PBT clones another trial's checkpoint.

In a resumed sweep (``metalearner sweep --resume``) each trial keeps its child run: the
journal continues, so a run key it holds is reopened (and loses its
``metalearner.interrupted`` tag) and its last journaled step is known; a trial that Tune
re-created under a new id takes over the run of the vanished trial with the same config
(`SweepState`). Nothing here waits on the store: every write is a journal append.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ray.tune import Callback

from metalearner.config import flatten
from metalearner.sweep_state import SweepState, config_key
from metalearner.tracking import (
    ARM_TAG,
    DIVERGED_TAG,
    INTERRUPTED_TAG,
    KIND_TAG,
    NOTE_TAG,
    PHASE_TAG,
    RUN_COLOR_TAG,
    SEED_TAG,
    STOPPED_EARLY_TAG,
    MlflowWriter,
    run_colour,
)
from metalearner.tracking.lineage import (
    UNKNOWN,
    Perturbation,
    perturbation_tags,
    perturbations_in,
    population_note,
)
from trainables.channel import checkpoint_origin, drop_payloads, take_payloads
from trainables.progress import ProgressTable
from trainables.reporting import (
    DIVERGED_KEY,
    LATEST_KEYS,
    NODE_KEY,
    ORIGIN_KEY,
    PARAMS_KEY,
    ROWS_KEY,
    SETTINGS_KEY,
    cell_config,
)

NODE_TAG = "metalearner.node_id"  # the Ray node that ran the trial (the latest, if it moved)
NOTE_LIMIT = 7000  # characters of a run description this callback writes up to (MLflow keeps 8000 per tag)


class MlflowTraceCallback(Callback):
    """One MLflow child run per trial, fed from the trials' reports.

    Args:
        writer: the process's single MLflow writer.
        experiment: MLflow experiment name.
        parent_run_id: the run key of the sweep's parent run (its id becomes each
            child's ``mlflow.parentRunId``).
        mutable_keys: dotted config keys a population-based scheduler (PBT/PB2) may change;
            non-empty for a population. They are logged as metrics, as a step function: a
            point at each report step and one at the first step of each new value. Each
            perturbation (a trial restarted from another trial's checkpoint) is recorded on
            the trial that received it (`metalearner.tracking.lineage`: tags
            ``metalearner.perturb.N`` and a line in its description).
        progress: a `ProgressTable` to update, or None.
        tags: tags every child run gets.
        colours: arm -> ``#rrggbb`` for the UI (tag ``mlflow.runColor``; search-phase
            trials are grey, but a population's members have their arm's colour) and the
            live table; None: no colour.
        scheduler: the scheduler's name, for the description of a trial it stops early.
        state: the sweep's durable state (trial -> child run key), or None (nothing kept).
        phase: this Tune run's phase key in ``state``.
        set_right: run keys a dead driver left RUNNING, which the resumed sweep ended
            KILLED (tag ``metalearner.interrupted``) until their trial goes on.
    """

    def __init__(self, writer: MlflowWriter, experiment: str, parent_run_id: str,
                 mutable_keys: list[str] | None = None, progress: ProgressTable | None = None,
                 tags: dict[str, str] | None = None, colours: dict[str, str] | None = None,
                 scheduler: str = "", state: SweepState | None = None, phase: str = "",
                 set_right: set[str] | None = None) -> None:
        self.writer = writer
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.mutable_keys = list(mutable_keys or [])
        self.progress = progress
        self.tags = dict(tags or {})
        self.colours = colours
        self.scheduler = scheduler
        self.run_ids: dict[str, str] = {}
        self.trial_info: dict[str, dict[str, Any]] = {}
        self._params_logged: set[str] = set()
        self._mutable_seen: dict[str, dict[str, Any]] = {}  # trial -> the settings of its last chunk
        self._origins: dict[str, dict[str, Any]] = {}  # trial -> the checkpoint it restarted from, until recorded
        self._aliases: dict[str, str] = {}  # an earlier driver's trial id -> the run key its re-created trial took
        self._unwritten: list[tuple[str, Perturbation, str, str]] = []  # (run key, record, note end, donor key)
        self.state = state
        self.phase = phase
        self.set_right = set(set_right or ())
        self.settled: set[str] = set()  # trials whose child run got its final status here
        self.unfinished: list[str] = []  # at the end: trials neither complete nor errored
        if progress is not None and colours:
            progress.use_colours(colours)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (callbacks included) into the experiment folder;
        # the writer thread, the live display and the state file stay with the driver process.
        return {k: v for k, v in self.__dict__.items() if k not in ("writer", "progress", "state")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.writer, self.progress, self.state = None, None, None  # type: ignore[assignment]

    # ------------------------------------------------------------ helpers
    def _child(self, trial: Any, trials: list | None = None) -> str:
        tid = trial.trial_id
        if tid not in self.run_ids:
            run_cfg, meta = cell_config(trial.config)
            arm = meta.get("arm", "trial")
            seed = run_cfg.get("train", {}).get("seed", 0)
            tags = {**self.tags, **meta.get("tags", {}), ARM_TAG: arm, PHASE_TAG: meta.get("phase", ""),
                    "metalearner.trial_id": tid, SEED_TAG: str(seed), KIND_TAG: "trial"}  # meta tags: Arm.tags
            population = bool(self.mutable_keys)
            colour = run_colour(arm, meta.get("phase", ""), self.colours, population) if self.colours else None
            if colour:
                tags[RUN_COLOR_TAG] = colour
            if population:  # what its params and its controller.* metrics mean
                tags[NOTE_TAG] = population_note(self.scheduler)
            name = f"{arm}-{meta.get('phase', '')}-{tid}"
            key = self._earlier_key(trial, trials) or f"trial-{tid}"
            earlier = self.writer.has_run(key)
            # non-blocking: a run key now, the MLflow run once the writer thread has made it
            # (a key the journal holds is reopened: a resumed sweep continues its run)
            self.run_ids[tid] = self.writer.create_run(self.experiment, name, tags, parent=self.parent_run_id,
                                                       key=key)
            if earlier:
                self.writer.delete_tags(key, [INTERRUPTED_TAG])
                self.set_right.discard(key)
            elif self.state is not None:
                self.state.set_child(self.phase, tid, key, config_key(trial.config))
            self.trial_info[tid] = {"arm": arm, "phase": meta.get("phase", ""), "seed": seed,
                                    "run_key": self.run_ids[tid]}
        return self.run_ids[tid]

    def _earlier_key(self, trial: Any, trials: list | None) -> str | None:
        """The run key an earlier process gave this trial: by its Tune trial id, or, for a
        trial Tune re-created after its driver died before saving it, the key of a vanished
        trial of this phase with the same config (same config and seed: the same points)."""
        if self.state is None:
            return None
        kids = self.state.children(self.phase)
        if trial.trial_id in kids:
            return kids[trial.trial_id]["key"]
        live = {t.trial_id for t in trials or []}
        want = config_key(trial.config)
        taken = set(self.run_ids.values())
        for old, child in kids.items():
            if old not in live and child["config"] == want and child["key"] not in taken:
                self.state.move_child(self.phase, old, trial.trial_id)
                self._aliases[old] = child["key"]
                return child["key"]
        return None

    # ------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._child(trial, trials)
        if self.progress:
            self.progress.update(trial, "RUNNING", None)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self._unwritten:  # perturbations whose donor run the writer had not created yet
            self._write_perturbations()
        run_id = self._child(trial)
        tid = trial.trial_id
        for payload in take_payloads(tid, result):  # this report's chunk, and any orphan before it
            self._journal_chunk(run_id, tid, payload)
        if result.get(DIVERGED_KEY) and not self.trial_info[tid].get("diverged"):
            where = f"at step {result.get('step')} of {result.get('total_steps')}"
            self.writer.set_tags(run_id, {DIVERGED_TAG: where})
            self.trial_info[tid]["diverged"] = True  # the sweep's error line comes from the grid
        node = result.get(NODE_KEY)
        if node and self.trial_info[tid].get("node_id") != node:
            self.writer.set_tags(run_id, {NODE_TAG: str(node)})
            self.trial_info[tid]["node_id"] = node
        self.writer.flush(run_id)
        self.trial_info[tid]["last"] = {k: result.get(k) for k in LATEST_KEYS}
        if self.progress:
            self.progress.update(trial, "RUNNING", result)

    def _complete(self, trial: Any, rid: str) -> None:
        # a trial a scheduler stopped early (ASHA) also "completes": mark it KILLED
        last_result = trial.last_result or {}
        last, total = last_result.get("step") or 0, last_result.get("total_steps")
        cut = total is not None and last < total
        diverged = bool(last_result.get(DIVERGED_KEY))  # ended by train.max_nonfinite: a failure
        if cut and not diverged:
            by = f"the {self.scheduler.upper()} scheduler" if self.scheduler else "the trial scheduler"
            self.writer.set_tags(rid, {STOPPED_EARLY_TAG: f"at step {last} of {total}"})
            self._append_note(rid, f"Stopped early by {by} at step {last} of {total}"
                              + (": its val loss ranked low at a rung. " if self.scheduler == "asha" else ". ")
                              + "Not a failure (MLflow shows such runs as KILLED).")
        self.writer.terminate(rid, "FAILED" if diverged else "KILLED" if cut else "FINISHED")
        self.settled.add(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        drop_payloads(trial)
        rid = self.run_ids.get(trial.trial_id)
        if rid:
            if self.mutable_keys:
                self._perturbed_at_the_end(trial, rid)
            self._complete(trial, rid)
        if self.progress:
            self.progress.update(trial, "TERMINATED", None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        drop_payloads(trial)
        if trial.trial_id in self.run_ids:
            self.writer.terminate(self.run_ids[trial.trial_id], "FAILED")
            self.settled.add(trial.trial_id)
        if self.progress:
            self.progress.update(trial, "ERROR", None)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Every child run gets its status. A trial that ran here and neither completed nor
        failed was stopped (an interrupt, or the time budget): KILLED, listed in
        ``unfinished``. A trial an earlier process ended, whose run that dead driver left
        RUNNING (set KILLED on resume), gets the status it earned."""
        self._write_perturbations(final=True)
        kids = self.state.children(self.phase) if self.state is not None else {}
        self.unfinished = []
        for t in trials:
            tid = t.trial_id
            if tid in self.settled:
                continue
            rid = self.run_ids.get(tid)
            if rid is not None:
                # neither completed nor failed: stopped by Tune's clean-up (which reports it
                # TERMINATED without on_trial_complete), after an interrupt or the time budget
                self.unfinished.append(tid)
                self.writer.terminate(rid, "KILLED")
                continue
            key = kids.get(tid, {}).get("key")
            if key is None or key not in self.set_right:
                continue
            self.writer.delete_tags(key, [INTERRUPTED_TAG])
            self.set_right.discard(key)
            if t.status == "TERMINATED":
                self._complete(t, key)
            elif t.status == "ERROR":
                self.writer.terminate(key, "FAILED")
        self.writer.flush()
        if self.progress:
            self.progress.render(final=True)

    # ------------------------------------------------------------ chunk intake
    def _journal_chunk(self, run_key: str, tid: str, payload: dict[str, Any]) -> None:
        """Journal one report's payload: params (once), the trace rows (the writer drops
        steps it holds) and, with a population-based scheduler, the settings in force and
        the perturbation that the trial's restart from another trial's checkpoint was."""
        if PARAMS_KEY in payload and tid not in self._params_logged:
            self.writer.log_params(run_key, payload[PARAMS_KEY])
            self._params_logged.add(tid)
        rows = payload.get(ROWS_KEY) or []
        first_new = self.writer.log_rows(run_key, rows)
        if not self.mutable_keys:
            return
        if ORIGIN_KEY in payload:  # kept until a chunk of new steps shows where it took effect
            self._origins[tid] = payload[ORIGIN_KEY]
        if first_new is not None:
            # the settings the trial's process ran this chunk with (not trial.config, which
            # PBT may already have changed for the next restart)
            ran = payload.get(SETTINGS_KEY) or {}
            self._log_settings(run_key, tid, {k: float(ran[k]) for k in self.mutable_keys if k in ran},
                               first_new, int(rows[-1]["step"]))

    def _log_settings(self, run_key: str, tid: str, current: dict[str, float], first: int, last: int) -> None:
        """The settings in force over steps ``first``..``last`` (a chunk), as a step function:
        a point at ``first`` when they differ from the previous chunk's (whose last point is
        at ``first - 1``), and one at ``last`` (each report step). Records the perturbation
        this chunk starts with, if any."""
        before = self._mutable_seen.get(tid)
        origin = self._origins.pop(tid, None)
        if origin is not None:
            self._record_perturbation(run_key, tid, origin, first, before, current)
        if current != before:
            self.writer.log_extra_metrics(run_key, current, first)
        self.writer.log_extra_metrics(run_key, current, last)  # dropped when last == first: logged already
        self._mutable_seen[tid] = current

    def _perturbed_at_the_end(self, trial: Any, run_key: str) -> None:
        """Record a perturbation that came at the trial's last report: Ray's PBT exploits at
        every interval, the last step included; the trial then restarts from the donor's
        checkpoint with new settings and ends without training (no report). Its latest
        checkpoint (the donor's) and its config (the new settings) tell what happened."""
        origin = checkpoint_origin(trial.checkpoint)
        if origin is None or int(origin["step"]) < self.writer.last_step(run_key):
            return  # no checkpoint, or one it trained on from (its first report after it recorded that)
        flat = flatten(cell_config(trial.config)[0])
        now = {k: float(flat[k]) for k in self.mutable_keys if isinstance(flat.get(k), (int, float))}
        self._record_perturbation(run_key, trial.trial_id, origin, int(origin["step"]) + 1,
                                  self._mutable_seen.get(trial.trial_id), now,
                                  after="It came after the trial's last step: nothing trained with these "
                                        "settings, and the run's traces end before it.")

    def _key_of(self, tid: str) -> str | None:
        """The child run key of trial ``tid`` of this phase (this driver's, or an earlier one's)."""
        if tid in self.run_ids:
            return self.run_ids[tid]
        if tid in self._aliases:
            return self._aliases[tid]
        kids = self.state.children(self.phase) if self.state is not None else {}
        return kids.get(tid, {}).get("key")

    def _record_perturbation(self, run_key: str, tid: str, origin: dict[str, Any], step: int,
                             before: dict[str, float] | None, current: dict[str, float], after: str = "") -> None:
        """Record, on the trial's run, that it restarted at ``step`` from another trial's
        checkpoint ``origin`` with the settings ``current`` (tags and a description line,
        ``after`` appended to it); nothing when the checkpoint was its own (a restart after a
        failure or a resume)."""
        donor = str(origin.get("trial_id", ""))
        donor_key = self._key_of(donor)
        if not donor or donor == tid or donor_key == run_key:
            return
        p = Perturbation(step=step, donor_trial=donor, donor_run=UNKNOWN, donor_step=int(origin.get("step", 0)),
                         settings=tuple((k, (before or {}).get(k), v) for k, v in current.items()))
        self._unwritten.append((run_key, p, after, donor_key or ""))
        self._write_perturbations()

    def _write_perturbations(self, final: bool = False) -> None:
        """Write the perturbations recorded so far, each run's in order, once the donor's
        MLflow run id is known (the writer creates runs in the background, and nothing here
        waits for it); ``final``: write them all, the donor run `UNKNOWN` where it is not."""
        waiting: set[str] = set()
        left = []
        for run_key, p, after, donor_key in self._unwritten:
            rid = self.writer.run_id(donor_key) if donor_key else None
            if run_key in waiting or (rid is None and donor_key and not final):
                waiting.add(run_key)  # a later one of this run waits too: the numbers follow the steps
                left.append((run_key, p, after, donor_key))
                continue
            p = replace(p, donor_run=rid or UNKNOWN)
            n = len(perturbations_in(self.writer.journaled_tags(run_key))) + 1
            self.writer.set_tags(run_key, perturbation_tags(n, p))
            self._append_note(run_key, p.note(self.scheduler) + (f" {after}" if after else ""))
        self._unwritten = left

    def _append_note(self, run_key: str, line: str) -> None:
        """Append a paragraph to the run's description (``mlflow.note.content``), keeping what
        it says (as journaled, also by an earlier driver); past `NOTE_LIMIT` characters the
        rest is left to the tags."""
        old = self.writer.journaled_tags(run_key).get(NOTE_TAG, "")
        more = "More in the tags `metalearner.perturb.N`."
        if old.endswith(more):
            return
        note = f"{old}\n\n{line}" if old else line
        if len(note) > NOTE_LIMIT:
            note = f"{old}\n\n{more}"
        self.writer.set_tags(run_key, {NOTE_TAG: note})
