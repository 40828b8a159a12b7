"""The `Task` protocol: what the train loop needs from a data set.

A task hands out training batches as a pure function of the step (so a resumed or
PBT-cloned run sees exactly the batches an uninterrupted run would), a fixed set of
validation batches, and its own extra evaluation metrics. Must not import ray or mlflow.

Batch layout (a plain dict of tensors):
    ``tokens``   LongTensor (B, T)  decoder input tokens
    ``targets``  LongTensor (B, T)  next-token targets, ``IGNORE_INDEX`` where no loss
    ``features`` FloatTensor (B, n_mels, frames)  encoder input (encoder_decoder tasks only)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    name: str
    arch: str  # "decoder" or "encoder_decoder": the model shape this task trains
    vocab_size: int
    seq_len: int  # longest decoder sequence a batch can hold

    def train_batch(self, step: int) -> Batch:
        """The batch of optimizer step ``step`` (1-based); deterministic in (seed, step)."""
        ...

    def eval_batches(self) -> Iterable[Batch]:
        """The fixed validation batches."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Extra validation metrics beyond ``val_loss`` (may be empty)."""
        ...

    def params(self) -> dict[str, Any]:
        """Facts about the data to log as ``task.*`` params (sizes, sha256, ...)."""
        ...

    def model_overrides(self) -> dict[str, Any]:
        """ModelConfig fields the data dictates (vocab_size, arch, n_mels, ...)."""
        ...


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, step)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def forward_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Run ``model`` on ``batch`` whatever its arch; returns logits (B, T, V)."""
    if "features" in batch:
        return model(batch["features"], batch["tokens"])
    return model(batch["tokens"])


def batch_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-ignored targets."""
    logits = forward_logits(model, batch)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        batch["targets"].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
