"""Experiment specs (``experiments/*.yaml``): parsed and validated before Ray starts.

A spec names a base run config (``task``, ``model``, ``train``, ``controller``), the
``arms`` to compare (each a controller, optionally tuned by a ``search``), the ``seeds``,
``resources`` and a ``smoke`` block of dotted overrides that ``--smoke-test`` applies.
Without ``arms``, the top-level ``controller`` (+ ``search``) is the single arm.

Search-space domains map one to one onto Ray Tune's (``grid``, ``choice``, ``uniform``,
``loguniform``, ``randint``); the mapping itself lives in `trainables` (only it imports
ray). Every error is a `ConfigError`: one line naming the field. Must not import ray.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metalearner.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_dataclass,
    load_run_config,
    set_dotted,
)

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCHERS = ("random", "optuna", "hyperopt")
SCHEDULERS = ("fifo", "asha", "pbt", "pb2")
TOP_KEYS = ("name", "description", "task", "model", "train", "controller", "search", "arms", "seeds",
            "resources", "metric", "mode", "stop", "smoke", "seed")


@dataclass
class Resources:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0 = as many as the resources allow

    def validate(self) -> None:
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"cpus_per_trial: got {self.cpus_per_trial!r}, expected a number > 0")
        if self.gpus_per_trial < 0:
            raise ConfigError(f"gpus_per_trial: got {self.gpus_per_trial!r}, expected a number >= 0")
        if self.max_concurrent < 0:
            raise ConfigError(f"max_concurrent: got {self.max_concurrent!r}, expected an int >= 0")


@dataclass
class Scheduler:
    name: str = "fifo"
    grace_period: int = 0  # asha: steps before the first cut (0 = two reports)
    reduction_factor: float = 2.0  # asha
    perturbation_interval: int = 0  # pbt/pb2: steps between perturbations (0 = 4 reports)
    quantile_fraction: float = 0.25  # pbt/pb2
    resample_probability: float = 0.25  # pbt
    synch: bool = True  # pbt: perturb all trials at the same step

    def validate(self) -> None:
        if self.name not in SCHEDULERS:
            raise ConfigError(f"name: got {self.name!r}, expected one of {list(SCHEDULERS)}")
        if self.grace_period < 0 or self.perturbation_interval < 0:
            raise ConfigError("grace_period/perturbation_interval: expected an int >= 0")
        if self.reduction_factor <= 1:
            raise ConfigError(f"reduction_factor: got {self.reduction_factor!r}, expected > 1")
        if not 0 < self.quantile_fraction <= 0.5:
            raise ConfigError(f"quantile_fraction: got {self.quantile_fraction!r}, expected in (0, 0.5]")
        if not 0 <= self.resample_probability <= 1:
            raise ConfigError(f"resample_probability: got {self.resample_probability!r}, expected in [0, 1]")


@dataclass
class Search:
    space: dict[str, Any] = field(default_factory=dict)
    searcher: str = "random"
    scheduler: Scheduler = field(default_factory=Scheduler)
    num_samples: int = 4
    seed: int = 1000  # the tuning seed: kept apart from the comparison seeds
    confirm: bool = True  # re-train the best configuration on every comparison seed

    @property
    def population_based(self) -> bool:
        return self.scheduler.name in ("pbt", "pb2")


@dataclass
class Arm:
    name: str
    controller: dict[str, Any]
    search: Search | None = None


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
    time_budget_s: float = 0.0
    seed: int = 0
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def run_config(self, arm: Arm, seed: int, controller: dict[str, Any] | None = None) -> dict[str, Any]:
        """The nested run config of one cell (arm x seed) without search domains."""
        cfg = copy.deepcopy(self.base)
        cfg["controller"] = copy.deepcopy(controller if controller is not None else arm.controller)
        cfg.setdefault("train", {})["seed"] = seed
        return cfg


# ---------------------------------------------------------------- parsing


def _domain(key: str, spec: Any) -> None:
    """Validate one search-space entry ``{kind: args}``."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"search.space.{key}: got {spec!r}, expected one of {{{', '.join(DOMAINS)}: ...}}")
    (kind, args), = spec.items()
    where = f"search.space.{key}.{kind}"
    if kind not in DOMAINS:
        raise ConfigError(f"search.space.{key}: got domain {kind!r}, expected one of {list(DOMAINS)}")
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: got {args!r}, expected a non-empty list of values")
        values = args
    else:
        if (not isinstance(args, list) or len(args) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
            raise ConfigError(f"{where}: got {args!r}, expected [low, high]")
        lo, hi = args
        if not lo < hi:
            raise ConfigError(f"{where}: got [{lo}, {hi}], expected low < high (an empty or reversed range)")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: got [{lo}, {hi}], expected low > 0 for a log scale")
        if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise ConfigError(f"{where}: got [{lo}, {hi}], expected integer bounds")
        values = [lo, hi] if kind != "randint" else [lo, hi - 1]
    # the values a domain can yield must make valid controller settings
    name = key.split(".")[-1]
    if not key.startswith("controller."):
        return
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if name in ("factor", "base_factor", "window_factor") and any(v <= 1 for v in nums):
        raise ConfigError(f"{where}: got {args!r} for {key}, expected values above 1 (a factor must be > 1)")
    if name == "beta" and any(not 0 <= v < 1 for v in nums):
        if not (kind == "uniform" and 0 <= values[0] and values[1] <= 1):
            raise ConfigError(f"{where}: got {args!r} for {key}, expected values in [0, 1)")
    if name == "threshold" and any(v < 0 for v in nums):
        raise ConfigError(f"{where}: got {args!r} for {key}, expected values >= 0")


def sample_point(space: dict[str, Any]) -> dict[str, Any]:
    """A representative point of the space (the low end), to validate the configs it yields."""
    out = {}
    for key, spec in space.items():
        (kind, args), = spec.items()
        if kind in ("grid", "choice"):
            out[key] = args[0]
        elif kind == "randint":
            out[key] = int(args[0])
        else:
            lo, hi = args
            out[key] = math.sqrt(lo * hi) if kind == "loguniform" else (lo + hi) / 2
    return out


def _load_search(data: Any, where: str) -> Search:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: got {data!r}, expected a mapping")
    data = dict(data)
    sched = data.pop("scheduler", {"name": "fifo"})
    if isinstance(sched, str):
        sched = {"name": sched}
    scheduler = load_dataclass(Scheduler, sched, f"{where}.scheduler.")
    search = load_dataclass(Search, data, f"{where}.")
    search.scheduler = scheduler
    if search.searcher not in SEARCHERS:
        raise ConfigError(f"{where}.searcher: got {search.searcher!r}, expected one of {list(SEARCHERS)}")
    if search.num_samples < 1:
        raise ConfigError(f"{where}.num_samples: got {search.num_samples}, expected an int >= 1")
    if not search.space:
        raise ConfigError(f"{where}.space: got an empty space, expected at least one key to tune")
    for key, spec in search.space.items():
        _domain(key, spec)
        if not key.startswith(("controller.", "train.", "model.")):
            raise ConfigError(f"{where}.space.{key}: expected a key under controller., train. or model.")
    if search.population_based:
        if search.searcher != "random":
            raise ConfigError(
                f"{where}.searcher: got {search.searcher!r} with scheduler {scheduler.name!r}, expected "
                "'random' (Ray cannot combine a search algorithm with PBT/PB2)"
            )
        if any(next(iter(s)) == "grid" for s in search.space.values()):
            raise ConfigError(f"{where}.space: 'grid' cannot be mutated by {scheduler.name}; use choice/uniform")
        if scheduler.name == "pb2" and any(next(iter(s)) not in ("uniform", "loguniform", "randint")
                                           for s in search.space.values()):
            raise ConfigError(f"{where}.space: pb2 needs continuous ranges (uniform/loguniform/randint)")
    if search.searcher in ("optuna", "hyperopt") and any(next(iter(s)) == "grid" for s in search.space.values()):
        raise ConfigError(f"{where}.space: 'grid' works with searcher 'random' only; use choice")
    return search


def parse_experiment(data: Any, source: str = "<spec>") -> ExperimentSpec:
    """Validate a loaded YAML spec (overrides already applied)."""
    if not isinstance(data, dict):
        raise ConfigError(f"experiment: got {type(data).__name__}, expected a mapping")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{key}: unknown key; expected one of {sorted(TOP_KEYS)}")
    name = data.get("name") or Path(source).stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name: got {name!r}, expected letters, digits, '-' or '_'")
    base = {k: copy.deepcopy(data[k]) for k in ("task", "model", "train") if k in data}
    resources = load_dataclass(Resources, data.get("resources"), "resources.")
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"seeds: got {seeds!r}, expected a non-empty list of ints >= 0 (or a count)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: got {seeds!r}, expected distinct seeds")
    metric, mode = data.get("metric", "val_loss"), data.get("mode", "min")
    if mode not in ("min", "max"):
        raise ConfigError(f"mode: got {mode!r}, expected 'min' or 'max'")
    stop = data.get("stop") or {}
    if not isinstance(stop, dict) or set(stop) - {"time_budget_s"}:
        raise ConfigError(f"stop: got {stop!r}, expected a mapping with time_budget_s")
    budget = stop.get("time_budget_s", 0)
    if not isinstance(budget, (int, float)) or budget < 0:
        raise ConfigError(f"stop.time_budget_s: got {budget!r}, expected seconds >= 0")

    arms_raw = data.get("arms")
    implicit = arms_raw is None  # the top-level controller (+ search) is the single arm
    if arms_raw is None:
        ctrl = data.get("controller") or {"name": "ewma"}
        arms_raw = [{"name": (ctrl or {}).get("name", "ewma") if "search" not in data else "tuned",
                     "controller": ctrl, **({"search": data["search"]} if "search" in data else {})}]
    elif "search" in data:
        raise ConfigError("search: with 'arms', put each search inside its arm")
    if not isinstance(arms_raw, list) or not arms_raw:
        raise ConfigError(f"arms: got {arms_raw!r}, expected a non-empty list")
    default_ctrl = data.get("controller") or {"name": "ewma"}
    arms: list[Arm] = []
    for i, a in enumerate(arms_raw):
        where = "" if implicit else f"arms[{i}]"
        if not isinstance(a, dict) or set(a) - {"name", "controller", "search"}:
            raise ConfigError(f"{where}: got {a!r}, expected a mapping with name, controller, search")
        ctrl = dict(a.get("controller") or default_ctrl)
        arm_name = a.get("name") or ctrl.get("name", "ewma")
        if any(arm_name == b.name for b in arms):
            raise ConfigError(f"{where}.name: got {arm_name!r} twice, expected distinct arm names")
        search = _load_search(a["search"], f"{where}.search".lstrip(".")) if "search" in a else None
        arm = Arm(name=str(arm_name), controller=ctrl, search=search)
        # validate the configs this arm yields (with a representative point of its space)
        cfg = {**copy.deepcopy(base), "controller": copy.deepcopy(ctrl)}
        if search:
            for key, value in sample_point(search.space).items():
                set_dotted(cfg, key, value)
        try:
            load_run_config(cfg)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if not (where and msg.startswith("controller.")) else f"{where}.{msg}") from None
        arms.append(arm)
    spec = ExperimentSpec(name=name, description=str(data.get("description", "")), base=base, arms=arms,
                          seeds=seeds, resources=resources, metric=metric, mode=mode,
                          time_budget_s=float(budget), seed=int(data.get("seed", 0)), source=source,
                          raw=copy.deepcopy(data))
    return spec


def load_experiment(path: str | Path, overrides: list[str] | None = None, smoke: bool = False) -> ExperimentSpec:
    """Read, apply ``smoke`` and ``--set`` overrides, validate. Raises `ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment: got {str(path)!r}, expected an existing YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"experiment: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"experiment: {path} holds {type(data).__name__}, expected a mapping")
    smoke_block = data.pop("smoke", None)
    if smoke_block is None:
        smoke_block = {}
    if not isinstance(smoke_block, dict):
        raise ConfigError(f"smoke: got {smoke_block!r}, expected a mapping of dotted overrides")
    if smoke:
        data = apply_smoke(data, smoke_block)
    data = apply_overrides(data, overrides or [])
    spec = parse_experiment(data, source=str(p))
    spec.raw["smoke"] = smoke_block
    return spec


def apply_smoke(data: dict[str, Any], smoke: dict[str, Any]) -> dict[str, Any]:
    """Apply the smoke block: dotted keys; ``search.*`` keys apply to every arm's search."""
    out = copy.deepcopy(data)
    for key, value in smoke.items():
        if key.startswith("search."):
            sub = key[len("search."):]
            targets = [a.get("search") for a in out.get("arms", []) if isinstance(a, dict) and a.get("search")]
            if "search" in out:
                targets.append(out["search"])
            for t in targets:
                set_dotted(t, sub, value)
        else:
            set_dotted(out, key, value)
    return out


def validate_cell(cfg: dict[str, Any]) -> RunConfig:
    return load_run_config(cfg)
