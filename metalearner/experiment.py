"""Experiment specs (``experiments/*.yaml``): parsed and validated before Ray starts.

A spec names a base run config (``task``, ``model``, ``train``, ``controller``), the
``arms`` to compare (each a controller, optionally tuned by a ``search``, or a fixed
controller exported by another sweep, ``controller_file``: `metalearner.controller_file`),
the ``seeds``, ``resources``, ``tracking`` (``outage_s``) and a ``smoke`` block of dotted overrides that ``--smoke-test`` applies.
Without ``arms``, the top-level ``controller`` (+ ``search``) is the single arm.

Search-space domains map one to one onto Ray Tune's (``grid``, ``choice``, ``uniform``,
``loguniform``, ``randint``); the mapping itself lives in `trainables` (only it imports
ray). Every value a domain can yield — both ends of a range included, since PBT's explore
step clamps mutated values onto them — must make a valid run config.

Validation runs on strict pydantic models (`metalearner.schema`); every error is a
`ConfigError`: one line naming the field. Must not import ray.

Paths in a spec (``task.data_dir``, ``task.files``, ``task.tokenizer``, ``model.hf.path``,
``arms[i].controller_file``) are made absolute when the spec is loaded, relative to the
*working folder* of the command (as the shell completes them and as a ``--set`` override
is typed), never to the spec file's folder; the trials get the
absolute paths, so they never depend on their own working folder (Ray moves each trial
into its trial folder). The one exception is ``runtime_env`` (the code a plugin
controller needs on every worker, `metalearner.runtime_env`): its paths are relative to
the spec file, since that code ships with the spec.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, field_validator, model_validator

from metalearner.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_run_config,
    missing_extras,
    probe,
    read_yaml,
    set_dotted,
)
from metalearner.controller_file import ControllerFile, add_arm_flags, arm_source
from metalearner.objectives import Objective, check_objectives, load_objectives
from metalearner.registry import default_arm_name
from metalearner.runtime_env import driver_paths, importable, merge_runtime_env, resolve_runtime_env
from metalearner.schema import STRICT, SafeName, check_name, load_dataclass, short, validate

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCHERS = ("random", "optuna", "hyperopt")
SCHEDULERS = ("fifo", "asha", "pbt", "pb2")
MAX_SEEDS = 1000
MAX_SAMPLES = 10_000

# what a trial reports that a sweep may rank on, and the direction that is better
METRIC_MODES: dict[str, str] = {"val_loss": "min", "loss": "min"}
TASK_METRIC_MODES: dict[str, dict[str, str]] = {"recall": {"recall_acc": "max"}, "speech": {"cer": "min"},
                                               "text": {}}

# the spec keys that hold local paths (one path, or a list of paths)
PATH_KEYS: dict[str, str] = {"data_dir": "one", "files": "list", "tokenizer": "one"}

# optional dependencies of searchers and schedulers: (spec field=value, pip extra, imports)
SEARCH_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "search.searcher='hyperopt'": ("hyperopt", ("hyperopt",)),
    "search.scheduler.name='pb2'": ("pb2", ("sklearn",)),  # Ray's PB2 fits its GP with scikit-learn
}


@dataclass
class Resources:
    cpus_per_trial: Annotated[float, Field(gt=0, le=1024)] = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0, le=64)] = 0.0
    max_concurrent: Annotated[int, Field(ge=0, le=MAX_SAMPLES)] = 0  # 0 = as many as the resources allow
    # how many times a trial whose worker died (or that raised) restarts from its last checkpoint
    max_failures: Annotated[int, Field(ge=0, le=100)] = 2


@dataclass
class Tracking:
    # how long the MLflow writer retries an unreachable store before the points it holds
    # are left in the journal for `metalearner sync` (the sweep then exits 1)
    outage_s: Annotated[float, Field(ge=0, le=7 * 86400)] = 300.0


@dataclass
class Scheduler:
    name: Literal["fifo", "asha", "pbt", "pb2"] = "fifo"
    grace_period: Annotated[int, Field(ge=0)] = 0  # asha: steps before the first cut (0 = two reports)
    reduction_factor: Annotated[float, Field(gt=1, le=100)] = 2.0  # asha
    perturbation_interval: Annotated[int, Field(ge=0)] = 0  # pbt/pb2: steps between perturbations (0 = 4 reports)
    quantile_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.25  # pbt/pb2
    resample_probability: Annotated[float, Field(ge=0, le=1)] = 0.25  # pbt
    synch: bool = True  # pbt: perturb all trials at the same step


@dataclass
class Search:
    space: dict[str, Any] = field(default_factory=dict)
    searcher: Literal["random", "optuna", "hyperopt"] = "random"
    scheduler: Scheduler = field(default_factory=Scheduler)
    num_samples: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] = 4
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 1000  # the tuning seed: kept apart from the comparison seeds
    confirm: bool = True  # re-train the best configuration on every comparison seed
    # pbt/pb2: one population per comparison seed; each population's best member at the
    # end (by `metric`) is that seed's compare-phase result (`trainables.phases`)
    per_seed: bool = False
    # a multi-objective search (`metalearner.objectives`): the Pareto front trial that `pick`
    # names (knee: closest to the ideal point; best: best on `metric`) is confirmed
    objectives: list[Objective] = field(default_factory=list)
    pick: Literal["knee", "best"] = "knee"

    @property
    def population_based(self) -> bool:
        return self.scheduler.name in ("pbt", "pb2")


@dataclass
class Arm:
    name: str
    controller: dict[str, Any]
    search: Search | None = None
    source: ControllerFile | None = None  # a fixed arm read from a controller file (controller_file / --arm)

    def tags(self) -> dict[str, str]:
        """Tags for every run of the arm: the source file and sha256 of a controller read from a file."""
        return self.source.tags() if self.source is not None else {}


@dataclass
class ExperimentSpec:
    name: str
    description: str
    base: dict[str, Any]  # nested run config shared by the arms (controller excluded)
    arms: list[Arm]
    seeds: list[int]
    resources: Resources
    metric: str = "val_loss"
    mode: str = "min"
    target_loss: float | None = None  # the val loss "compute to target" counts to; None: static's final
    time_budget_s: float = 0.0
    seed: int = 0
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    tracking: Tracking = field(default_factory=Tracking)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # Ray's, local paths absolute (metalearner.runtime_env)

    def run_config(self, arm: Arm, seed: int, controller: dict[str, Any] | None = None) -> dict[str, Any]:
        """The nested run config of one cell (arm x seed) without search domains."""
        cfg = copy.deepcopy(self.base)
        cfg["controller"] = copy.deepcopy(controller if controller is not None else arm.controller)
        cfg.setdefault("train", {})["seed"] = seed
        return cfg


# ---------------------------------------------------------------- input models

Mapping = dict[str, Any]


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ValueError("expected a finite number, a string, true/false or null")


def _count_to_seeds(value: Any) -> Any:
    """``seeds: 3`` means ``[0, 1, 2]``."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEEDS:
        return list(range(value))
    return value


Scalar = Annotated[Any, AfterValidator(_scalar)]
Number = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class Stop(BaseModel):
    model_config = STRICT
    time_budget_s: Annotated[float, Field(ge=0, le=10**7)] = 0.0


class SpecFile(BaseModel):
    """The top level of a spec file (the sections are checked by their own loaders)."""

    model_config = STRICT
    name: SafeName | None = None
    description: str = ""
    task: Mapping | None = None
    model: Mapping | None = None
    train: Mapping | None = None
    controller: Mapping | None = None
    search: Mapping | None = None
    arms: Annotated[list[Any], Field(min_length=1, max_length=100)] | None = None
    seeds: Annotated[list[Seed], BeforeValidator(_count_to_seeds), Field(min_length=1, max_length=MAX_SEEDS)] = [0]
    resources: Mapping | None = None
    tracking: Mapping | None = None
    runtime_env: Mapping | None = None
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    target_loss: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # compute-to-target
    stop: Stop | None = None
    smoke: Mapping | None = None
    seed: Seed = 0

    @field_validator("task", "model", "train", "controller", "search", "arms", "resources", "tracking", "stop",
                     "smoke", "runtime_env", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("expected a mapping (or leave the key out)")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("expected distinct seeds")
        return seeds


class ArmInput(BaseModel):
    model_config = STRICT
    name: SafeName | None = None
    controller: Mapping | None = None
    search: Mapping | None = None
    controller_file: Annotated[str, Field(min_length=1)] | None = None  # {controller: {...}} from another sweep
    controller_sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] | None = None  # the file's, when pinned


class Domain(BaseModel):
    """One search-space entry: exactly one of its fields."""

    model_config = STRICT
    grid: Annotated[list[Scalar], Field(min_length=1, max_length=1000)] | None = None
    choice: Annotated[list[Scalar], Field(min_length=1, max_length=1000)] | None = None
    uniform: Annotated[list[Number], Field(min_length=2, max_length=2)] | None = None
    loguniform: Annotated[list[Number], Field(min_length=2, max_length=2)] | None = None
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None

    @model_validator(mode="after")
    def _one_range(self) -> Domain:
        given = [k for k in DOMAINS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"got {given or 'no domain'}, expected exactly one of {list(DOMAINS)}")
        kind = given[0]
        args = getattr(self, kind)
        for v in args:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"got {v!r} in {kind}, expected finite values")
        if kind in ("uniform", "loguniform", "randint"):
            lo, hi = args
            if not lo < hi:
                raise ValueError(f"got {kind} [{lo}, {hi}], expected low < high (an empty or reversed range)")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"got loguniform [{lo}, {hi}], expected low > 0 for a log scale")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAINS if getattr(self, k) is not None)

    def ends(self) -> list[Any]:
        """Every value a choice can yield, or both ends of a range (randint: high exclusive)."""
        args = getattr(self, self.kind)
        if self.kind in ("grid", "choice"):
            return list(args)
        if self.kind == "randint":
            return [args[0], args[1] - 1]
        return [float(args[0]), float(args[1])]

    def middle(self) -> Any:
        """A representative value (the first choice, or the middle of a range)."""
        args = getattr(self, self.kind)
        if self.kind in ("grid", "choice"):
            return args[0]
        lo, hi = args
        if self.kind == "randint":
            return int(lo)
        return math.sqrt(lo * hi) if self.kind == "loguniform" else (lo + hi) / 2


# ---------------------------------------------------------------- parsing


def _load_search(data: Any, where: str) -> tuple[Search, dict[str, Domain]]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: got {short(data)}, expected a mapping")
    data = dict(data)
    sched = data.pop("scheduler", {"name": "fifo"})
    if isinstance(sched, str):
        sched = {"name": sched}
    scheduler = load_dataclass(Scheduler, sched, f"{where}.scheduler.")
    space = data.pop("space", None)
    objectives = data.pop("objectives", None)
    search = load_dataclass(Search, data, f"{where}.")
    search.scheduler = scheduler
    search.objectives = load_objectives(objectives, search.searcher, scheduler.name, where)
    if "pick" in data and not search.objectives:
        raise ConfigError(f"{where}.pick: got {short(data['pick'])}, expected it only with {where}.objectives")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}.space: got {short(space)}, expected a mapping of at least one key to a domain")
    domains: dict[str, Domain] = {}
    for key, spec in space.items():
        if not isinstance(key, str) or not key.startswith(("controller.", "train.", "model.")):
            raise ConfigError(f"{where}.space.{key}: expected a key under controller., train. or model.")
        if key == "train.seed":
            raise ConfigError(f"{where}.space.train.seed: got a search over it, expected none: the tuning "
                              f"seed is {where}.seed and the comparison seeds are 'seeds'")
        domains[key] = validate(Domain, spec, f"{where}.space.{key}.")
    search.space = {key: {d.kind: getattr(d, d.kind)} for key, d in domains.items()}
    kinds = {d.kind for d in domains.values()}
    if search.population_based:
        if search.searcher != "random":
            raise ConfigError(
                f"{where}.searcher: got {search.searcher!r} with scheduler {scheduler.name!r}, expected "
                "'random' (Ray cannot combine a search algorithm with PBT/PB2)"
            )
        if "grid" in kinds:
            raise ConfigError(f"{where}.space: got a 'grid', expected choice/uniform: {scheduler.name} cannot mutate a grid")
        if scheduler.name == "pb2" and kinds - {"uniform", "loguniform", "randint"}:
            raise ConfigError(f"{where}.space: got {sorted(kinds)}, expected continuous ranges "
                              "(uniform/loguniform/randint) for pb2")
    if search.per_seed and not search.population_based:
        raise ConfigError(f"{where}.per_seed: got true with scheduler {scheduler.name!r}, expected scheduler 'pbt' "
                          "or 'pb2' (a population per seed; other searches tune on search.seed, then confirm)")
    if search.per_seed and search.confirm:
        raise ConfigError(f"{where}.confirm: got true with per_seed true, expected false: each seed's population "
                          "already gives that seed's result, there is nothing to re-train")
    if search.searcher in ("optuna", "hyperopt") and "grid" in kinds:
        raise ConfigError(f"{where}.space: got a 'grid' with searcher {search.searcher!r}, expected choice "
                          "('grid' works with searcher 'random' only)")
    return search, domains


def _check_space(cfg: dict[str, Any], domains: dict[str, Domain], where: str) -> RunConfig:
    """Validate the run configs a search space yields: the base alone, then each key at
    its middle and at every choice or both ends of its range (PBT's explore step clamps
    onto the ends), then all keys at their middles together."""
    load_run_config(cfg)
    for key, dom in domains.items():
        for value in [dom.middle(), *dom.ends()]:
            one = copy.deepcopy(cfg)
            set_dotted(one, key, value)
            try:
                load_run_config(one)
            except ConfigError as e:
                raise ConfigError(f"{where}.space.{key}: got {short({dom.kind: getattr(dom, dom.kind)})}, which "
                                  f"can yield {value!r} (PBT clamps onto the ends of a range), and then {e}") from None
    middle = copy.deepcopy(cfg)
    for key, dom in domains.items():
        set_dotted(middle, key, dom.middle())
    try:
        return load_run_config(middle)
    except ConfigError as e:
        raise ConfigError(f"{where}.space: its middle point is not a valid config: {e}") from None


def _check_cell(cfg: RunConfig, spec: SpecFile) -> None:
    """Rules of a sweep cell beyond the run config: cadence and the metric."""
    t = cfg.train
    if t.checkpoint_every and t.checkpoint_every % t.report_every:
        raise ConfigError(f"train.checkpoint_every: got {t.checkpoint_every}, expected a multiple of "
                          f"train.report_every ({t.report_every}): a trial checkpoints when it reports")
    modes = {**METRIC_MODES, **TASK_METRIC_MODES.get(cfg.task.name, {})}
    if spec.metric not in modes:
        raise ConfigError(f"metric: got {spec.metric!r}, expected one that a {cfg.task.name} trial reports: "
                          f"{sorted(modes)}")
    if spec.mode != modes[spec.metric]:
        raise ConfigError(f"mode: got {spec.mode!r}, expected {modes[spec.metric]!r} for metric {spec.metric!r}")


def _check_cadence(search: Any, cfg: RunConfig, where: str) -> None:
    """A scheduler's first cut must fall inside the run: ASHA refuses a grace period past
    ``max_t`` (= ``train.steps``) only once Ray has started."""
    sc = search.scheduler
    if sc.name == "asha" and sc.grace_period > cfg.train.steps:
        raise ConfigError(f"{where}.scheduler.grace_period: got {sc.grace_period}, expected at most "
                          f"train.steps ({cfg.train.steps})")


def _check_devices(resources: Resources, base: dict[str, Any]) -> None:
    """A trial given a GPU must train on it, and a trial told to use CUDA needs one: Ray
    hides every GPU from a trial that was given none (``CUDA_VISIBLE_DEVICES``)."""
    device = (base.get("train") or {}).get("device", "cpu")
    gpus = resources.gpus_per_trial
    if gpus > 0 and device == "cpu":
        raise ConfigError(f"train.device: got 'cpu' with resources.gpus_per_trial {gpus:g}, expected 'auto' or "
                          "'cuda': a trial given a GPU would not train on it")
    if gpus == 0 and device == "cuda":
        raise ConfigError("resources.gpus_per_trial: got 0 with train.device 'cuda', expected > 0: Ray shows no "
                          "GPU to a trial given none ('auto' trains on a GPU only where there is one)")


def parse_experiment(data: Any, source: str = "<spec>") -> ExperimentSpec:
    """Validate a loaded YAML spec (overrides already applied)."""
    if not isinstance(data, dict):
        raise ConfigError(f"experiment: got {short(data)}, expected a mapping")
    top = validate(SpecFile, data)
    name = top.name if top.name is not None else check_name(Path(source).stem, "name")
    base = {k: copy.deepcopy(data[k]) for k in ("task", "model", "train") if data.get(k) is not None}
    if "seed" in (top.train or {}):
        searched = top.search is not None or any(isinstance(a, dict) and a.get("search") is not None
                                                 for a in top.arms or [])
        if top.seeds != [top.train["seed"]] or searched:  # honoured only when it is the one seed
            raise ConfigError(f"train.seed: got {short(top.train['seed'])}, expected it unset: each cell trains "
                              "on one of 'seeds' (and a search on search.seed), which would replace it")
    resources = load_dataclass(Resources, top.resources, "resources.")
    tracking = load_dataclass(Tracking, top.tracking, "tracking.")
    runtime_env = resolve_runtime_env(top.runtime_env, Path.cwd())  # a spec file's paths are absolute by now
    with importable(driver_paths(runtime_env)):  # a plugin controller imports here as on the workers
        arms = _load_arms(top, base)
    _check_devices(resources, base)
    raw = copy.deepcopy(data)
    for i, arm in enumerate(arms):  # pinned: a resumed sweep refuses a controller file that changed since
        if arm.source is not None:
            raw["arms"][i]["controller_sha256"] = arm.source.sha256
    return ExperimentSpec(name=name, description=top.description, base=base, arms=arms, seeds=list(top.seeds),
                          resources=resources, metric=top.metric, mode=top.mode,
                          target_loss=None if top.target_loss is None else float(top.target_loss),
                          time_budget_s=float(top.stop.time_budget_s if top.stop else 0.0), seed=top.seed,
                          source=source, raw=raw, tracking=tracking, runtime_env=runtime_env)


def _load_arms(top: SpecFile, base: dict[str, Any]) -> list[Arm]:
    """The arms of a spec, each validated with its search space."""
    default_ctrl = top.controller or {"name": "ewma"}
    implicit = top.arms is None  # the top-level controller (+ search) is the single arm
    if implicit:
        arms_raw: list[Any] = [{"controller": default_ctrl,
                                **({"search": top.search} if top.search is not None else {})}]
    elif top.search is not None:
        raise ConfigError("search: got a top-level search with 'arms', expected each search inside its arm")
    else:
        arms_raw = list(top.arms or [])
    arms: list[Arm] = []
    for i, raw in enumerate(arms_raw):
        where = "" if implicit else f"arms[{i}]"
        a = validate(ArmInput, raw, f"{where}." if where else "")
        source = arm_source(a.controller_file, a.controller_sha256, where, controller=a.controller is not None,
                            search=a.search is not None)
        ctrl = dict(source.controller if source is not None else a.controller or default_ctrl)
        cfg = {**copy.deepcopy(base), "controller": copy.deepcopy(ctrl)}
        try:
            if a.search is not None:
                search, domains = _load_search(a.search, f"{where}.search".lstrip("."))
                resolved = _check_space(cfg, domains, f"{where}.search".lstrip("."))
            else:
                search, resolved = None, load_run_config(cfg)
        except ConfigError as e:
            msg = str(e)
            if source is not None and msg.startswith("controller."):  # the file's settings: name the file
                raise ConfigError(f"{where}.controller_file: {source.path}: {msg}") from None
            raise ConfigError(f"{where}.{msg}" if where and msg.startswith("controller.") else msg) from None
        _check_cell(resolved, top)
        if search is not None:
            _check_cadence(search, resolved, f"{where}.search".lstrip("."))
            check_objectives(search.objectives, {**METRIC_MODES, **TASK_METRIC_MODES.get(resolved.task.name, {})},
                             top.metric, resolved.task.name, f"{where}.search".lstrip("."))
        arm_name = a.name if a.name is not None else check_name(
            "tuned" if implicit and search else default_arm_name(resolved.controller["name"]),
            f"{where}.name".lstrip("."))
        if any(arm_name == b.name for b in arms):
            raise ConfigError(f"{where}.name: got {arm_name!r} twice, expected distinct arm names")
        arms.append(Arm(name=arm_name, controller=ctrl, search=search, source=source))
    return arms


def load_experiment(path: str | Path, overrides: list[str] | None = None, smoke: bool = False,
                    runtime_env: dict[str, Any] | None = None, arms: list[str] | None = None) -> ExperimentSpec:
    """Read, apply ``smoke`` and ``--set`` overrides, validate. Raises `ConfigError`
    (and nothing else, whatever the file holds).

    Args:
        path: the spec file.
        overrides: ``--set`` items.
        smoke: apply the spec's smoke block.
        runtime_env: the CLI's ``--py-modules`` / ``--working-dir``, resolved
            (`metalearner.runtime_env.resolve_runtime_env`), added to the spec's.
        arms: ``--arm NAME=FILE`` items: fixed arms read from controller files (`add_arm_flags`).
    Returns:
        The validated spec; its ``raw`` (saved with the sweep) holds the absolute paths and
        the sha256 of every controller file (``arms[i].controller_sha256``).
    """
    p = Path(path)
    data = read_yaml(p, "experiment")
    if not isinstance(data, dict):
        raise ConfigError(f"experiment: {path} holds {short(data)}, expected a mapping")
    smoke_block = data.pop("smoke", None)
    if smoke_block is None:
        smoke_block = {}
    if not isinstance(smoke_block, dict) or not all(isinstance(k, str) for k in smoke_block):
        raise ConfigError(f"smoke: got {short(smoke_block)}, expected a mapping of dotted overrides")
    if smoke:
        data = apply_smoke(data, smoke_block)
    data = apply_overrides(data, overrides or [])
    data = add_arm_flags(data, arms or [])
    data = absolute_paths(data, Path.cwd())
    env = merge_runtime_env(resolve_runtime_env(data.get("runtime_env"), p.absolute().parent), runtime_env or {})
    if env:
        data["runtime_env"] = env
    spec = parse_experiment(data, source=str(p))
    spec.raw["smoke"] = smoke_block
    return spec


def absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the local paths of a spec absolute: its ``task`` section's (`PATH_KEYS`),
    ``model.hf.path`` and each arm's ``controller_file``.

    Args:
        data: the loaded spec (smoke and overrides applied).
        base: the folder relative paths are taken from (the command's working folder).
    Returns:
        A copy of ``data`` whose path values are absolute; values of other types are left
        for validation to reject with its own message.
    """
    out = copy.deepcopy(data)
    for arm in out.get("arms") if isinstance(out.get("arms"), list) else []:
        if isinstance(arm, dict) and isinstance(arm.get("controller_file"), str) and arm["controller_file"]:
            arm["controller_file"] = _absolute(arm["controller_file"], base)  # arms[i].controller_file
    hf = out["model"].get("hf") if isinstance(out.get("model"), dict) else None
    if isinstance(hf, dict) and isinstance(hf.get("path"), str) and hf["path"]:
        hf["path"] = _absolute(hf["path"], base)  # model.hf.path, a local model folder
    task = out.get("task")
    if not isinstance(task, dict):
        return out
    for key, kind in PATH_KEYS.items():
        value = task.get(key)
        if kind == "one" and isinstance(value, str) and value:
            task[key] = _absolute(value, base)
        elif kind == "list" and isinstance(value, list):
            task[key] = [_absolute(v, base) if isinstance(v, str) and v else v for v in value]
    return out


def _absolute(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).absolute())


def apply_smoke(data: dict[str, Any], smoke: dict[str, Any]) -> dict[str, Any]:
    """Apply the smoke block: dotted keys; ``search.*`` keys apply to every arm's search."""
    out = copy.deepcopy(data)
    for key, value in smoke.items():
        if key.startswith("search."):
            sub = key[len("search."):]
            arms = out.get("arms")
            targets = [a.get("search") for a in (arms if isinstance(arms, list) else [])
                       if isinstance(a, dict) and isinstance(a.get("search"), dict)]
            if isinstance(out.get("search"), dict):
                targets.append(out["search"])
            for t in targets:
                set_dotted(t, sub, value)
        else:
            set_dotted(out, key, value)
    return out


def check_extras(spec: ExperimentSpec) -> None:
    """Raise `ConfigError` naming the pip extra when a searcher, scheduler, engine or task
    of ``spec`` needs a package that is not installed (probed without importing it)."""
    needs = []
    for arm in spec.arms:
        if arm.search is not None:
            if arm.search.searcher == "hyperopt":
                needs.append("search.searcher='hyperopt'")
            if arm.search.scheduler.name == "pb2":
                needs.append("search.scheduler.name='pb2'")
    err = probe(needs, SEARCH_EXTRAS)
    if err is None and spec.arms:
        err = missing_extras(load_run_config(spec.run_config(spec.arms[0], spec.seeds[0])))
    if err is not None:
        raise err
