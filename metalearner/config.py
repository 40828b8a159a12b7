"""The resolved configuration of one training run, its validation and `key=value` overrides.

A run config has four sections — ``task``, ``model``, ``train``, ``controller`` — written as
nested dicts (YAML, ``--set`` overrides, Ray trial configs) and flattened with dots for
MLflow params (``controller.factor``, ``model.d_model``, ...). Every error is a
`ConfigError` whose message is one line naming the field, the value and what was expected.

Must not import ray or mlflow.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from metalearner.controllers import CONTROLLERS, build_controller, controller_params
from metalearner.knobs import Knobs


class ConfigError(ValueError):
    """Bad configuration: the message names the field, the value and what was expected."""


# ---------------------------------------------------------------- sections


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0
    threads: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    engine: Literal["torch", "hf"] = "torch"
    report_every: int = 25
    checkpoint_every: int = 0
    max_nonfinite: int = 10  # consecutive non-finite steps (skipped) that end the run as diverged

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "eval_every", "eval_batches", "report_every",
                  "max_nonfinite")
        _nonneg(self, "warmup_steps", "weight_decay", "grad_clip", "threads", "checkpoint_every", "seed")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: got {self.lr!r}, expected a float > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: got {self.min_lr_ratio!r}, expected a float in [0, 1]")


@dataclass
class ModelSection:
    """``model.preset`` plus any `ModelConfig` field as an override."""

    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    task: Any
    model: ModelSection
    train: TrainConfig
    controller: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The nested dict form (round-trips through `RunConfig.from_dict`)."""
        return {
            "task": dataclasses.asdict(self.task),
            "model": {"preset": self.model.preset, **self.model.overrides},
            "train": dataclasses.asdict(self.train),
            "controller": dict(self.controller),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return load_run_config(data)

    def controller_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.controller.items() if k != "name"}


# ---------------------------------------------------------------- loading


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ConfigError(f"{n}: got {v!r}, expected a value > 0")


def _nonneg(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v < 0:
            raise ConfigError(f"{n}: got {v!r}, expected a value >= 0")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an int", float: "a float", str: "a string", bool: "true/false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, Literal,
    Optional, list); ints pass as floats, a comma-separated string passes as a list."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{name}: got {value!r}, expected {_type_name(tp)}")
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(arg, value, name)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        (arg,) = typing.get_args(tp)
        return [coerce(arg, v, name) for v in value]
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    return value


def load_dataclass(cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError
    named ``prefix + key``. Runs ``validate()`` (if any), prefixing its field names."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: got {data!r}, expected a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of {sorted(names)}")
    kwargs = {k: coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None
    except ValueError as e:
        raise ConfigError(prefix + str(e)) from None
    return obj


def _load_task(data: dict[str, Any]) -> Any:
    from metalearner.tasks import TASKS

    data = dict(data or {})
    name = data.get("name", "text")
    if name not in TASKS:
        raise ConfigError(f"task.name: got {name!r}, expected one of {sorted(TASKS)}")
    return load_dataclass(TASKS[name].config_cls, data, "task.")


def _load_model(data: dict[str, Any]) -> ModelSection:
    from metalearner.model import PRESETS, ModelConfig

    data = dict(data or {})
    preset = data.pop("preset", "small")
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: got {preset!r}, expected one of {sorted(PRESETS)}")
    hints = typing.get_type_hints(ModelConfig)
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"model.{key}: unknown key; expected one of {sorted(['preset', *hints])}")
        data[key] = coerce(hints[key], value, "model." + key)
    try:
        PRESETS[preset](**data).validate()
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    return ModelSection(preset=preset, overrides=data)


def _load_controller(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data or {})
    name = data.get("name", "ewma")
    if name not in CONTROLLERS:
        raise ConfigError(f"controller.name: got {name!r}, expected one of {sorted(CONTROLLERS)}")
    settings = {k: v for k, v in data.items() if k != "name"}
    try:
        build_controller(name, init=Knobs(rope_base=10_000.0, window=1), **settings)
    except ValueError as e:
        raise ConfigError(f"controller.{e}") from None
    return {"name": name, **settings}


SECTIONS = ("task", "model", "train", "controller")


def load_run_config(data: dict[str, Any]) -> RunConfig:
    """Validate a nested config dict into a `RunConfig` (raises `ConfigError`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: got {type(data).__name__}, expected a mapping")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section; expected one of {list(SECTIONS)}")
    cfg = RunConfig(
        task=_load_task(data.get("task")),
        model=_load_model(data.get("model")),
        train=load_dataclass(TrainConfig, data.get("train"), "train."),
        controller=_load_controller(data.get("controller")),
    )
    if hasattr(cfg.task, "check_files"):
        try:
            cfg.task.check_files()
        except ValueError as e:
            raise ConfigError(f"task.{e}") from None
    return cfg


# ---------------------------------------------------------------- overrides and flattening


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.steps=100"`` -> ``("train.steps", 100)``; values parse as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"--set: got {item!r}, expected key=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set: got {item!r}, expected key=value (e.g. train.steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"`` (creating mappings on the way)."""
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: got {nxt!r}, cannot set {key} inside it")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``key=value`` of ``items`` applied."""
    out = copy.deepcopy(data)
    for item in items or []:
        key, value = parse_override(item)
        set_dotted(out, key, value)
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two nested config dicts.

    A key present in only one of them counts as differing. Used to refuse a resume whose
    config is not the one the run (or sweep) started with.

    Args:
        old: the config that was saved (e.g. in a checkpoint).
        new: the config of the current invocation.

    Returns:
        The differing keys, in the order of ``old`` (then keys only ``new`` has).
    """
    a, b = flatten(old), flatten(new)
    return [k for k in a if k not in b or a[k] != b[k]] + [k for k in b if k not in a]


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        set_dotted(out, k, v)
    return out


def controller_keys(name: str) -> list[str]:
    return ["name", *controller_params(name)]
