"""Tasks (data sets) the train loop can run: a registry of name -> (config class, factory).

To add a task: write a config dataclass (with a ``name`` field) and a class implementing
`metalearner.tasks.base.Task`, then register them in ``TASKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metalearner.tasks.base import IGNORE_INDEX, Batch, Task, batch_loss, forward_logits, step_generator
from metalearner.tasks.recall import RecallConfig, RecallTask
from metalearner.tasks.text import TextConfig, TextTask


@dataclass(frozen=True)
class TaskEntry:
    config_cls: type
    factory: Callable[..., Task]


def _speech_factory(cfg: Any, **kw: Any) -> Task:
    from metalearner.tasks.speech import SpeechTask

    return SpeechTask(cfg, **kw)


def _speech_config() -> type:
    from metalearner.tasks.speech import SpeechConfig

    return SpeechConfig


TASKS: dict[str, TaskEntry] = {
    "recall": TaskEntry(RecallConfig, RecallTask),
    "text": TaskEntry(TextConfig, TextTask),
}
try:  # the speech task's module imports its heavy deps lazily
    TASKS["speech"] = TaskEntry(_speech_config(), _speech_factory)
except ImportError:  # pragma: no cover - only while the module is missing
    pass


def build_task(cfg: Any, *, batch_size: int, seq_len: int, seed: int, eval_batches: int = 4) -> Task:
    """Build the task whose config dataclass is ``cfg`` (``cfg.name`` picks it)."""
    entry = TASKS[cfg.name]
    kw: dict[str, Any] = {"batch_size": batch_size, "seq_len": seq_len, "seed": seed}
    if cfg.name in ("text", "speech"):
        kw["eval_batches"] = eval_batches
    try:
        return entry.factory(cfg, **kw)
    except FileNotFoundError as e:
        raise ValueError(f"task: {e}") from None


__all__ = [
    "IGNORE_INDEX", "Batch", "Task", "TASKS", "TaskEntry", "build_task", "batch_loss",
    "forward_logits", "step_generator", "RecallConfig", "RecallTask", "TextConfig", "TextTask",
]
