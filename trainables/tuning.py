"""What a sweep's phases hand to Ray Tune and read back from it: the Tuner of a phase,
search spaces, searchers and schedulers from a spec's ``search`` block, and the reading of
a phase's result grid (the best completed trial, failed and diverged trials as error
lines). `trainables.phase_runner` runs the phases with it. Imports ray only inside functions.
"""

from __future__ import annotations

import copy
import math
import re
import traceback
from pathlib import Path
from typing import Any

from metalearner.config import set_dotted
from metalearner.environment import HF_OFFLINE, TUNE_QUIET, set_defaults
from metalearner.experiment import Arm, ExperimentSpec, Search
from trainables.reporting import DIVERGED_KEY, cell_config

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its worker names


def make_tuner(spec: ExperimentSpec, storage: str, trainable: Any, param_space: dict[str, Any], name: str,
               callback: Any, search_alg: Any = None, scheduler: Any = None, num_samples: int = 1,
               reuse: bool = True, keep: int | None = 2) -> Any:
    """The Tuner of one phase of a sweep (a new one; `trainables.phase_runner` restores).

    Args:
        spec: the experiment (metric, mode, resources, time budget).
        storage: Tune's ``storage_path`` (a folder or a URI).
        trainable: the sweep's trainable (with its shared task and resources).
        param_space: the phase's param space.
        name: the Tune experiment's name (its folder under ``storage``).
        callback: the phase's `MlflowTraceCallback`, or a list of Tune callbacks (it first).
        search_alg: a searcher, or None for Tune's own variant generator.
        scheduler: a trial scheduler, or None for FIFO.
        num_samples: trials to draw from ``param_space``.
        reuse: whether Tune reuses trial actors.
        keep: checkpoints kept per trial; None keeps every one.
    Returns:
        A ``tune.Tuner``.
    """
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    # keep=None for population-based phases: PBT restores a member from another's checkpoint of the
    # last perturbation, and the donor keeps checkpointing while the recipient's actor restarts, so
    # a pruned checkpoint fails the exploit (and with synch=True the population then waits forever;
    # Ray issue #8441). Every checkpoint of a PBT trial is kept.
    set_defaults(TUNE_QUIET, HF_OFFLINE)  # the sweep's environment, also when Ray was started elsewhere
    r = spec.resources
    # a multi-objective searcher holds its metrics (a list); Tune's one metric would replace them
    multi = isinstance(getattr(search_alg, "metric", None), list)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=None if multi else spec.metric, mode=None if multi else spec.mode, search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples, max_concurrent_trials=r.max_concurrent or None, reuse_actors=reuse,
            time_budget_s=spec.time_budget_s or None,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            # our callback is the logger that matters (MLflow); Tune's JSON log keeps
            # its own result bookkeeping working (the CSV/TensorBoard ones are off)
            name=name, storage_path=storage, verbose=0,
            callbacks=[*(callback if isinstance(callback, list) else [callback]), JsonLoggerCallback()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
            failure_config=tune.FailureConfig(max_failures=r.max_failures),
        ),
    )


def trial_name(trial: Any) -> str:
    """Short trial names: ``ARM-sSEED-ID`` instead of the whole config."""
    run_cfg, meta = cell_config(trial.config)
    seed = run_cfg.get("train", {}).get("seed", "")
    return f"{meta.get('arm', 'trial')}-s{seed}-{trial.trial_id}"


def to_tune_domain(spec: dict[str, Any]) -> Any:
    """``{"loguniform": [a, b]}`` -> ``tune.loguniform(a, b)`` (Ray's own domains)."""
    from ray import tune

    (kind, args), = spec.items()
    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "randint":
        return tune.randint(int(args[0]), int(args[1]))  # high exclusive, as in Ray
    raise ValueError(f"search.space: unknown domain {kind!r}")


def nested_space(space: dict[str, Any]) -> dict[str, Any]:
    """A ``search.space`` block as Tune's nested domains.

    Args:
        space: dotted key -> domain spec (``{"controller.factor": {"loguniform": [a, b]}}``).
    Returns:
        The nested dict of Ray domains (``{"controller": {"factor": tune.loguniform(a, b)}}``).
    """
    out: dict[str, Any] = {}
    for key, spec in space.items():
        set_dotted(out, key, to_tune_domain(spec))
    return out


def search_space(config: dict[str, Any], space: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The param space of a search phase: a run config with the search's domains in place.

    Args:
        config: the nested run config of the trials (not changed).
        space: the arm's ``search.space`` (dotted key -> domain spec).
        meta: the trials' meta (``arm``, ``phase``, ...), under ``meta``.
    Returns:
        A copy of ``config`` with ``meta`` and each searched key's Ray domain.
    """
    out = {**copy.deepcopy(config), "meta": dict(meta)}
    for key, dom in nested_space(space).items():
        out[key] = _merge(out.get(key, {}), dom)
    return out


def make_searcher(arm: Arm, spec: ExperimentSpec) -> Any:
    """The searcher of a searched arm (``search.searcher``), seeded with the spec's seed.

    Args:
        arm: an arm with a ``search`` block.
        spec: the experiment (its seed and ``resources.max_concurrent``).
    Returns:
        A Tune search algorithm (Optuna TPE, HyperOpt, or Tune's random/grid variants).
        With ``search.objectives``, Optuna's TPE is multi-objective (Ray's ``OptunaSearch``
        with a list of metrics and modes: an Optuna study with one direction per
        objective); `make_tuner` then leaves Tune's single metric unset.
    Raises:
        RuntimeError: the searcher's package is not installed.
    """
    s = arm.search
    assert s is not None
    if s.searcher == "optuna":
        try:
            import optuna
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise RuntimeError("searcher 'optuna' needs optuna: pip install optuna") from e
        sampler = optuna.samplers.TPESampler(seed=spec.seed)
        if s.objectives:
            return OptunaSearch(metric=[o.metric for o in s.objectives], mode=[o.mode for o in s.objectives],
                                sampler=sampler)
        return OptunaSearch(sampler=sampler)
    if s.searcher == "hyperopt":
        try:
            from ray.tune.search.hyperopt import HyperOptSearch
        except ImportError as e:
            raise RuntimeError("searcher 'hyperopt' needs hyperopt: pip install hyperopt") from e
        return HyperOptSearch(random_state_seed=spec.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # a search algorithm of our own makes Tune ignore max_concurrent_trials: pass it here
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.resources.max_concurrent)


def make_scheduler(arm: Arm, steps: int, report_every: int) -> Any:
    """The trial scheduler of a searched arm (``search.scheduler``), on the ``step`` clock.

    Args:
        arm: an arm with a ``search`` block.
        steps: training steps of a trial (ASHA's ``max_t``).
        report_every: steps between reports (default grace period and perturbation interval).
    Returns:
        ASHA, PBT or PB2 (both made `synch_safe`, PBT with `ClampToSpace`), or FIFO.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    s = arm.search
    assert s is not None
    sc = s.scheduler
    if sc.name == "asha":
        return ASHAScheduler(time_attr="step", max_t=steps, grace_period=sc.grace_period or 2 * report_every,
                             reduction_factor=sc.reduction_factor)
    interval = sc.perturbation_interval or 4 * report_every
    if sc.name == "pbt":
        return synch_safe(PopulationBasedTraining)(
            time_attr="step", perturbation_interval=interval, hyperparam_mutations=nested_space(s.space),
            quantile_fraction=sc.quantile_fraction, resample_probability=sc.resample_probability, synch=sc.synch,
            custom_explore_fn=ClampToSpace(s.space),
        )
    if sc.name == "pb2":
        bounds: dict[str, Any] = {}
        for key, dom in s.space.items():
            (kind, args), = dom.items()
            high = float(args[1]) - (1 if kind == "randint" else 0)  # randint's high is exclusive
            set_dotted(bounds, key, [float(args[0]), high])
        return synch_safe(PB2)(time_attr="step", perturbation_interval=interval, hyperparam_bounds=bounds,
                   quantile_fraction=sc.quantile_fraction, synch=sc.synch)
    return FIFOScheduler()


_SYNCH_SAFE: dict[type, type] = {}


def synch_safe(base: type) -> type:
    """``base`` (Ray's PBT or PB2) that does not hang when a member ends early.

    With ``synch=True`` a member that reaches the next perturbation step pauses until every
    other live member gets there; the check runs only when a result comes in. If the last
    member still running instead ends (it finished early: diverged, or failed for good),
    no result comes, the paused members are never chosen to run again, and Tune waits
    forever ("No trial is running and no new trial has been started", seen in a study).
    Here, when a member completes, errors or is removed and every member left is waiting
    at the sync point, that perturbation is skipped: the next one moves on by one interval
    and the waiting members continue.
    """
    if base not in _SYNCH_SAFE:

        class SynchSafe(base):  # type: ignore[misc, valid-type]
            def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
                super().on_trial_complete(tune_controller, trial, result)
                self._release_waiting(tune_controller, trial)

            def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
                super().on_trial_error(tune_controller, trial)
                self._release_waiting(tune_controller, trial)

            def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
                super().on_trial_remove(tune_controller, trial)
                self._release_waiting(tune_controller, trial)

            def _release_waiting(self, tune_controller: Any, gone: Any) -> None:
                if not self._synch:
                    return
                left = [t for t in tune_controller.get_live_trials() if t is not gone and t in self._trial_state]
                if not left:
                    return
                while all(self._trial_state[t].last_train_time >= self._next_perturbation_sync for t in left):
                    self._next_perturbation_sync += self._perturbation_interval

        SynchSafe.__name__ = SynchSafe.__qualname__ = f"SynchSafe{base.__name__}"
        _SYNCH_SAFE[base] = SynchSafe
    return _SYNCH_SAFE[base]


class ClampToSpace:
    """PBT's explore step multiplies values by 1.2 or 0.8 without looking at the domain;
    this puts each mutated value back inside its range (a factor of 1.001 * 0.8 would
    otherwise be an invalid controller)."""

    def __init__(self, space: dict[str, Any]) -> None:
        self.bounds = {}
        for key, dom in space.items():
            (kind, args), = dom.items()
            if kind in ("uniform", "loguniform"):
                self.bounds[key] = (float(args[0]), float(args[1]), float)
            elif kind == "randint":
                self.bounds[key] = (int(args[0]), int(args[1]) - 1, int)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, (lo, hi, kind) in self.bounds.items():
            parts = key.split(".")
            node = config.get("cell", config)
            for p in parts[:-1]:
                node = node.get(p, {})
            if parts[-1] in node:
                node[parts[-1]] = kind(min(max(node[parts[-1]], lo), hi))
        return config


def best_result(grid: Any, metric: str, mode: str, search: Search | None = None) -> Any:
    """The best of the trials that completed (ended without an error, not diverged) by
    their last ``metric``; None when none did. A failed trial's partial results never
    win, and nothing here swallows an error (Ray's ``get_best_result`` ranks failed
    trials too, and raises when nothing has the metric).

    With ``search.objectives``, the trials with a finite last value of every objective
    are points, and the one of their Pareto front that ``search.pick`` names
    (`metalearner.report.pareto.pick`: the knee, or the best on ``metric``) wins.
    """
    objectives = list(search.objectives) if search is not None else []
    names = [o.metric for o in objectives] or [metric]
    ok = []
    for r in grid:
        metrics = r.metrics or {}
        if r.error is not None or metrics.get(DIVERGED_KEY):  # a diverged run is a failure too
            continue
        values = [metrics.get(k) for k in names]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            ok.append(([float(v) for v in values], r))  # type: ignore[arg-type]
    if not ok:
        return None
    if objectives:
        from metalearner.report.pareto import pick

        assert search is not None
        chosen = pick([v for v, _ in ok], [str(o.mode) for o in objectives], search.pick, names.index(metric))
        return None if chosen is None else ok[chosen][1]
    best = min if mode == "min" else max
    return best(ok, key=lambda t: t[0][0])[1]


def diverged_errors(grid: Any) -> list[str]:
    """One line per trial of ``grid`` that diverged (its last report carries
    ``DIVERGED_KEY``), read from the grid, so that a divergence an earlier (interrupted)
    driver saw counts as well; each trial once.

    Args:
        grid: a phase's Tune result grid.
    Returns:
        ``trial ID (arm ARM, seed SEED) diverged at step S of T: ...`` lines, in grid order.
    """
    lines = []
    for r in grid:
        metrics = r.metrics or {}
        if not metrics.get(DIVERGED_KEY):
            continue
        run_cfg, meta = cell_config(r.config or {})
        seed = run_cfg.get("train", {}).get("seed", "")
        lines.append(f"trial {metrics.get('trial_id')} (arm {meta.get('arm', 'trial')}, seed {seed}) diverged "
                     f"at step {metrics.get('step')} of {metrics.get('total_steps')}: "
                     "train.max_nonfinite non-finite steps in a row")
    return lines


def log_trial_errors(grid: Any, path: Path) -> tuple[list[str], str | None]:
    """Append each failed trial's full error (the trial's remote traceback) and its trial
    folder to ``path`` (the sweep's error log).

    Args:
        grid: a phase's Tune result grid.
        path: the file to append to.
    Returns:
        (one line per failed trial: the error's own type and message; the first failure's
        full text, or None if no trial failed).
    """
    lines = []
    first = None
    with open(path, "a", encoding="utf-8") as fh:
        for r in grid:
            if r.error is None:
                continue
            text = _ANSI.sub("", "".join(traceback.format_exception(r.error))).rstrip()
            first = first or f"trial folder {r.path}\n{text}"
            fh.write(f"==== trial folder {r.path}\n{text}\n\n")
            cause = getattr(r.error, "cause", None) or r.error  # a RayTaskError wraps the trial's own
            message = (str(cause).strip().splitlines() or [""])[0]
            lines.append(f"{type(cause).__name__}: {message}" if message else type(cause).__name__)
    return lines, first


def _merge(base: Any, dom: Any) -> Any:
    """Put the search domains of a nested space into the base config section."""
    if isinstance(base, dict) and isinstance(dom, dict):
        out = dict(base)
        for k, v in dom.items():
            out[k] = _merge(base.get(k), v)
        return out
    return dom
