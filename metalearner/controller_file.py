"""A controller exported by another sweep, read as a fixed arm (``arms[i].controller_file``,
``metalearner sweep SPEC --arm NAME=FILE``): the file, the arm's checks, the flag.

``metalearner compare NAME --export-best FILE`` and a sweep's ``best_ARM.yaml`` write one
mapping, ``{controller: {name: ..., <settings>}}``. This module reads such a file, checks
its shape (not its settings: the spec loader validates them with the run config, so that
an unknown controller or a setting outside its ``PARAMS`` check is reported the same way
as in a spec) and returns the controller with the file's sha256, which the arm's runs
carry as tags (`ControllerFile.tags`) so that a transferred controller can be traced to its
bytes.

Every failure is a one-line `ConfigError` naming the field and the file. Stdlib and
`metalearner.config` only; must not import ray or mlflow.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metalearner.config import ConfigError, read_yaml
from metalearner.schema import check_name, short

# the tags every run of a controller_file arm carries (trainables.callback sets them)
FILE_TAG = "metalearner.controller_file"
SHA256_TAG = "metalearner.controller_sha256"

EXPECTED = "a controller file {controller: {name: ..., <settings>}}, as 'metalearner compare --export-best' writes"


@dataclass(frozen=True)
class ControllerFile:
    """A controller read from a file.

    Args:
        path: the file, absolute.
        controller: ``{"name": ..., <settings>}`` as the file holds it (not yet validated).
        sha256: the hex digest of the file's bytes.
    """

    path: str
    controller: dict[str, Any]
    sha256: str

    def tags(self) -> dict[str, str]:
        """The tags of the arm's runs: where its controller came from."""
        return {FILE_TAG: self.path, SHA256_TAG: self.sha256}


def read_controller_file(path: str, field: str) -> ControllerFile:
    """Read and shape-check a controller file.

    Args:
        path: the file (relative paths are the working folder's; the spec loader makes them absolute).
        field: the input it was given as, for messages (``arms[3].controller_file``).
    Returns:
        The `ControllerFile`; its settings are checked by the caller.
    Raises:
        ConfigError: missing, unreadable, not YAML, or not ``{controller: {name: ...}}``.
    """
    data = read_yaml(path, field)  # missing, unreadable, too large, not UTF-8 or not YAML: one line each
    ctrl = data.get("controller") if isinstance(data, dict) and set(data) == {"controller"} else None
    if not isinstance(ctrl, dict):
        raise ConfigError(f"{field}: got {path!r} holding {short(data)}, expected {EXPECTED}")
    if not isinstance(ctrl.get("name"), str):
        raise ConfigError(f"{field}: got {path!r} whose controller.name is {short(ctrl.get('name'))}, expected the "
                          f"controller's name (a built-in policy or a plugin's module:Class)")
    return ControllerFile(path=str(path), controller=dict(ctrl),
                          sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest())


def parse_arm_flag(item: str) -> tuple[str, str]:
    """``--arm NAME=FILE`` -> (NAME, FILE); raises `ConfigError` naming the flag."""
    name, sep, path = item.partition("=")
    if not sep or not path:
        raise ConfigError(f"--arm: got {item!r}, expected NAME=FILE (an arm name and a controller file, e.g. "
                          "transferred=best.yaml)")
    return check_name(name, "--arm NAME"), path


def arm_source(path: str | None, sha256: str | None, where: str, *, controller: bool,
               search: bool) -> ControllerFile | None:
    """The controller of a spec arm given as ``controller_file`` (a fixed arm).

    Args:
        path: the arm's ``controller_file`` (absolute), or None for an arm given as ``controller``.
        sha256: the arm's ``controller_sha256``: the file must have it (a sweep saves it
            with its spec, so that ``sweep --resume`` refuses a file that changed).
        where: the arm's field prefix (``arms[3]``).
        controller, search: whether the arm also has a ``controller`` / a ``search``.
    Returns:
        The file's controller, or None when ``path`` is None.
    Raises:
        ConfigError: naming the field: both ``controller`` and ``controller_file``, a search
            over a file's controller, a bad file (`read_controller_file`), another sha256.
    """
    if path is None:
        if sha256 is not None:
            raise ConfigError(f"{where}.controller_sha256: got it without controller_file, expected both (the "
                              "sha256 pins the file's content)")
        return None
    if controller:
        raise ConfigError(f"{where}.controller_file: got it with 'controller', expected one of them (the file holds "
                          "the controller)")
    if search:
        raise ConfigError(f"{where}.search: got a search with controller_file, expected none: a controller file is "
                          "a fixed arm, trained as the file says")
    source = read_controller_file(path, f"{where}.controller_file")
    if sha256 is not None and sha256 != source.sha256:
        raise ConfigError(f"{where}.controller_sha256: got {sha256}, but {source.path} now has sha256 "
                          f"{source.sha256}; expected the file the spec was written for (a resumed sweep runs the "
                          "controller it started with)")
    return source


def add_arm_flags(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``metalearner sweep SPEC --arm NAME=FILE``: a copy of the spec ``data`` with one
    fixed arm ``{name: NAME, controller_file: FILE}`` appended per item (a spec without
    ``arms`` gets its single arm made explicit first, under the name it would have had).

    Raises:
        ConfigError: an item that is not NAME=FILE, a name the spec's arms already have,
            or a FILE that is no controller file (named by the flag).
    """
    if not items:
        return data
    out = copy.deepcopy(data)
    if out.get("arms") is None:
        single: dict[str, Any] = {"controller": out.pop("controller", None) or {"name": "ewma"}}
        if out.get("search") is not None:
            single |= {"name": "tuned", "search": out.pop("search")}
        out["arms"] = [single]
    if not isinstance(out["arms"], list):
        return out  # the spec's own validation names the field
    for item in items:
        name, path = parse_arm_flag(item)
        if any(isinstance(a, dict) and a.get("name") == name for a in out["arms"]):
            raise ConfigError(f"--arm: got the name {name!r}, which the spec's arms already have; expected a new "
                              "arm name")
        read_controller_file(path, f"--arm {name}")  # a file that is no controller file is named by the flag
        out["arms"].append({"name": name, "controller_file": path})
    return out
