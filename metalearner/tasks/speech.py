"""Speech recognition task: spoken digit strings -> characters, for the encoder-decoder model.

`SpeechTask` loads any ``audiofolder`` corpus (16 kHz mono audio plus ``metadata.csv``
with ``file_name,transcription``; `metalearner.tasks.speech_data.generate_speech_digits`
synthesizes one, your own recordings work too) with ``datasets.load_dataset("audiofolder")``,
computes Whisper-style log-mel features once, and serves batches in the layout of
`metalearner.tasks.base` plus a greedy-decoding character error rate.

Audio is decoded here with soundfile (+ soxr to resample), not through ``datasets.Audio``:
in datasets 5.x both encoding and decoding of the ``Audio`` feature require torchcodec
(and FFmpeg). The loader is told to keep ``file_name`` as a plain string instead.

Must not import ray or mlflow. Nothing here touches the network.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalearner.model.band import round_up  # its one definition (the model's padding)
from metalearner.tasks.base import IGNORE_INDEX, Batch, step_generator
from metalearner.tasks.speech_data import METADATA, SAMPLE_RATE

log = logging.getLogger(__name__)

HOP_LENGTH = 160  # 10 ms frames at 16 kHz
N_FFT = 400
FRAME_MULTIPLE = 16  # batches pad their frame axis to a multiple of this (fewer shapes)
FEATURE_DTYPE = np.float16  # how the log-mel features are kept (batches are float32)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
N_SPECIAL = 3

DATA_DIR_MISSING = (
    "data_dir: missing, expected a folder with metadata.csv "
    "(make one with: metalearner data speech-digits --out DIR --n N)"
)

# ---------------------------------------------------------------- the task


@dataclass
class SpeechConfig:
    """``task.*`` settings of the speech task.

    Args:
        name: the task registry key, always ``"speech"``.
        data_dir: an ``audiofolder`` folder: audio files plus ``metadata.csv`` with
            ``file_name`` and ``transcription`` columns (required).
        val_fraction: share of utterances held out for validation, in (0, 1).
        n_mels: mel bins of the log-mel features.
        max_text_len: longest transcript in characters; longer ones are skipped.
        max_frames: longest clip in 10 ms frames; longer clips are skipped (never cropped:
            a cropped clip would no longer match its transcript).
        eval_size: validation utterances in `SpeechTask.eval_batches`.
        cer_samples: validation utterances greedily decoded for the character error rate.
        split_seed: seeds the train/validation split (kept apart from the training seed, so
            every seed of a comparison is validated on the same utterances).
    """

    name: str = "speech"
    data_dir: str | None = None
    val_fraction: float = 0.1
    n_mels: int = 80
    max_text_len: int = 48
    max_frames: int = 1000
    eval_size: int = 128
    cer_samples: int = 64
    split_seed: int = 0

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: got {self.val_fraction}, expected a float in (0, 1)")
        for name in ("n_mels", "max_text_len", "max_frames", "eval_size", "cer_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: got {value!r}, expected an int >= 1")

    def check_files(self) -> None:
        if not self.data_dir:
            raise ValueError(DATA_DIR_MISSING)
        if not (Path(self.data_dir) / METADATA).is_file():
            raise ValueError(
                f"data_dir: {self.data_dir!r} has no {METADATA}, expected an audiofolder with "
                "file_name,transcription columns (make one with: metalearner data speech-digits --out DIR --n N)"
            )


def _load_audiofolder(data_dir: Path) -> list[tuple[str, str]]:
    """(file_name, transcription) rows of ``data_dir`` via ``load_dataset("audiofolder")``.

    ``file_name`` stays a string relative to ``data_dir`` (see the module docstring). The
    dataset is built in a throwaway cache and kept in memory, so a regenerated folder is
    never served from a stale cache and nothing is written under ``~/.cache``.
    """
    import datasets

    with open(data_dir / METADATA, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    for column in ("file_name", "transcription"):
        if column not in header:
            raise ValueError(f"task.data_dir: {data_dir / METADATA} has no {column!r} column (header: {header})")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    verbosity = datasets.logging.get_verbosity()
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="metalearner-audiofolder-") as cache:
            # data_files names the metadata file alone: it lists the audio files, and letting
            # datasets list and stat the folder itself costs ~1.3 ms per file (2.6 s for 2000)
            ds = datasets.load_dataset(
                "audiofolder", data_files={"train": str(data_dir / METADATA)}, features=features,
                cache_dir=cache, keep_in_memory=True,
            )
            rows = []
            for split in ds.values():
                rows += zip(split["file_name"], split["transcription"])
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()
    root = data_dir.resolve()
    out = []
    for name, text in rows:
        path = (root / name).resolve()
        if root not in path.parents:
            raise ValueError(f"task.data_dir: file_name {name!r} in {METADATA} points outside {root}")
        out.append((name, text or ""))
    return out


def _read_audio(path: Path) -> np.ndarray:
    """Mono float32 samples of ``path`` at 16 kHz."""
    import soundfile as sf
    import soxr

    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / OSError
        raise ValueError(f"task.data_dir: cannot read audio {path}: {e}") from None
    wave = wave.mean(axis=1)
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE).astype(np.float32)
    return wave


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class SpeechTask:
    """Character-level speech recognition over an ``audiofolder`` corpus.

    Every clip is decoded, resampled to 16 kHz and turned into Whisper log-mel features
    (``transformers.WhisperFeatureExtractor``, built locally) once, at construction, and
    stored as float16 (half the bytes a worker holds and Ray ships; batches are float32)
    in one numpy array, not a tensor: Ray's serializer hands numpy arrays to every worker
    of a node as read-only views of the one copy in its object store (zero-copy), while a
    tensor would be unpickled into each worker's own memory. Batches copy their clips out
    of it (`collate`), so a read-only view is all the task needs.

    Batches: ``features`` (B, n_mels, F) float32 with F the longest clip of the batch
    rounded up to a multiple of 16 (shorter clips padded with their own silence level, the
    log-mel floor); ``tokens`` (B, T) = [bos] + characters, padded with ``pad_id``;
    ``targets`` (B, T) = characters + [eos], ``IGNORE_INDEX`` at padding; T is the longest
    transcript of the batch + 1 (<= ``seq_len``).

    Token ids: 0 pad, 1 bos, 2 eos, then the corpus characters in sorted order.

    Args:
        cfg: the task settings.
        batch_size: utterances per batch.
        seq_len: the train loop's sequence length; unused (transcripts are bounded by
            ``cfg.max_text_len``), accepted for the common task signature.
        seed: seeds the training batches (``cfg.split_seed`` seeds the split).
        eval_batches: if given, at most this many validation batches (of ``batch_size``).

    Example:
        >>> generate_speech_digits("digits", n=200)            # doctest: +SKIP
        >>> task = SpeechTask(SpeechConfig(data_dir="digits"), batch_size=16, seq_len=0, seed=0)
        >>> batch = task.train_batch(1)                         # doctest: +SKIP
    """

    eval_metric_names = ("cer",)

    name = "speech"
    arch = "encoder_decoder"

    def __init__(
        self, cfg: SpeechConfig, *, batch_size: int, seq_len: int, seed: int, eval_batches: int | None = None
    ) -> None:
        cfg.validate()
        try:
            cfg.check_files()
        except ValueError as e:
            raise ValueError(f"task.{e}") from None
        if batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}, expected an int >= 1")
        self.cfg = cfg
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.seq_len = cfg.max_text_len + 1
        self.data_dir = Path(cfg.data_dir).resolve()
        self.metadata_sha256 = hashlib.sha256((self.data_dir / METADATA).read_bytes()).hexdigest()
        self._load(self.data_dir)
        self._split()
        n_eval = min(cfg.eval_size, len(self.val_idx))
        if eval_batches is not None:
            n_eval = min(n_eval, int(eval_batches) * self.batch_size)
        self.eval_idx = self.val_idx[:n_eval]
        self.cer_idx = self.val_idx[: min(cfg.cer_samples, len(self.val_idx))]

    # ------------------------------------------------------------ loading

    def _load(self, data_dir: Path) -> None:
        from transformers import WhisperFeatureExtractor

        cfg = self.cfg
        rows = sorted(_load_audiofolder(data_dir))
        if not rows:
            raise ValueError(f"task.data_dir: {data_dir} holds no utterances")
        extractor = WhisperFeatureExtractor(
            feature_size=cfg.n_mels, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, n_fft=N_FFT,
            chunk_length=30, padding_value=0.0,
        )
        long_text = [name for name, text in rows if len(text) > cfg.max_text_len]
        rows = [(name, text) for name, text in rows if len(text) <= cfg.max_text_len]
        feats, floors, texts, names, long_audio = [], [], [], [], []
        for name, text in rows:
            wave = _read_audio(data_dir / name)
            if len(wave) // HOP_LENGTH > cfg.max_frames:
                long_audio.append(name)
                continue
            if len(wave) < N_FFT:  # too short for one STFT window: pad with silence
                wave = np.pad(wave, (0, N_FFT - len(wave)))
            mel = extractor(wave, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="np")
            # stored in half: Whisper's log-mels lie in about [-1, 1.5]
            mel = np.asarray(mel["input_features"][0], dtype=np.float32).astype(FEATURE_DTYPE)
            feats.append(mel)  # (n_mels, frames)
            floors.append(float(mel.min()))
            texts.append(text)
            names.append(name)
        for what, skipped, limit in (("transcripts longer than task.max_text_len", long_text, cfg.max_text_len),
                                     ("clips longer than task.max_frames", long_audio, cfg.max_frames)):
            if skipped:
                log.warning("speech: skipped %d %s=%d: %s%s", len(skipped), what, limit,
                            ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
        if len(names) < 2:
            raise ValueError(f"task.data_dir: {data_dir} has {len(names)} usable utterances, expected >= 2")
        self.skipped_long_text, self.skipped_long_audio = len(long_text), len(long_audio)
        self.chars = "".join(sorted(set("".join(texts))))
        self.vocab_size = N_SPECIAL + len(self.chars)
        self._char_id = {c: N_SPECIAL + i for i, c in enumerate(self.chars)}
        self.names = names
        self.texts = texts
        self.n_frames = torch.tensor([f.shape[1] for f in feats], dtype=torch.long)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.n_frames.cumsum(0)])
        # (n_mels, total frames): one numpy array, zero-copy out of Ray's object store
        self._features = np.ascontiguousarray(np.concatenate(feats, axis=1))
        self._floors = torch.tensor(floors)
        self._text_ids = [torch.tensor([self._char_id[c] for c in t], dtype=torch.long) for t in texts]

    def _split(self) -> None:
        # names are sorted, so the split depends only on (files, split_seed): every training
        # seed of a comparison is validated on the same utterances
        n = len(self.names)
        n_val = min(max(1, round(self.cfg.val_fraction * n)), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.split_seed)).tolist()
        self.val_idx = sorted(perm[:n_val])
        self.train_idx = sorted(perm[n_val:])

    # ------------------------------------------------------------ batches

    def collate(self, idx: list[int]) -> Batch:
        """The batch of utterances ``idx`` (indices into ``names``/``texts``)."""
        frames = round_up(int(self.n_frames[idx].max()), FRAME_MULTIPLE)
        features = np.empty((len(idx), self.cfg.n_mels, frames), dtype=np.float32)  # (B, n_mels, F)
        t_len = max(len(self._text_ids[i]) for i in idx) + 1
        tokens = torch.full((len(idx), t_len), PAD_ID, dtype=torch.long)
        targets = torch.full((len(idx), t_len), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(idx):
            start, end = int(self._offsets[i]), int(self._offsets[i + 1])
            features[row, :, end - start :] = float(self._floors[i])  # padding: the clip's silence level
            features[row, :, : end - start] = self._features[:, start:end]  # float16 -> float32, exact
            ids = self._text_ids[i]
            tokens[row, 0] = BOS_ID
            tokens[row, 1 : len(ids) + 1] = ids
            targets[row, : len(ids)] = ids
            targets[row, len(ids)] = EOS_ID
        return {"features": torch.from_numpy(features), "tokens": tokens, "targets": targets}

    def train_batch(self, step: int) -> Batch:
        """The batch of optimizer step ``step``: ``batch_size`` training utterances drawn
        with `step_generator` (without replacement when the split is large enough)."""
        g = step_generator(self.seed, step)
        n = len(self.train_idx)
        if self.batch_size <= n:
            picks = torch.randperm(n, generator=g)[: self.batch_size]
        else:
            picks = torch.randint(n, (self.batch_size,), generator=g)
        return self.collate([self.train_idx[j] for j in picks.tolist()])

    def eval_batches(self) -> Iterator[Batch]:
        """Fixed batches over the first ``eval_size`` validation utterances (file-name order)."""
        for i in range(0, len(self.eval_idx), self.batch_size):
            yield self.collate(self.eval_idx[i : i + self.batch_size])

    # ------------------------------------------------------------ metrics

    def decode_ids(self, ids: list[int]) -> str:
        """Characters of a generated id sequence, up to the first eos; specials dropped."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i >= N_SPECIAL:
                out.append(self.chars[i - N_SPECIAL])
        return "".join(out)

    @torch.no_grad()
    def transcribe(self, model: torch.nn.Module, features: torch.Tensor) -> list[str]:
        """Greedy transcripts of ``features`` (B, n_mels, F) with ``model.encode``/``decode``."""
        device = next(model.parameters()).device
        memory = model.encode(features.to(device))
        b = features.size(0)
        tokens = torch.full((b, 1), BOS_ID, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for _ in range(self.seq_len):
            nxt = model.decode(tokens, memory)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == EOS_ID
            if bool(done.all()):
                break
        return [self.decode_ids(row[1:]) for row in tokens.tolist()]

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """``cer``: character error rate of greedy decoding on ``cer_samples`` validation
        utterances (total edit distance / total reference length)."""
        was_training = model.training
        model.eval()
        errors = chars = 0
        try:
            for i in range(0, len(self.cer_idx), self.batch_size):
                idx = self.cer_idx[i : i + self.batch_size]
                hyps = self.transcribe(model, self.collate(idx)["features"])
                for j, hyp in zip(idx, hyps):
                    errors += edit_distance(hyp, self.texts[j])
                    chars += len(self.texts[j])
        finally:
            model.train(was_training)
        return {"cer": errors / max(chars, 1)}

    # ------------------------------------------------------------ facts

    @property
    def max_source_frames(self) -> int:
        """Encoder length of the longest batch after the stride-2 conv stem."""
        return math.ceil(round_up(int(self.n_frames.max()), FRAME_MULTIPLE) / 2)

    def params(self) -> dict[str, Any]:
        return {
            "num_train": len(self.train_idx),
            "num_val": len(self.val_idx),
            "vocab": self.chars,
            "sample_rate": SAMPLE_RATE,
            "n_mels": self.cfg.n_mels,
            "data_dir": str(self.data_dir),
            "metadata_sha256": self.metadata_sha256,
            "max_clip_frames": int(self.n_frames.max()),
            "mean_clip_frames": round(float(self.n_frames.float().mean()), 1),
            "skipped_long_text": self.skipped_long_text,
            "skipped_long_audio": self.skipped_long_audio,
        }

    def model_overrides(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "vocab_size": self.vocab_size,
            "n_mels": self.cfg.n_mels,
            "max_seq_len": self.seq_len,
            "max_source_frames": self.max_source_frames,
        }
