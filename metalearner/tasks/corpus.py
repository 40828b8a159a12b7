"""Reading a text corpus and its tokenizer from local files: what the `text` task trains on.

A corpus is a list of files in one format:

- ``bytes``: the files' bytes, joined by a blank line (the text task's reading before
  formats existed; ``format: auto`` keeps it for plain files and CPython's pydoc topics);
- ``text``: UTF-8 text files through datasets' ``text`` builder, one document per file;
- ``jsonl`` / ``parquet``: records through datasets' ``json`` / ``parquet`` builders, one
  document per record, its text in the column ``text_field``.

The records are read with the builders' own ``Dataset.from_text/from_json/from_parquet``,
which never resolve a dataset script or a Hub repository, so nothing touches the network.
The Arrow cache they write goes to a temporary folder that is removed after the load and
the dataset is kept in memory: nothing lands under ``~/.cache`` and a changed file is never
served from a stale cache (the same choice as the speech task's ``audiofolder`` load).

The tokenizer is a local folder loaded with ``AutoTokenizer.from_pretrained(folder,
local_files_only=True)``; without one the tokens are the bytes (vocab 256).

The fingerprint is a sha256 of the documents as read (`corpus_fingerprint`): equal for the
same content whatever the file names or times, different when any text changes.

datasets and transformers are imported lazily (``pip install 'metalearner[hf]'``).
Must not import ray or mlflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("auto", "text", "jsonl", "parquet")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}  # format auto; others read as bytes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # one of them marks a tokenizer folder
DOC_SEPARATOR = "\n\n"
EXTRA_HINT = "pip install 'metalearner[hf]'"


def resolve_format(files: list[str], fmt: str) -> str:
    """The reading of ``files`` under ``format: fmt``: ``bytes``, ``text``, ``jsonl`` or ``parquet``.

    Args:
        files: the corpus files (empty: CPython's pydoc topics, read as bytes).
        fmt: one of `FORMATS`; ``auto`` goes by the files' extensions (`EXTENSIONS`).

    Returns:
        The reading; raises ValueError (field first, no ``task.`` prefix) when ``auto``
        meets files of several kinds or a datasets format has no files.
    """
    if fmt != "auto":
        if not files:
            raise ValueError(f"format: got {fmt!r} with no files, expected task.files naming the {fmt} files")
        return fmt
    kinds = sorted({EXTENSIONS.get(Path(f).suffix.lower(), "bytes") for f in files})
    if len(kinds) > 1:
        raise ValueError(f"format: got 'auto' for files of several kinds ({', '.join(kinds)}), expected files of "
                         f"one kind or task.format set to one of {list(FORMATS[1:])}")
    return kinds[0] if kinds else "bytes"


def record_fields(path: str, fmt: str) -> list[str]:
    """The field names of the first record of a jsonl or parquet file, read cheaply
    (one line, or the parquet schema); raises ValueError naming ``files``."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise ValueError(f"files: got {path!r}, expected a parquet file ({first_line(e)})") from None
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"files: got {path!r} whose line {number} is not a JSON object, expected "
                                         "one JSON object per line")
                    return list(record)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"files: got {path!r}, expected UTF-8 JSON lines ({first_line(e)})") from None
    return []


def check_corpus(files: list[str], fmt: str, text_field: str) -> str:
    """The cheap checks of a corpus, run whenever a config is loaded: every file exists,
    the format resolves, and ``text_field`` is a field of each file's first record.

    Returns:
        The resolved reading (`resolve_format`); raises ValueError naming the field.
    """
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"files: got {f!r}, expected an existing file")
    reading = resolve_format(files, fmt)
    if reading in ("jsonl", "parquet"):
        for f in files:
            fields = record_fields(f, reading)
            if fields and text_field not in fields:
                raise ValueError(f"text_field: got {text_field!r}, expected a field of the records in {f} "
                                 f"(they have {fields})")
    return reading


def check_tokenizer_folder(folder: str) -> None:
    """The cheap check of ``task.tokenizer``: a folder holding one of `TOKENIZER_FILES`
    (`load_tokenizer` makes the full check). Raises ValueError naming ``tokenizer``."""
    p = Path(folder)
    if not p.is_dir():
        raise ValueError(f"tokenizer: got {folder!r}, expected a local folder holding a tokenizer")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"tokenizer: got {folder!r}, expected a tokenizer folder (with {' or '.join(TOKENIZER_FILES)}; "
                         "make one with tokenizer.save_pretrained(folder))")


def tokenizer_vocab_size(folder: str) -> int | None:
    """The vocabulary a tokenizer folder gives the model (``len(tokenizer)``: the tokens of
    its model and its added tokens), read from ``tokenizer.json`` alone, without loading the
    tokenizer: what the size check of a run's config counts before anything is built.

    Args:
        folder: a tokenizer folder (`check_tokenizer_folder`).

    Returns:
        The count, or None when the folder has no ``tokenizer.json`` (a slow tokenizer's
        files only) or the file is not one `tokenizers` writes (`load_tokenizer` names the
        problem when the task is built).
    """
    try:
        doc = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = doc["model"]["vocab"]  # {piece: id} (BPE, WordPiece, WordLevel) or [[piece, score], ...] (Unigram)
        pieces = set(vocab) if isinstance(vocab, dict) else {str(entry[0]) for entry in vocab}
        pieces |= {str(token["content"]) for token in doc.get("added_tokens") or []}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
        return None
    return len(pieces) or None


def load_tokenizer(folder: str) -> Any:
    """``AutoTokenizer.from_pretrained(folder, local_files_only=True)``.

    Args:
        folder: a local folder written by ``save_pretrained``.

    Returns:
        The tokenizer; raises ValueError naming ``tokenizer`` when the folder holds none
        or transformers is not installed.
    """
    check_tokenizer_folder(folder)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"tokenizer: got {folder!r}, which needs the package 'transformers' (not installed); "
                         f"expected it installed: {EXTRA_HINT}") from None
    try:
        with quiet("transformers"):
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... for a bad folder
        raise ValueError(f"tokenizer: got {folder!r}, expected a folder AutoTokenizer can load "
                         f"({first_line(e)})") from None
    if not callable(tokenizer) or len(tokenizer) < 1:
        raise ValueError(f"tokenizer: got {folder!r}, expected a tokenizer with a vocabulary")
    return tokenizer


def read_bytes(files: list[str]) -> bytes:
    """The ``bytes`` reading: the files joined by a blank line, or CPython's pydoc topics."""
    if files:
        return b"\n\n".join(Path(f).read_bytes() for f in files)
    return pydoc_topics().encode("utf-8")


def decode_files(files: list[str]) -> list[str]:
    """The ``bytes`` reading as documents to tokenize: each file's UTF-8 text (or the pydoc
    topics); raises ValueError naming ``files`` for a file that is not UTF-8."""
    if not files:
        return [pydoc_topics()]
    docs = []
    for f in files:
        try:
            docs.append(Path(f).read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"files: got {f!r}, not UTF-8 at byte {e.start}; expected UTF-8 text to tokenize "
                             "with task.tokenizer") from None
    return docs


def pydoc_topics() -> str:
    """The documentation topics that ship with every CPython, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_documents(files: list[str], reading: str, text_field: str) -> list[str]:
    """The documents of a ``text``, ``jsonl`` or ``parquet`` corpus, read through datasets.

    Args:
        files: the corpus files, in order.
        reading: ``text`` (one document per file), ``jsonl`` or ``parquet`` (one per record).
        text_field: the column holding the text (jsonl, parquet).

    Returns:
        The documents in file order; raises ValueError naming the field when a file does
        not parse, ``text_field`` is absent, or a record's value is not a string.
    """
    try:
        import datasets
    except ImportError:
        raise ValueError(f"format: got {reading!r}, which needs the package 'datasets' (not installed); "
                         f"expected it installed: {EXTRA_HINT}") from None
    readers = {
        "text": lambda cache: datasets.Dataset.from_text(files, cache_dir=cache, keep_in_memory=True,
                                                         sample_by="document"),
        "jsonl": lambda cache: datasets.Dataset.from_json(files, cache_dir=cache, keep_in_memory=True),
        "parquet": lambda cache: datasets.Dataset.from_parquet(files, cache_dir=cache, keep_in_memory=True),
    }
    column = "text" if reading == "text" else text_field
    with quiet("datasets"), tempfile.TemporaryDirectory(prefix="metalearner-corpus-") as cache:
        try:
            ds = readers[reading](cache)
        except Exception as e:  # noqa: BLE001 - datasets wraps parse errors in its own types
            raise ValueError(f"files: got {files[0]!r}{' ...' if len(files) > 1 else ''}, expected {reading} "
                             f"files datasets can read ({first_line(e)})") from None
    if column not in ds.column_names:
        raise ValueError(f"text_field: got {column!r}, expected a field of the records (they have {ds.column_names})")
    docs = ds[column]
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise ValueError(f"text_field: got {column!r} whose value in record {i} is {short_repr(doc)}, "
                             "expected a string in every record")
    return docs


def corpus_fingerprint(corpus: bytes | list[str]) -> str:
    """sha256 of a corpus as read: of the bytes (the ``bytes`` reading), or of the
    documents, each length-prefixed so that moving text across a boundary counts."""
    if isinstance(corpus, bytes):
        return hashlib.sha256(corpus).hexdigest()
    h = hashlib.sha256()
    for doc in corpus:
        raw = doc.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def encode_documents(tokenizer: Any, docs: list[str], batch: int = 1000) -> np.ndarray:
    """The token ids of ``docs``, each tokenized on its own (no special tokens) and
    followed by the tokenizer's end-of-sequence token (or the tokens of a blank line).

    Returns:
        One int32 array of every document's ids in order (built a batch of documents at a
        time, so a large corpus never becomes one Python list of ints).
    """
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else \
        tokenizer(DOC_SEPARATOR, add_special_tokens=False)["input_ids"]
    chunks = [np.zeros(0, dtype=np.int32)]
    with quiet("transformers"):  # a long document is no error here: it is cut into windows
        for i in range(0, len(docs), batch):
            encoded = tokenizer(docs[i: i + batch], add_special_tokens=False)["input_ids"]
            chunks.append(np.fromiter((t for ids in encoded for t in (*ids, *sep)), dtype=np.int32))
    return np.concatenate(chunks)


@contextmanager
def quiet(package: str) -> Iterator[None]:
    """Silence a package's logger (progress, cache and length warnings) for a block."""
    log = logging.getLogger(package)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        if package == "datasets":
            import datasets

            with _no_progress_bars(datasets):
                yield
        else:
            yield
    finally:
        log.setLevel(level)


@contextmanager
def _no_progress_bars(datasets: Any) -> Iterator[None]:
    were_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not were_off:
            datasets.enable_progress_bars()


def first_line(e: BaseException) -> str:
    """An exception's message on one line, at most 200 characters."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text[:200]


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
