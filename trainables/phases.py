"""Per-seed populations: a population-based arm (PBT/PB2) paired with the study's seeds.

Without ``search.per_seed`` a PBT arm runs one population on its tuning seed, and its
trials stay search-phase runs that `metalearner compare` does not pair with the other
arms. With ``search.per_seed: true`` the sweep runs one population per comparison seed
(every member trains on that seed), and the member with the best final ``metric`` is
promoted to that seed's compare-phase run (tags ``metalearner.phase = compare`` and the
arm's colour); the other members stay search-phase runs.

Why the best member: it is the model PBT hands back, so it is what a user of the
meta-learner gets. It is chosen on the same validation loss the comparison reads, out of
``num_samples`` members, and the population trained ``num_samples`` models; both favour
PBT. A null result for this arm is therefore conservative; an advantage must be read
next to that selection and the population's ``num_samples``-fold training cost (its
compute to target counts only the promoted member's own lineage; a member that cloned
another's checkpoint continues that member's trace).

This module plans those populations and promotes their best members; each population runs
as a search phase through the sweep's `trainables.phase_runner.PhaseRunner`, and
`trainables.sweep` calls `run_per_seed_populations` for such an arm (and `shows_compare`
to know whether the sweep's view may show its comparison trials). Imports no ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from metalearner.experiment import Arm, ExperimentSpec
from metalearner.report.export import best_params
from metalearner.sweep_state import SweepState
from metalearner.tracking import PHASE_TAG, RUN_COLOR_TAG, run_colour
from trainables.phase_runner import PhaseRunner


@dataclass(frozen=True)
class Population:
    """One population of a per-seed arm.

    Attributes:
        arm: the arm's name.
        seed: the comparison seed every member trains on.
        config: the nested run config of the members (search domains not yet merged).
        meta: the trial meta (``arm``, ``phase`` = ``search``, ``population_seed``).
    """

    arm: str
    seed: int
    config: dict[str, Any]
    meta: dict[str, Any]


def plan_populations(spec: ExperimentSpec, arm: Arm) -> list[Population]:
    """The populations of a ``per_seed`` arm, one per comparison seed, in seed order.

    Args:
        spec: the validated experiment.
        arm: an arm whose ``search.per_seed`` is true.
    Returns:
        One `Population` per seed of ``spec.seeds``.
    """
    if arm.search is None or not arm.search.per_seed:
        raise ValueError(f"arm {arm.name!r}: expected search.per_seed true")
    return [Population(arm=arm.name, seed=seed, config=spec.run_config(arm, seed),
                       meta={"arm": arm.name, "phase": "search", "population_seed": seed})
            for seed in spec.seeds]


def best_member(finals: dict[str, float | None], mode: str) -> str | None:
    """The trial id with the best final metric; None if no member has a finite one.

    Args:
        finals: trial id -> the metric at the member's last report (None or NaN if missing).
        mode: ``"min"`` or ``"max"``.
    Returns:
        The best trial id (ties: the smallest id, so the choice is deterministic), or None.
    """
    ok = {t: float(v) for t, v in finals.items() if v is not None and math.isfinite(float(v))}
    if not ok:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(sorted(ok), key=lambda t: sign * ok[t])


@dataclass(frozen=True)
class Member:
    """A population member that may be promoted.

    Attributes:
        final: its metric at its last report (None or NaN if missing).
        config: its nested run config at the end (PBT's last settings).
        key: its child run's key in the sweep's journal.
    """

    final: float | None
    config: dict[str, Any]
    key: str


def eligible_members(grid: Any, metric: str, run_keys: dict[str, str]) -> dict[str, Member]:
    """The members of a population's result grid that may be promoted: ended without an
    error and not diverged (as `trainables.tuning.best_result` decides), with a child run.
    Read from the grid, so a member that finished in an earlier (interrupted) driver
    process counts as one that finished in this one.

    Args:
        grid: the population's Tune result grid (iterable of results with ``metrics``,
            ``error`` and ``config``).
        metric: the spec's metric.
        run_keys: trial id -> its child run key (this driver's, else the sweep state's).
    Returns:
        trial id -> `Member`, in grid order.
    """
    from trainables.reporting import DIVERGED_KEY, cell_config

    out: dict[str, Member] = {}
    for r in grid:
        metrics = r.metrics or {}
        tid = metrics.get("trial_id")
        if r.error is not None or metrics.get(DIVERGED_KEY) or tid is None:
            continue
        key = run_keys.get(tid)
        if key is None:
            continue
        out[tid] = Member(metrics.get(metric), cell_config(r.config or {})[0], key)
    return out


def run_per_seed_populations(phases: PhaseRunner, arm: Arm, result: Any) -> bool:
    """Run one population per seed for ``arm`` and promote each one's best member.

    Each population is a search phase of the sweep (``search:ARM:sSEED``), run by the
    sweep's `PhaseRunner`: a resumed sweep skips the populations that finished and
    restores the one that was running.

    Args:
        phases: the sweep's phase runner (its spec, writer, state, parent run, colours and
            stop request).
        arm: an arm with ``search.per_seed``.
        result: the `trainables.sweep.SweepResult`; its ``trials``, ``errors``, ``best``,
            ``spec_files`` and ``failed_arms`` are updated (``best[arm]``: the final settings
            of the best seed's promoted member; every seed's are in ``best_ARM_per_seed.yaml``,
            logged to the parent).
    Returns:
        True if a stop request interrupted the arm (no later phase may start).
    """
    spec, state, writer = phases.spec, phases.state, phases.writer
    chosen: dict[int, tuple[float, dict[str, Any]]] = {}
    first_error = None
    for pop in plan_populations(spec, arm):
        phase = f"search:{arm.name}:s{pop.seed}"
        done = state.phase(phase)
        if not done.get("done"):
            if phases.stop.is_set():
                return True
            out = phases.search(arm, pop.config, pop.meta, phase, f"{spec.name}-{arm.name}-s{pop.seed}-{state.stamp}",
                                f"{spec.name}: {arm.name} population, seed {pop.seed}")
            result.trials.update(out.trials)
            if out.interrupted:
                return True
            # run keys: this driver's, and those of members an earlier (interrupted) driver ran
            keys = {**{t: c["key"] for t, c in state.children(phase).items()}, **out.run_keys}
            members = eligible_members(out.grid, spec.metric, keys)
            best = best_member({t: m.final for t, m in members.items()}, spec.mode)
            promoted = None
            errors = list(out.errors)
            if best is not None:
                m = members[best]
                _promote(phases, m.key, arm.name)
                result.trials.setdefault(best, {"arm": arm.name, "seed": pop.seed, "run_key": m.key})
                result.trials[best]["phase"] = "compare"
                promoted = {"trial": best, "metric": float(m.final),  # type: ignore[arg-type]
                            "controller": dict(m.config.get("controller", {}))}
            else:  # every member failed, diverged or ended without a finite metric: this seed has no run
                errors.append(f"arm {arm.name}, seed {pop.seed}: no population member reported a finite "
                              f"{spec.metric} (each failed, diverged or was stopped); the seed has no compare run")
            done = {"errors": errors, "best": promoted, "first_error": out.first_error}
            state.finish_phase(phase, **done)
        result.errors += done.get("errors", [])
        first_error = first_error or done.get("first_error")
        if done.get("best"):
            chosen[pop.seed] = (float(done["best"]["metric"]), dict(done["best"]["controller"]))
    if not chosen:
        result.failed_arms[arm.name] = first_error or (
            f"no population member reported a finite {spec.metric} (each diverged or was stopped)")
        return False
    # the settings in force at the end, per seed; the best seed's as the arm's spec file
    _, top = min(chosen.values(), key=lambda fc: fc[0] if spec.mode == "min" else -fc[0])
    result.best[arm.name] = top
    best_file = state.folder / f"best_{arm.name}.yaml"
    seeds_file = state.folder / f"best_{arm.name}_per_seed.yaml"
    result.spec_files[arm.name] = best_file
    if not best_file.is_file():  # a resumed sweep has written and logged them already
        best_file.write_text(yaml.safe_dump({"controller": top}, sort_keys=False))
        seeds_file.write_text(yaml.safe_dump({seed: {spec.metric: f, "controller": c}
                                              for seed, (f, c) in sorted(chosen.items())}, sort_keys=False))
        writer.log_artifact(phases.parent, best_file)
        writer.log_artifact(phases.parent, seeds_file)
    writer.log_params(phases.parent, best_params(arm.name, top))  # names the parent has are skipped
    return False


def shows_compare(state: SweepState) -> bool:
    """Whether a sweep has comparison trials: the compare phase started one, or a per-seed
    population promoted its best member (``search:ARM:sSEED`` with a ``best``)."""
    if state.children("compare"):
        return True
    return any(key.startswith("search:") and key.count(":") == 2 and rec.get("best")
               for key, rec in state.data["phases"].items())


def _promote(phases: PhaseRunner, key: str, arm: str) -> None:
    """Tag the child run ``key`` as ``arm``'s compare-phase run (phase tag and colour)."""
    tags = {PHASE_TAG: "compare"}
    colour = run_colour(arm, "compare", phases.colours) if phases.colours is not None else None
    if colour:
        tags[RUN_COLOR_TAG] = colour
    phases.writer.set_tags(key, tags)
