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
from metalearner.tasks.speech import SpeechConfig, SpeechTask  # datasets/transformers load lazily
from metalearner.tasks.text import TextConfig, TextTask


@dataclass(frozen=True)
class TaskEntry:
    config_cls: type
    factory: Callable[..., Task]


TASKS: dict[str, TaskEntry] = {
    "recall": TaskEntry(RecallConfig, RecallTask),
    "text": TaskEntry(TextConfig, TextTask),
    "speech": TaskEntry(SpeechConfig, SpeechTask),
}


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
    "forward_logits", "step_generator", "RecallConfig", "RecallTask", "SpeechConfig", "SpeechTask", "TextConfig",
    "TextTask",
]
