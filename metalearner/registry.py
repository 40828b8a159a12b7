"""Controller names to controllers: the built-in policies and plugins, built by name.

``controller.name`` is a built-in name (`metalearner.controllers.CONTROLLERS`), an import
path ``module:Class`` (``my_pkg.policies:GrowOnPlateau``), or the name of an entry point
in the group ``metalearner.controllers`` of an installed package::

    [project.entry-points."metalearner.controllers"]
    grow_on_plateau = "my_pkg.policies:GrowOnPlateau"

`controller_class` resolves a name to its class, the one entry shape (a class with a
``PARAMS`` table) for built-ins and plugins alike; a plugin is imported and checked
(`load_plugin`) the first time it is named, then kept in `PLUGINS`. `controller_params`
and `build_controller` work on that entry, so validation, search spaces, PBT bounds,
export and compare treat a plugin as a built-in policy. A plugin must be a class with
every member of the `Controller` protocol and a ``PARAMS`` table of
`metalearner.controllers.Param` whose defaults pass their own checks. Every refusal is a
``ValueError`` whose message starts ``name: got ...`` (the config layer prefixes
``controller.``).

Must not import ray, mlflow or torch (a plugin module may).
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import Any

from metalearner.controllers import (
    BOUND_PARAMS,
    CONTROLLERS,
    REQUIRED,
    Controller,
    Param,
    check_setting,
    resolve_settings,
)
from metalearner.knobs import Knobs
from metalearner.schema import short

ENTRY_POINT_GROUP = "metalearner.controllers"
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
IMPORT_PATH = re.compile(rf"({_DOTTED}):({_DOTTED})")
# what the train loop and the sweep use of a policy (the `Controller` protocol, plus its table)
MEMBERS = ("name", "PARAMS", "knobs", "loss_ewma", "observe", "settings", "state_dict", "load_state_dict")
METHODS = ("observe", "settings", "state_dict", "load_state_dict")
KNOWN = (f"one of {sorted(CONTROLLERS)}, an import path module:Class, or an entry point in the group "
         f"'{ENTRY_POINT_GROUP}'")


PLUGINS: dict[str, type] = {}  # plugin name -> its class, once loaded and checked


def controller_class(name: Any) -> Any:
    """The class ``name`` names: a built-in policy, or a plugin (loaded and checked the
    first time, see `load_plugin`).

    Raises:
        ValueError: ``"name: got ..., ..."``: unknown, not importable, or not a policy.
    """
    if not isinstance(name, str):
        raise ValueError(f"name: got {short(name)}, expected {KNOWN}")
    if name in CONTROLLERS:
        return CONTROLLERS[name]
    if name not in PLUGINS:
        PLUGINS[name] = load_plugin(name)
    return PLUGINS[name]


def controller_params(name: str) -> list[str]:
    """The settings the controller ``name`` accepts (its ``PARAMS``, then the bounds)."""
    return [*getattr(controller_class(name), "PARAMS", {}), *BOUND_PARAMS]


def build_controller(name: str, *, init: Knobs, **settings: Any) -> Controller:
    """Build the controller ``name`` names (a built-in name or a plugin); its settings are
    checked against its ``PARAMS`` and the bounds and completed with their defaults
    before its constructor sees them.

    Raises:
        ValueError: unknown name (the message lists the known ones) or an invalid setting
            (the message names it, the value and the allowed range).
    """
    cls = controller_class(name)
    resolved = resolve_settings(name, {**getattr(cls, "PARAMS", {}), **BOUND_PARAMS}, settings)
    if name in CONTROLLERS:
        return cls(init=init, **resolved)
    try:
        return cls(init=init, **resolved)
    except Exception as e:  # noqa: BLE001 - a plugin's own failure, named in one line
        raise ValueError(f"name: got {short(name)}, whose constructor raised {_first_line(e)}") from None


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the shape ``module.path:Attr``."""
    return bool(IMPORT_PATH.fullmatch(name))


def default_arm_name(name: str) -> str:
    """The arm name a spec gets for a controller it does not name: the class of an import
    path (``my_pkg.policies:GrowOnPlateau`` -> ``GrowOnPlateau``), else the name itself."""
    m = IMPORT_PATH.fullmatch(name)
    return m.group(2).rsplit(".", 1)[-1] if m else name


def load_plugin(name: str) -> type:
    """Import the plugin ``name`` names and check it (see the module docstring).

    Args:
        name: an import path ``module:Class`` or an entry point name.
    Returns:
        The policy class.
    Raises:
        ValueError: one line naming ``name``: unknown, an import that fails (with the
            error), not a class, a missing protocol member, or a bad ``PARAMS`` table.
    """
    m = IMPORT_PATH.fullmatch(name)
    if m:
        module, attr = m.groups()
        importlib.invalidate_caches()  # a module written since the last import is found
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as e:  # noqa: BLE001 - whatever the plugin's import raises, in one line
            raise ValueError(f"name: got {short(name)}, which cannot be imported ({_first_line(e)}); expected an "
                             "importable module:Class (on PYTHONPATH, installed, or shipped with "
                             "runtime_env.py_modules / working_dir)") from None
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise ValueError(f"name: got {short(name)}, expected {KNOWN}")
        try:
            obj = found[0].load()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"name: got {short(name)}, an entry point for {found[0].value!r} that cannot be imported "
                             f"({_first_line(e)})") from None
    check_plugin(name, obj)
    return obj


def check_plugin(name: str, cls: Any) -> None:
    """Refuse ``cls`` unless it is a class with every protocol member and a valid ``PARAMS``.

    Raises:
        ValueError: one line naming ``name`` and what is wrong.
    """
    if not isinstance(cls, type):
        raise ValueError(f"name: got {short(name)}, which is {type(cls).__name__} {cls!r:.60}, expected a class "
                         "following the Controller protocol")
    missing = [m for m in MEMBERS if not hasattr(cls, m)]
    missing += [m for m in METHODS if m not in missing and not callable(getattr(cls, m))]
    if missing:
        raise ValueError(f"name: got {short(name)}, whose class lacks the Controller member {missing[0]!r}; expected "
                         f"{list(MEMBERS)} (subclass metalearner.controllers.BaseController for all but PARAMS)")
    table = cls.PARAMS
    if not isinstance(table, dict):
        raise ValueError(f"name: got {short(name)}, whose PARAMS is {type(table).__name__}, expected a dict of "
                         "setting name -> metalearner.controllers.Param")
    for key, p in table.items():
        where = f"name: got {short(name)}, whose PARAMS[{key!r}]"
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{where} is not a setting name, expected an identifier")
        if key in BOUND_PARAMS or key == "name":
            raise ValueError(f"{where} redefines {key!r}, expected none of {['name', *BOUND_PARAMS]} "
                             "(every policy takes the bounds)")
        if not isinstance(p, Param):
            raise ValueError(f"{where} is {type(p).__name__}, expected a metalearner.controllers.Param")
        if p.default is not REQUIRED:
            try:
                check_setting(key, p, p.default)
            except ValueError as e:
                raise ValueError(f"{where} has a default that fails its own check ({e})") from None


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
