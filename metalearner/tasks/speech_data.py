"""A small real-speech corpus synthesized with espeak-ng: spoken digit strings.

`generate_speech_digits` writes it with the ``espeak-ng`` synthesizer (Debian/Ubuntu
package ``espeak-ng``) in the Hugging Face ``audiofolder`` layout: 16 kHz mono WAV files
plus ``metadata.csv`` with ``file_name,transcription`` — the layout
`metalearner.tasks.speech.SpeechTask` reads (your own recordings work there too).

Writing a corpus is not loading one: this module needs neither torch nor datasets, only
numpy, soundfile and soxr (the ``speech`` extra). It never touches the network.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
METADATA = "metadata.csv"
ESPEAK_MISSING = (
    "espeak-ng not found: install the Debian/Ubuntu package 'espeak-ng' (apt-get install espeak-ng)"
)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PREFIX_WORDS = ("call", "dial", "code", "room", "press", "number")
SUFFIX_WORDS = ("please", "now", "okay")
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029")
VARIANTS = ("", "+m1", "+m3", "+m5", "+m7", "+f1", "+f2", "+f3", "+f4", "+klatt")
MARKER = "speech_digits.json"  # says "this folder was written by generate_speech_digits"
MARKER_FORMAT = 1


@dataclass(frozen=True)
class _Utterance:
    file_name: str
    text: str
    voice: str
    speed: int  # words per minute (espeak-ng -s)
    pitch: int  # 0..99 (espeak-ng -p)
    gap: int  # extra pause between words, in 10 ms units (espeak-ng -g)


def plan_speech_digits(n: int, seed: int = 0) -> list[_Utterance]:
    """The transcripts and voice settings `generate_speech_digits` uses; pure in (n, seed)."""
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        words = [rng.choice(DIGIT_WORDS) for _ in range(rng.randint(3, 6))]
        if rng.random() < 0.3:
            words.insert(0, rng.choice(PREFIX_WORDS))
        if rng.random() < 0.15:
            words.append(rng.choice(SUFFIX_WORDS))
        plan.append(
            _Utterance(
                file_name=f"utt_{i:06d}.wav",
                text=" ".join(words),
                voice=rng.choice(VOICES) + rng.choice(VARIANTS),
                speed=rng.randint(130, 210),
                pitch=rng.randint(25, 75),
                gap=rng.randint(0, 4),
            )
        )
    return plan


def _synthesize(espeak: str, utt: _Utterance, out_dir: Path) -> None:
    import soundfile as sf
    import soxr

    cmd = [espeak, "-v", utt.voice, "-s", str(utt.speed), "-p", str(utt.pitch), "-g", str(utt.gap),
           "--stdout", utt.text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed on {utt}: {proc.stderr.decode(errors='replace').strip()}")
    wave, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE)
    sf.write(out_dir / utt.file_name, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def generate_speech_digits(out_dir: str | os.PathLike, n: int, seed: int = 0, progress: bool = True) -> Path:
    """Write ``n`` synthetic spoken digit strings as an ``audiofolder`` corpus.

    Each utterance is 3-6 digits spoken as words ("three one four"), sometimes with a
    leading word ("call", "dial", ...) or a trailing one ("please", ...), in one of several
    espeak-ng English voices and variants, at a random speed, pitch and word gap. Files:
    ``utt_000000.wav`` ... (16 kHz mono PCM-16), ``metadata.csv`` (``file_name,transcription``)
    and ``speech_digits.json`` (n, seed: marks the folder as ours).

    Transcripts and voice settings are a pure function of (n, seed). A folder that already
    holds a complete corpus with the same (n, seed) is left as it is; one of ours with other
    settings is replaced; any other non-empty folder is refused.

    Args:
        out_dir: the folder to write (created if missing).
        n: number of utterances, >= 1.
        seed: seeds the transcripts and voice settings.
        progress: show a tqdm progress bar (on an interactive terminal).

    Returns:
        ``out_dir`` as a Path.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: got {n!r}, expected an int >= 1")
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError(ESPEAK_MISSING)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir: {out} exists and is not a folder")
    marker = _read_marker(out) if out.is_dir() else None
    settings = {"generator": "metalearner speech-digits", "format": MARKER_FORMAT, "n": n, "seed": seed}
    if marker is None:
        if out.is_dir() and any(out.iterdir()):
            raise FileExistsError(
                f"out_dir: {out} is not empty and holds no speech-digits corpus (no {MARKER}); "
                "refusing to write into it, choose a new or empty folder"
            )
    elif marker.get("generator") != settings["generator"]:
        raise FileExistsError(f"out_dir: {out}/{MARKER} was not written by this generator; refusing")
    elif marker == {**settings, "complete": True} and (out / METADATA).is_file():
        log.info("%s already holds the speech-digits corpus n=%d seed=%d; kept", out, n, seed)
        return out
    else:  # ours, but other settings or unfinished: remove our files only, then regenerate
        (out / METADATA).unlink(missing_ok=True)
        for wav in out.glob("utt_*.wav"):
            wav.unlink()

    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({**settings, "complete": False}, indent=1) + "\n")
    plan = plan_speech_digits(n, seed)
    from tqdm.auto import tqdm

    workers = min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda u: _synthesize(espeak, u, out), plan)
        for _ in tqdm(jobs, total=n, desc="espeak-ng", unit="utt", disable=None if progress else True):
            pass
    tmp = out / (METADATA + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription"])
        writer.writerows((u.file_name, u.text) for u in plan)
    os.replace(tmp, out / METADATA)
    (out / MARKER).write_text(json.dumps({**settings, "complete": True}, indent=1) + "\n")
    return out


