"""Where a sweep keeps its files: Ray Tune's ``storage_path`` and the sweep's own folder.

``--storage`` is a local folder or a URI. A URI (``s3://``, ``gs://``, ``hdfs://``, ...,
anything with a scheme other than ``file``) goes to Ray unchanged: Ray and this module
open it with pyarrow's filesystems (``pyarrow.fs.FileSystem.from_uri``), so the bucket's
credentials and endpoint come from the usual places (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, or pyarrow's
query options such as ``?endpoint_override=HOST:PORT``). ``file://PATH`` and plain paths
are local folders, made absolute on the driver.

The sweep's own files (``experiment.yaml``, ``best_ARM.yaml``, ``trial_errors.log`` and
the report) are written to a local folder first: ``STORAGE/NAME-STAMP`` for a local
storage, ``./sweeps/NAME-STAMP`` for a URI storage; for a URI storage that folder is then
copied to ``STORAGE/NAME-STAMP`` (`publish`), so both kinds of storage end up with the
same layout. Standard library and pyarrow only; no ray.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
LOCAL_SWEEPS = "sweeps"  # the local copy of a URI storage's sweep folders (under the working folder)


def is_uri(storage: str) -> bool:
    """True for a remote storage URI (a scheme other than ``file://``)."""
    m = URI_SCHEME.match(storage)
    return bool(m) and m.group(1).lower() != "file"


def storage_root(storage: str | None) -> str:
    """Ray's ``storage_path`` for ``--storage``: a URI unchanged, a local folder absolute.

    Args:
        storage: ``--storage`` as given, or None for ``./ray_results``.
    Returns:
        The URI as given, or the absolute local folder.
    """
    if storage is None:
        return str((Path.cwd() / "ray_results").resolve())
    if is_uri(storage):
        return storage
    if URI_SCHEME.match(storage):
        storage = storage[len("file://"):]
    return str(Path(storage).expanduser().resolve())


def same_storage(a: str, b: str) -> bool:
    """Whether two ``--storage`` values name the same storage: local folders by their absolute
    path (``file://`` or not, relative or not, trailing slash aside), URIs by their text with
    the trailing slash of the path aside.
    """
    def key(storage: str) -> str:
        if not is_uri(storage):
            return storage_root(storage)
        base, sep, query = storage.partition("?")
        return f"{base.rstrip('/')}{sep}{query}"

    return key(a) == key(b)


def experiment_uri(storage: str, name: str) -> str:
    """The folder of the Tune experiment ``name`` under ``storage`` (a URI's query, such as
    ``?endpoint_override=...``, stays at its end, where pyarrow and Ray read it)."""
    if not is_uri(storage):
        return str(Path(storage) / name)
    base, sep, query = storage.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def open_filesystem(location: str) -> tuple[Any, str]:
    """The pyarrow filesystem of a local folder or a URI, and the path on it.

    Returns:
        (``pyarrow.fs.FileSystem``, path): a local folder's absolute path, or the URI's path.
    """
    import pyarrow.fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), storage_root(location)


def sweep_folder(storage: str, name: str) -> Path:
    """The local folder of one sweep's own files (see the module docstring)."""
    if is_uri(storage):
        return (Path.cwd() / LOCAL_SWEEPS / name).resolve()
    return Path(storage) / name


def publish(folder: Path, storage: str, name: str) -> str | None:
    """Copy a sweep's local ``folder`` to ``STORAGE/NAME`` when the storage is a URI.

    Returns:
        The URI the files went to, or None for a local storage (nothing to copy).
    """
    if not is_uri(storage):
        return None
    import pyarrow.fs as pafs

    fs, root = open_filesystem(storage)
    dest = f"{root.rstrip('/')}/{name}"
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(str(folder), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return f"{storage.split('?', 1)[0].rstrip('/')}/{name}"
