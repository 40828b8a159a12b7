"""Ray's ``runtime_env`` of a sweep: the code (a controller plugin) every worker must import.

A spec may ship code with it::

    runtime_env:
      py_modules: [plugins/grow_on_plateau.py]   # package folders, .py modules or .whl files
      working_dir: .                             # optional: a folder that becomes each worker's code root

Local paths in a spec are taken relative to the *spec file's folder* (the code travels
with the spec; ``--set runtime_env...`` values too), those of the CLI flags
``--py-modules`` / ``--working-dir`` relative to the working folder; both are made
absolute when the spec is loaded, so the saved spec (and ``sweep --resume``) keeps them.
URIs (``s3://...zip``, ``gs://``, ``https://``) go to Ray unchanged. The sweep passes the
result to ``ray.init(runtime_env=...)``; on the driver, `importable` puts the same code on
``sys.path`` while the spec is validated and the sweep runs (a URI is the user's to make
importable on the driver too: install it or put it on PYTHONPATH).

Must not import ray, mlflow or torch.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field

from metalearner.schema import STRICT, ConfigError, short, validate

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
MODULE_SUFFIXES = (".py", ".whl")


class RuntimeEnvInput(BaseModel):
    """The ``runtime_env`` keys a spec may set (Ray's names and meanings)."""

    model_config = STRICT
    py_modules: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=100)] | None = None
    working_dir: Annotated[str, Field(min_length=1)] | None = None
    excludes: Annotated[list[str], Field(max_length=1000)] | None = None


def resolve_runtime_env(data: Any, base: Path, field: str = "runtime_env") -> dict[str, Any]:
    """Check a ``runtime_env`` mapping and make its local paths absolute.

    Args:
        data: the mapping (None: no runtime_env).
        base: the folder relative paths are taken from.
        field: the field named in messages.
    Returns:
        Ray's ``runtime_env`` dict with the keys given (empty when none).
    Raises:
        ConfigError: unknown key, wrong type, or a local path that is not an existing
            folder (``working_dir``) or folder / ``.py`` / ``.whl`` file (``py_modules``).
    """
    if data is None:
        return {}
    env = validate(RuntimeEnvInput, data, f"{field}.")
    out: dict[str, Any] = {}
    if env.working_dir is not None:
        out["working_dir"] = local_path(env.working_dir, base, f"{field}.working_dir", modules=False)
    if env.py_modules is not None:
        out["py_modules"] = [local_path(v, base, f"{field}.py_modules[{i}]", modules=True)
                             for i, v in enumerate(env.py_modules)]
    if env.excludes is not None:
        out["excludes"] = list(env.excludes)
    return out


def local_path(value: str, base: Path, field: str, modules: bool) -> str:
    """``value`` as an absolute path (a URI unchanged).

    Args:
        value: a path or a URI.
        base: the folder a relative path is taken from.
        field: the field (or flag) named in the message.
        modules: a ``py_modules`` entry (a folder, ``.py`` or ``.whl`` file), else a folder.
    Raises:
        ConfigError: the path is not of that kind.
    """
    if URI.match(value):
        return value
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    ok = p.is_dir() or (modules and p.is_file() and p.suffix in MODULE_SUFFIXES)
    if not ok:
        what = ("an existing package folder, .py module or .whl file" if modules else "an existing folder")
        raise ConfigError(f"{field}: got {short(value)} ({p.absolute()}), expected {what} or a URI")
    return str(p.absolute())


def flag_runtime_env(py_modules: list[str] | None, working_dir: str | None) -> dict[str, Any]:
    """The runtime_env of the CLI flags ``--py-modules`` (repeatable) and ``--working-dir``,
    relative to the working folder; errors name the flag."""
    out: dict[str, Any] = {}
    if working_dir:
        out["working_dir"] = local_path(working_dir, Path.cwd(), "--working-dir", modules=False)
    if py_modules:
        out["py_modules"] = [local_path(v, Path.cwd(), "--py-modules", modules=True) for v in py_modules]
    return out


def merge_runtime_env(spec: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The spec's runtime_env with the CLI's added: ``py_modules`` appended (each once),
    ``working_dir`` replaced, ``excludes`` appended.

    Args:
        spec: the spec's resolved runtime_env.
        flags: the CLI's resolved runtime_env.
    Returns:
        A new dict.
    """
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in spec.items()}
    for key, value in flags.items():
        if isinstance(value, list):
            out[key] = out.get(key, []) + [v for v in value if v not in out.get(key, [])]
        else:
            out[key] = value
    return out


def driver_paths(runtime_env: dict[str, Any]) -> list[str]:
    """The ``sys.path`` entries that let this process import what ``runtime_env`` ships:
    the ``working_dir``, the folder holding each local package or ``.py`` module, and each
    ``.whl`` itself (URIs are left out)."""
    paths = []
    if runtime_env.get("working_dir") and not URI.match(runtime_env["working_dir"]):
        paths.append(runtime_env["working_dir"])
    for module in runtime_env.get("py_modules") or []:
        if URI.match(module):
            continue
        paths.append(module if module.endswith(".whl") else str(Path(module).parent))
    return list(dict.fromkeys(paths))


@contextmanager
def importable(paths: list[str]) -> Iterator[None]:
    """While the block runs, ``paths`` lead ``sys.path`` (as on the workers, where Ray puts
    them first); afterwards exactly the entries added here are removed again."""
    added = [p for p in paths if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
