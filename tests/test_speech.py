"""Tests for metalearner/tasks/speech.py: real espeak-ng, real audiofolder loading, small."""

from __future__ import annotations

import csv
import logging
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from metalearner.model import ModelConfig, build_model
from metalearner.tasks.base import IGNORE_INDEX, Task, batch_loss
from metalearner.tasks.speech import BOS_ID, EOS_ID, PAD_ID, SpeechConfig, SpeechTask, edit_distance
from metalearner.tasks.speech_data import (
    DIGIT_WORDS,
    PREFIX_WORDS,
    SUFFIX_WORDS,
    generate_speech_digits,
    plan_speech_digits,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="needs the espeak-ng Debian package"
)
N = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs the espeak-ng Debian package")
    return generate_speech_digits(tmp_path_factory.mktemp("digits"), N, seed=0, progress=False)


@pytest.fixture(scope="module")
def task(corpus):
    return SpeechTask(SpeechConfig(data_dir=str(corpus), val_fraction=0.25), batch_size=4, seq_len=0, seed=0)


def read_metadata(folder):
    with open(folder / "metadata.csv", newline="") as f:
        return list(csv.reader(f))


# ---------------------------------------------------------------- generation


@needs_espeak
def test_generation_writes_an_audiofolder(corpus):
    import soundfile as sf

    rows = read_metadata(corpus)
    assert rows[0] == ["file_name", "transcription"]
    assert len(rows) == N + 1
    allowed = set(DIGIT_WORDS) | set(PREFIX_WORDS) | set(SUFFIX_WORDS)
    for file_name, text in rows[1:]:
        info = sf.info(corpus / file_name)
        assert (info.samplerate, info.channels) == (16_000, 1)
        assert 0.3 < info.duration < 10
        words = text.split(" ")
        assert set(words) <= allowed and sum(w in DIGIT_WORDS for w in words) >= 3
    assert sorted(p.name for p in corpus.glob("*.wav")) == [r[0] for r in rows[1:]]


@needs_espeak
def test_generation_is_deterministic(tmp_path, corpus):
    assert plan_speech_digits(N, seed=0) == plan_speech_digits(N, seed=0)
    assert plan_speech_digits(N, seed=0) != plan_speech_digits(N, seed=1)
    again = generate_speech_digits(tmp_path / "again", 3, seed=0, progress=False)
    assert read_metadata(again)[1:] == read_metadata(corpus)[1:4]  # a prefix of the same plan
    assert (again / "utt_000001.wav").read_bytes() == (corpus / "utt_000001.wav").read_bytes()


@needs_espeak
def test_generation_keeps_or_replaces_its_own_folder_and_refuses_others(tmp_path):
    out = generate_speech_digits(tmp_path / "d", 2, seed=0, progress=False)
    stamp = (out / "utt_000000.wav").stat().st_mtime_ns
    generate_speech_digits(out, 2, seed=0, progress=False)  # same settings: kept as is
    assert (out / "utt_000000.wav").stat().st_mtime_ns == stamp
    generate_speech_digits(out, 3, seed=5, progress=False)  # ours, new settings: replaced
    assert [r[1] for r in read_metadata(out)[1:]] == [u.text for u in plan_speech_digits(3, 5)]
    assert len(list(out.glob("*.wav"))) == 3

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_speech_digits(foreign, 2, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_missing_espeak_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"apt-get install espeak-ng"):
        generate_speech_digits(tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- config


def test_missing_data_dir_is_named():
    with pytest.raises(ValueError, match=r"^task\.data_dir: missing, expected a folder with metadata\.csv"):
        SpeechTask(SpeechConfig(), batch_size=2, seq_len=0, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        SpeechConfig(data_dir="x", val_fraction=1.5).validate()


def test_bad_folders_are_named(tmp_path):
    cfg = SpeechConfig(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^task\.data_dir: .* has no metadata\.csv"):
        SpeechTask(cfg, batch_size=2, seq_len=0, seed=0)
    (tmp_path / "metadata.csv").write_text("file_name,text\na.wav,hi\n")
    with pytest.raises(ValueError, match=r"^task\.data_dir: .* has no 'transcription' column"):
        SpeechTask(cfg, batch_size=2, seq_len=0, seed=0)
    (tmp_path / "metadata.csv").write_text("file_name,transcription\na.wav,hi\n")
    with pytest.raises(ValueError, match=r"^task\.data_dir: cannot read audio .*a\.wav"):
        SpeechTask(cfg, batch_size=2, seq_len=0, seed=0)


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("same", "same") == 0


# ---------------------------------------------------------------- the task


@needs_espeak
def test_task_facts(task, corpus):
    assert isinstance(task, Task)
    assert (task.name, task.arch, task.seq_len) == ("speech", "encoder_decoder", 49)
    texts = [r[1] for r in read_metadata(corpus)[1:]]
    assert task.chars == "".join(sorted(set("".join(texts))))
    assert task.vocab_size == 3 + len(task.chars)
    p = task.params()
    assert (p["num_train"], p["num_val"]) == (18, 6)
    assert p["vocab"] == task.chars and p["sample_rate"] == 16_000 and p["n_mels"] == 80
    assert len(p["metadata_sha256"]) == 64
    o = task.model_overrides()
    assert o["arch"] == "encoder_decoder" and o["vocab_size"] == task.vocab_size and o["n_mels"] == 80
    assert o["max_seq_len"] >= task.seq_len
    longest = max(b["features"].shape[-1] for b in task.eval_batches())
    assert o["max_source_frames"] >= (longest + 1) // 2


@needs_espeak
def test_train_batches_layout_and_determinism(task):
    b = task.train_batch(1)
    assert b["features"].dtype == torch.float32 and b["features"].shape[:2] == (4, 80)
    assert b["features"].shape[2] % 16 == 0
    assert b["tokens"].dtype == b["targets"].dtype == torch.long
    assert b["tokens"].shape == b["targets"].shape and b["tokens"].shape[1] <= task.seq_len
    assert (b["tokens"][:, 0] == BOS_ID).all()
    for tok, tgt in zip(b["tokens"], b["targets"]):
        n = int((tgt != IGNORE_INDEX).sum())
        assert tgt[n - 1] == EOS_ID
        assert torch.equal(tok[1:n], tgt[: n - 1])  # targets are tokens shifted by one
        assert (tok[n:] == PAD_ID).all() and (tgt[n:] == IGNORE_INDEX).all()
        assert task.decode_ids(tgt.tolist()) in task.texts
    again = task.train_batch(1)
    assert all(torch.equal(b[k], again[k]) for k in b)
    other = task.train_batch(2)
    assert any(b[k].shape != other[k].shape or not torch.equal(b[k], other[k]) for k in b)


@needs_espeak
def test_split_is_deterministic_and_disjoint(task, corpus):
    assert not set(task.train_idx) & set(task.val_idx)
    assert sorted(task.train_idx + task.val_idx) == list(range(N))
    same = SpeechTask(SpeechConfig(data_dir=str(corpus), val_fraction=0.25), batch_size=4, seq_len=0, seed=0)
    assert (same.train_idx, same.val_idx) == (task.train_idx, task.val_idx)
    b, c = task.train_batch(7), same.train_batch(7)
    assert all(torch.equal(b[k], c[k]) for k in b)
    # the training seed changes the batches, never the split: every seed of a comparison
    # is validated on the same utterances; split_seed moves the split
    other = SpeechTask(SpeechConfig(data_dir=str(corpus), val_fraction=0.25), batch_size=4, seq_len=0, seed=1)
    assert other.val_idx == task.val_idx
    assert not all(torch.equal(b[k], other.train_batch(7)[k]) for k in b)
    moved = SpeechTask(SpeechConfig(data_dir=str(corpus), val_fraction=0.25, split_seed=1), batch_size=4,
                       seq_len=0, seed=0)
    assert moved.val_idx != task.val_idx


@needs_espeak
def test_eval_batches_are_fixed(task):
    first, second = list(task.eval_batches()), list(task.eval_batches())
    assert sum(len(b["tokens"]) for b in first) == len(task.val_idx) == 6
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, second) for k in x)


@needs_espeak
@needs_espeak
def test_features_are_stored_in_half_and_served_in_float32(task):
    assert task._features.dtype == np.float16  # half the bytes per worker and per shipment
    b = task.collate([0])
    n = int(task.n_frames[0])
    assert b["features"].dtype == torch.float32
    assert torch.equal(b["features"][0, :, :n], torch.from_numpy(task._features[:, :n].astype(np.float32)))
    assert torch.equal(b["features"][0, :, n:], torch.full_like(b["features"][0, :, n:], float(task._floors[0])))


def test_task_pickles(task):
    clone = pickle.loads(pickle.dumps(task))
    b, c = task.train_batch(3), clone.train_batch(3)
    assert all(torch.equal(b[k], c[k]) for k in b)


class Oracle(nn.Module):
    """Stand-in encoder-decoder that 'recognises' a clip by its per-mel maxima (which
    padding with the clip's floor leaves unchanged) and emits its transcript."""

    def __init__(self, task: SpeechTask, typo: bool = False) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.vocab = task.vocab_size
        self.table = {}
        for i, text in enumerate(task.texts):
            ids = [3 + task.chars.index(c) for c in text]
            if typo:  # one substitution per utterance
                ids[0] = 3 + (ids[0] - 3 + 1) % len(task.chars)
            self.table[self.key(task.collate([i])["features"][0])] = ids + [EOS_ID]

    @staticmethod
    def key(features: torch.Tensor) -> tuple:
        return tuple(np.round(features.amax(-1).numpy(), 4).tolist())

    def encode(self, features):
        return features

    def decode(self, tokens, memory):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b in range(tokens.size(0)):
            ref = self.table[self.key(memory[b])]
            for t in range(tokens.size(1)):
                logits[b, t, ref[t] if t < len(ref) else EOS_ID] = 1.0
        return logits


@needs_espeak
def test_cer_of_stand_in_decoders(task):
    oracle = Oracle(task).train()
    assert task.evaluate(oracle) == {"cer": 0.0}
    assert oracle.training  # mode restored
    typo = Oracle(task, typo=True).eval()
    n_chars = sum(len(task.texts[i]) for i in task.cer_idx)
    assert task.evaluate(typo)["cer"] == pytest.approx(len(task.cer_idx) / n_chars)
    assert not typo.training


@needs_espeak
def test_user_audiofolder_with_other_rate_channels_and_columns(tmp_path, caplog):
    import soundfile as sf

    folder = tmp_path / "own"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = [("a.wav", "Hi there", 0.5), ("b.flac", "OK", 0.8), ("c.wav", "Too long clip", 3.0)]
    for name, _, seconds in rows:
        n = int(44_100 * seconds)
        stereo = 0.1 * rng.standard_normal((n, 2)).astype(np.float32)
        sf.write(folder / name, stereo, 44_100)
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "speaker", "transcription"])
        w.writerows((name, 7, text) for name, text, _ in rows)
    cfg = SpeechConfig(data_dir=str(folder), max_frames=150, val_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="metalearner.tasks.speech"):
        t = SpeechTask(cfg, batch_size=2, seq_len=0, seed=0)
    assert "c.wav" in caplog.text and t.params()["skipped_long_audio"] == 1
    assert t.names == ["a.wav", "b.flac"] and t.chars == " HKOehirt"  # chars of the kept clips only
    assert t.n_frames.tolist() == [50, 80]


# ---------------------------------------------------------------- with the real model


@needs_espeak
def test_real_model_learns_and_decodes(task):
    o = task.model_overrides()
    cfg = ModelConfig(
        arch="encoder_decoder", vocab_size=o["vocab_size"], d_model=32, n_layers=2, n_heads=4,
        n_global_heads=1, max_seq_len=64, n_mels=80, window=8,
    )
    cfg.max_source_frames = o["max_source_frames"]  # the task's figure must fit its longest clip
    torch.manual_seed(0)
    model = build_model(cfg)
    probe = next(iter(task.eval_batches()))
    with torch.no_grad():
        before = batch_loss(model, probe).item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, 11):
        loss = batch_loss(model, task.train_batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = batch_loss(model, probe).item()
    assert after < before - 0.3
    longest = task.collate([int(task.n_frames.argmax())])
    assert model(longest["features"], longest["tokens"]).shape[:2] == longest["tokens"].shape
    model.train()
    cer = task.evaluate(model)["cer"]
    assert 0.0 <= cer and np.isfinite(cer) and model.training
