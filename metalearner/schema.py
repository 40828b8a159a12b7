"""Input validation on pydantic: strict models, safe names and the one-line error.

Every input a user hands the program (spec, ``--config``, ``--set``, flags, files) is
checked once, at the boundary, by a pydantic model; a failure becomes a `ConfigError`
whose message is one line::

    <field>: got <value>, expected <what>

``field`` is the dotted path of the bad value (``arms[0].controller.beta``). Models are
strict (no ``"5"`` for an int, no ``true`` for a number), forbid unknown keys and reject
NaN and infinity. Imports nothing above the controllers; must not import ray, mlflow or
torch.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_EXPECTED = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
MAX_REPR = 80  # longest value repr quoted in a message


# pydantic's wording -> ours
WORDS = (("greater than or equal to", ">="), ("less than or equal to", "<="), ("greater than", ">"),
         ("less than", "<"), ("a valid integer", "an int"), ("a valid number", "a number"),
         ("a valid string", "a string"), ("a valid boolean", "true or false"), ("a valid list", "a list"),
         ("a valid dictionary", "a mapping"))


class ConfigError(ValueError):
    """Bad input: the message is one line naming the field, the value and what was expected."""


def _safe_name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(f"expected {NAME_EXPECTED}")
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]
"""A name that is safe as a file name, a Ray trial folder and an MLflow name."""


def check_name(value: Any, field: str) -> str:
    """Raise `ConfigError` unless ``value`` is a `SafeName`; returns it."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ConfigError(f"{field}: got {short(value)}, expected {NAME_EXPECTED}")
    return value


# ---------------------------------------------------------------- messages


def short(value: Any) -> str:
    """``repr(value)`` on one line, cut to `MAX_REPR` characters."""
    text = repr(value)
    return text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "..."


def dotted(prefix: str, loc: tuple[Any, ...]) -> str:
    """``("arms", 0, "name")`` -> ``arms[0].name`` (after ``prefix``, e.g. ``"train."``)."""
    out = prefix.rstrip(".")
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _fields_at(model: Any, loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the (nested) model at ``loc``, for "expected one of"."""
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = model.model_fields.get(part)
        if info is None:
            return None
        model = _unwrap_model(info.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return None


def _unwrap_model(tp: Any) -> Any:
    for arg in (tp, *typing.get_args(tp)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return tp


def one_line(err: ValidationError, prefix: str = "", model: Any = None) -> ConfigError:
    """The first error of ``err`` as a one-line `ConfigError` naming the field."""
    e = err.errors(include_url=False)[0]
    loc = tuple(e["loc"])
    field = dotted(prefix, loc) or prefix.rstrip(".") or "input"
    kind, msg = e["type"], e["msg"]
    if kind == "extra_forbidden":
        names = _fields_at(model, loc[:-1]) if model is not None else None
        return ConfigError(f"{field}: unknown key; expected one of {names}" if names else f"{field}: unknown key")
    if kind == "missing":
        return ConfigError(f"{field}: missing, expected a value")
    if kind == "invalid_key":
        where = dotted(prefix, loc[:-1]) or "input"
        return ConfigError(f"{where}: got key {short(e['input'])}, expected a string key")
    if kind in ("too_short", "too_long"):
        ctx = e.get("ctx", {})
        n = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return ConfigError(f"{field}: got {short(e.get('input'))}, expected {'at least' if kind == 'too_short' else 'at most'} "
                           f"{n} item{'s' if n != 1 else ''}")
    if kind == "dict_type":
        return ConfigError(f"{field}: got {short(e.get('input'))}, expected a mapping")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif msg.startswith("Input should be "):
        msg = "expected " + msg[len("Input should be "):]
    elif msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, "):]
    else:
        msg = "expected " + msg[0].lower() + msg[1:]
    for long, plain in WORDS:
        msg = msg.replace(long, plain)
    if msg.startswith("got "):
        return ConfigError(f"{field}: {msg}")
    return ConfigError(f"{field}: got {short(e.get('input'))}, {msg}")


def validate(model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    """``model.model_validate(data)``, failing with a one-line `ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'input'}: got {short(data)}, expected a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise one_line(err, prefix, model) from None


# ---------------------------------------------------------------- dataclasses


def checker(cls: type, limits: dict[str, Any] | None = None) -> type[BaseModel]:
    """A strict pydantic model with the fields of dataclass ``cls`` (``Annotated``
    constraints kept), plus ``limits``: extra constraints per field (``Field(le=...)``)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    extra = limits or {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in extra:
            tp = Annotated[tp, extra[f.name]]
        if f.default is not dataclasses.MISSING:
            fields[f.name] = (tp, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (tp, Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (tp, ...)
    return create_model(f"{cls.__name__}Input", __config__=STRICT, **fields)


def _comma_lists(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``--set task.files=a.txt,b.txt`` gives a string where a list is declared: split it."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        if isinstance(value, str) and typing.get_origin(hints.get(key)) is list:
            out[key] = [v.strip() for v in value.split(",") if v.strip()]
    return out


@functools.cache
def _default_checker(cls: type) -> type[BaseModel]:
    return checker(cls)


def load_dataclass(cls: type, data: Any, prefix: str, model: type[BaseModel] | None = None) -> Any:
    """Build dataclass ``cls`` from ``data`` through its strict pydantic checker, then
    run its ``validate()`` (cross-field rules) if it has one. Every failure is a one-line
    `ConfigError` whose field starts with ``prefix``. ``model``: a `checker` with
    extra limits (default: the plain one of ``cls``)."""
    model = model or _default_checker(cls)
    if isinstance(data, dict):
        data = _comma_lists(cls, data)
    checked = validate(model, data, prefix)
    obj = cls(**{f.name: getattr(checked, f.name) for f in dataclasses.fields(cls)})
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as e:
            raise ConfigError(prefix + str(e)) from None
    return obj
