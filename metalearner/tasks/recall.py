"""`recall`: multi-query associative recall with a known key–query distance.

Each sequence holds ``n_pairs`` key/value pairs at positions (2i, 2i+1); key i is asked
again exactly ``distance`` tokens after it first appeared, at position 2i + distance, and
the target there is its value. Everything else is a filler token. So a local head needs a
window of at least ``distance`` to see the value it must copy: the window a perfect
model needs is known. Generated from (seed, step); must not import ray or mlflow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from metalearner.tasks.base import IGNORE_INDEX, Batch, step_generator


@dataclass
class RecallConfig:
    name: str = "recall"
    n_pairs: int = 8
    distance: int = 48
    n_keys: int = 64
    n_values: int = 64
    eval_size: int = 256

    def validate(self) -> None:
        for f in ("n_pairs", "n_keys", "n_values", "eval_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}: got {getattr(self, f)}, expected an int >= 1")
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs: got {self.n_pairs}, expected <= n_keys ({self.n_keys})")
        if self.distance < 2 * self.n_pairs:
            raise ValueError(
                f"distance: got {self.distance}, expected >= 2 * n_pairs ({2 * self.n_pairs}) "
                "so that every query comes after all pairs"
            )


class RecallTask:
    name = "recall"
    arch = "decoder"
    eval_metric_names = ("recall_acc",)
    EVAL_SEED = 7919

    def __init__(self, cfg: RecallConfig, *, batch_size: int, seq_len: int, seed: int) -> None:
        need = cfg.distance + 2 * cfg.n_pairs
        if seq_len < need:
            raise ValueError(
                f"train.seq_len: got {seq_len}, expected >= distance + 2 * n_pairs ({need}) "
                "for the recall task"
            )
        self.cfg, self.batch_size, self.seq_len, self.seed = cfg, batch_size, seq_len, seed
        self.filler = cfg.n_keys + cfg.n_values
        self.vocab_size = self.filler + 1
        # validation set: the same for every training seed (step 0 is never a training step)
        g = step_generator(self.EVAL_SEED, 0)
        self._eval = [self._make(cfg.eval_size, g)]

    def _make(self, n: int, g: torch.Generator) -> Batch:
        c, T = self.cfg, self.seq_len
        keys = torch.argsort(torch.rand(n, c.n_keys, generator=g), dim=1)[:, : c.n_pairs]
        values = c.n_keys + torch.randint(0, c.n_values, (n, c.n_pairs), generator=g)
        tokens = torch.full((n, T), self.filler, dtype=torch.long)
        targets = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
        pos = 2 * torch.arange(c.n_pairs)
        tokens[:, pos] = keys
        tokens[:, pos + 1] = values
        tokens[:, pos + c.distance] = keys
        targets[:, pos + c.distance] = values
        return {"tokens": tokens, "targets": targets}

    def train_batch(self, step: int) -> Batch:
        return self._make(self.batch_size, step_generator(self.seed, step))

    def eval_batches(self) -> Iterable[Batch]:
        return self._eval

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        hits = total = 0
        device = next(model.parameters()).device
        for b in self._eval:
            tokens, targets = b["tokens"].to(device), b["targets"].to(device)
            pred = model(tokens).argmax(-1)
            mask = targets != IGNORE_INDEX
            hits += int((pred[mask] == targets[mask]).sum())
            total += int(mask.sum())
        model.train(was_training)
        return {"recall_acc": hits / max(total, 1)}

    def params(self) -> dict[str, Any]:
        return {"needed_window": self.cfg.distance, "vocab_size": self.vocab_size}

    def model_overrides(self) -> dict[str, Any]:
        return {"arch": "decoder", "vocab_size": self.vocab_size}
