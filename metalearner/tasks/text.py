"""`text`: language modelling on real prose, yours or CPython's.

By default the corpus is the documentation topics that ship with every CPython
(``pydoc_data.topics``, about 460 KB of English prose) and the tokens are its bytes
(vocab 256). ``task.files`` points it at the user's own corpus: plain files (their bytes,
as before), or ``text`` / ``jsonl`` / ``parquet`` files read through HF datasets with the
text in ``task.text_field`` (`metalearner.tasks.corpus`). ``task.tokenizer`` names a local
tokenizer folder; the model's vocabulary then follows the tokenizer (`TextTask.vocab_size`,
the one place that decides it, handed to the model by `model_overrides`).

The split is deterministic (the last ``val_fraction`` of the tokens is validation) and the
corpus's fingerprint is logged as ``task.fingerprint``. Must not import ray or mlflow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from metalearner.tasks.base import Batch, step_generator
from metalearner.tasks.corpus import (
    check_corpus,
    check_tokenizer_folder,
    corpus_fingerprint,
    decode_files,
    encode_documents,
    load_tokenizer,
    read_bytes,
    read_documents,
    resolve_format,
)

BYTE_VOCAB = 256


@dataclass
class TextConfig:
    """``task.*`` settings of the text task (the ``Field`` bounds are checked when a
    config is loaded, `metalearner.config`).

    ``format``: ``auto`` (by extension: ``.jsonl``/``.json`` -> jsonl, ``.parquet`` ->
    parquet, anything else -> the files' bytes), ``text``, ``jsonl`` or ``parquet``.
    ``text_field``: the record field holding the text (jsonl, parquet).
    ``tokenizer``: a local tokenizer folder (``save_pretrained``); unset: bytes.
    """

    name: Literal["text"] = "text"
    files: Annotated[list[str], Field(max_length=10_000)] = field(default_factory=list)
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: Annotated[str, Field(min_length=1, max_length=256)] = "text"
    tokenizer: Annotated[str, Field(min_length=1, max_length=4096)] | None = None

    def check_files(self) -> None:
        """The cheap checks, run whenever a config is loaded (files, format, the first
        record's fields, the tokenizer folder's files); raises ValueError naming the field."""
        check_corpus(self.files, self.format, self.text_field)
        if self.tokenizer is not None:
            check_tokenizer_folder(self.tokenizer)


def read_tokens(cfg: TextConfig) -> tuple[torch.Tensor, str, int]:
    """The corpus of ``cfg`` as one stream of token ids.

    Returns:
        (ids: 1-D integer tensor, fingerprint, vocab size); raises ValueError naming the
        ``task.`` field at fault.
    """
    try:
        reading = resolve_format(cfg.files, cfg.format)
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
        if reading == "bytes":
            raw = read_bytes(cfg.files)
            fingerprint = corpus_fingerprint(raw)
            if tokenizer is None:
                return torch.frombuffer(bytearray(raw), dtype=torch.uint8), fingerprint, BYTE_VOCAB
            docs = decode_files(cfg.files)
        else:
            docs = read_documents(cfg.files, reading, cfg.text_field)
            fingerprint = corpus_fingerprint(docs)
    except ValueError as e:
        raise ValueError(f"task.{e}") from None
    if tokenizer is None:
        text = "\n\n".join(docs).encode("utf-8")
        return torch.frombuffer(bytearray(text), dtype=torch.uint8), fingerprint, BYTE_VOCAB
    return torch.from_numpy(encode_documents(tokenizer, docs)), fingerprint, len(tokenizer)


class TextTask:
    name = "text"
    arch = "decoder"

    def __init__(self, cfg: TextConfig, *, batch_size: int, seq_len: int, seed: int,
                 eval_batches: int = 4) -> None:
        data, self.fingerprint, self.vocab_size = read_tokens(cfg)
        self.reading = resolve_format(cfg.files, cfg.format)
        n_val = max(int(len(data) * cfg.val_fraction), seq_len + 1)
        if len(data) - n_val < 4 * (seq_len + 1):
            raise ValueError(
                f"task.files: corpus of {len(data)} tokens is too small for train.seq_len={seq_len}"
            )
        self.train_data, self.val_data = data[:-n_val], data[-n_val:]
        self.cfg, self.batch_size, self.seq_len, self.seed = cfg, batch_size, seq_len, seed
        # fixed validation batches: evenly spaced windows over the held-out tokens
        n_windows = min(eval_batches * batch_size, (len(self.val_data) - 1) // seq_len)
        starts = torch.linspace(0, len(self.val_data) - seq_len - 1, n_windows).long()
        self._eval = [self._gather(self.val_data, starts[i: i + batch_size])
                      for i in range(0, n_windows, batch_size)]

    def _gather(self, data: torch.Tensor, starts: torch.Tensor) -> Batch:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = data[idx].long()
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
            "fingerprint": self.fingerprint,
            "source": ",".join(self.cfg.files) if self.cfg.files else "pydoc_data.topics",
            "reading": self.reading,
            "vocab_size": self.vocab_size,
            "train_tokens": len(self.train_data),
            "val_tokens": len(self.val_data),
        }

    def model_overrides(self) -> dict[str, Any]:
        return {"arch": "decoder", "vocab_size": self.vocab_size}
