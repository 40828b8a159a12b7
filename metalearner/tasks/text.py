"""`text`: byte-level language modelling on real prose.

By default the corpus is the documentation topics that ship with every CPython
(``pydoc_data.topics``, about 460 KB of English prose); ``task.files`` points it at the
user's own UTF-8 text files instead. The split is deterministic (the last
``val_fraction`` of the bytes is validation) and the corpus's sha256 is logged.
Must not import ray or mlflow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from metalearner.tasks.base import Batch, step_generator


@dataclass
class TextConfig:
    """``task.*`` settings of the text task (the ``Field`` bounds are checked when a
    config is loaded, `metalearner.config`)."""

    name: Literal["text"] = "text"
    files: Annotated[list[str], Field(max_length=10_000)] = field(default_factory=list)
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05

    def check_files(self) -> None:
        for f in self.files:
            if not Path(f).is_file():
                raise ValueError(f"files: got {f!r}, expected an existing text file") from None


def load_corpus(files: list[str]) -> bytes:
    """The corpus as bytes: the given files joined, or CPython's pydoc topics."""
    if files:
        return b"\n\n".join(Path(f).read_bytes() for f in files)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


class TextTask:
    name = "text"
    arch = "decoder"
    vocab_size = 256

    def __init__(self, cfg: TextConfig, *, batch_size: int, seq_len: int, seed: int,
                 eval_batches: int = 4) -> None:
        raw = load_corpus(cfg.files)
        self.sha256 = hashlib.sha256(raw).hexdigest()
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        n_val = max(int(len(data) * cfg.val_fraction), seq_len + 1)
        if len(data) - n_val < 4 * (seq_len + 1):
            raise ValueError(
                f"task.files: corpus of {len(data)} bytes is too small for train.seq_len={seq_len}"
            )
        self.train_data, self.val_data = data[:-n_val], data[-n_val:]
        self.cfg, self.batch_size, self.seq_len, self.seed = cfg, batch_size, seq_len, seed
        # fixed validation batches: evenly spaced windows over the held-out bytes
        n_windows = min(eval_batches * batch_size, (len(self.val_data) - 1) // seq_len)
        starts = torch.linspace(0, len(self.val_data) - seq_len - 1, n_windows).long()
        self._eval = [self._gather(self.val_data, starts[i: i + batch_size])
                      for i in range(0, n_windows, batch_size)]

    def _gather(self, data: torch.Tensor, starts: torch.Tensor) -> Batch:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = data[idx]
        return {"tokens": chunk[:, :-1], "targets": chunk[:, 1:]}

    def train_batch(self, step: int) -> Batch:
        g = step_generator(self.seed, step)
        starts = torch.randint(0, len(self.train_data) - self.seq_len - 1, (self.batch_size,), generator=g)
        return self._gather(self.train_data, starts)

    def eval_batches(self) -> Iterable[Batch]:
        return self._eval

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {}

    def params(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "source": ",".join(self.cfg.files) if self.cfg.files else "pydoc_data.topics",
            "train_bytes": len(self.train_data),
            "val_bytes": len(self.val_data),
        }

    def model_overrides(self) -> dict[str, Any]:
        return {"arch": "decoder", "vocab_size": 256}
