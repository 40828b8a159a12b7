"""Checkpoint files: reading them safely, and refusing one that belongs to another run.

A checkpoint of the PyTorch engine is ``checkpoint.pt`` (written by
`metalearner.train.TrainingRun.save`); one of the Hugging Face engine also holds
``run_state.json`` (config and non-finite counters, `metalearner.train.save_run_state`).
A ``checkpoint.pt`` holds only tensors and plain Python values and is read with
``torch.load(weights_only=True)``: a file that holds anything else is refused without
being unpickled. A file that cannot be read raises `CheckpointError`; a resume that must
continue the same run refuses a checkpoint whose config differs from the current one in
any field but ``train.steps`` (`check_same_config`; a field added since the checkpoint was
written counts as its default). Imports neither the engines nor the tracking layer.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from metalearner.config import ConfigError, RunConfig, config_diff, flatten, load_run_config

CHECKPOINT_FILE = "checkpoint.pt"
RUN_STATE_FILE = "run_state.json"  # in an hf engine checkpoint: config + non-finite counters
CHECKPOINT_KEYS = ("step", "model", "optimizer", "controller", "rng", "config")
# `train --resume` continues a run to a new ``train.steps`` (its LR schedule follows the
# new length from there on); every other field must be the checkpoint's
RESUME_MAY_CHANGE = ("train.steps",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, holding more than tensors
    and plain values, or not written by `TrainingRun.save`. The message is one line."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first sentence of an error's message (its type when it has none), for one-line errors."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text or type(e).__name__


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `TrainingRun.save`, safely.

    ``torch.load(weights_only=True)``: only tensors and plain Python values are rebuilt, so
    a file from shared storage can never run code while it is read.

    Args:
        path: the ``checkpoint.pt`` file.
        device: where the tensors go.

    Returns:
        The state dict (`TrainingRun.state_dict`).

    Raises:
        CheckpointError: the file is missing, unreadable (truncated, not a torch file),
            holds other objects than tensors and plain values, or lacks a section.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected a checkpoint written by metalearner")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only's unpickler stopped before running anything
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain values "
                                  f"({found.group(1)}); nothing in it was run") from None
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        reason = detail.group(1).split(". ")[0] if detail else first_line(e)
        raise CheckpointError(f"{path}: refused, not a plain-data checkpoint ({reason}); nothing in it was run; "
                              "expected a checkpoint written by metalearner") from None
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is not a checkpoint
        reason = f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else f"{type(e).__name__}, empty or cut short"
        raise CheckpointError(f"{path}: unreadable ({reason}); expected a "
                              "checkpoint written by metalearner") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}; expected a checkpoint written by metalearner")
    return state


def check_same_config(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse to continue a run with a config other than the one it started with.

    The saved config is compared as this version resolves it (`resolved_config`), so a
    field added since the checkpoint was written counts as its default, not as a change.

    Args:
        saved: the config stored with the run (``RunConfig.to_dict()`` form).
        current: the config of this invocation, same form.
        where: the checkpoint's path or name, for the message.

    Raises:
        ConfigError: one line naming the first differing field, this invocation's value
            and the saved one (``RESUME_MAY_CHANGE`` fields may differ).
    """
    saved, current = resolved_config(saved, current), _plain(current)
    diff = [k for k in config_diff(saved, current) if k not in RESUME_MAY_CHANGE]
    if not diff:
        return
    key = diff[0]
    old, new = flatten(saved).get(key, "<absent>"), flatten(current).get(key, "<absent>")
    more = f" (and {len(diff) - 1} more field(s))" if len(diff) > 1 else ""
    raise ConfigError(f"{key}: got {new!r}, expected {old!r} as in the checkpoint being resumed ({where}){more}")


def resolved_config(saved: Any, current: dict[str, Any]) -> Any:
    """A checkpoint's saved config as this version resolves it (`load_run_config`: the
    defaults of fields added since it was written filled in, in ``to_dict`` form).

    Only a saved config that names the current controller is resolved: one that names
    another differs anyway, and a plugin named only by a checkpoint is never imported. A
    saved config that no longer loads is returned as it is (it then differs where it
    no longer fits).

    Args:
        saved: the config stored with the run.
        current: the config of this invocation (``RunConfig.to_dict()`` form).
    """
    same_controller = isinstance(saved, dict) and flatten(saved).get("controller.name") == \
        flatten(current).get("controller.name")
    if not same_controller:
        return _plain(saved)
    try:
        return _plain(load_run_config(copy.deepcopy(saved)).to_dict())
    except ConfigError:
        return _plain(saved)


def _plain(value: Any) -> Any:
    """Tuples as lists (JSON's view), so that a config read back compares equal."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_run_state(folder: str | Path, same_as: RunConfig | None = None) -> dict[str, Any]:
    """Read ``folder/run_state.json`` ({} for a checkpoint written before it existed).

    Args:
        folder: an hf engine ``checkpoint-<step>`` folder.
        same_as: if given, refuse a saved config that differs from this one.

    Raises:
        CheckpointError: the file is not valid JSON of the expected shape.
        ConfigError: ``same_as`` differs from the saved config (names the first field).
    """
    path = Path(folder) / RUN_STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({first_line(e)}); expected the JSON written by "
                              "metalearner") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: got {type(state).__name__}, expected a JSON object")
    if same_as is not None and "config" in state:
        check_same_config(state["config"], same_as.to_dict(), str(path))
    return state
