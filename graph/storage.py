"""Where intentrec keeps files: a local path, or any ``pyarrow.fs`` URI (``s3://``, ``gs://``,
``abfs://``, ``file://``).

Every component that stores something (model artifacts and ``LATEST``, Ray Train checkpoints,
the session write-ahead log and snapshots, the forgotten-users records) takes a location in this
form, so one storage URI in ``cluster.yaml`` places all of them on shared storage, and local paths
stay the single-machine default.

A URI may carry pyarrow's options for its filesystem, e.g. an S3-compatible server::

    s3://bucket/intentrec?endpoint_override=minio.internal:9000&scheme=http

:func:`join` appends path parts in front of those options, so a sub-location keeps them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import pyarrow.fs as pafs

URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_uri(location: str) -> bool:
    """True for ``scheme://...``; False for a local path."""
    return bool(URI_RE.match(location))


def join(location: str, *parts: str) -> str:
    """``location`` with path parts appended (before a URI's ``?options``)."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    base, sep, query = location.partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it (a local path is made absolute)."""
    if is_uri(location):
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def is_local(location: str) -> bool:
    """True when ``location`` is on this machine's disk (a path or ``file://``)."""
    return not is_uri(location) or location.startswith("file://")


STORAGE_ENV = "INTENTREC_STORAGE"
"""Environment variable with the cluster's shared storage root (``cluster.yaml`` sets it for
``ray start`` on every node, so the Serve app and ``ray job submit`` jobs inherit it)."""


def shared_root(environ: Mapping[str, str] | None = None) -> str | None:
    """The shared storage root from the environment (:data:`STORAGE_ENV`), or None."""
    value = (os.environ if environ is None else environ).get(STORAGE_ENV, "").strip()
    return value or None


def place(location: str, root: str | None) -> str:
    """Where a configured location lives: a URI or an absolute path as given; a relative path
    under ``root`` when there is one (``artifacts`` -> ``s3://bucket/intentrec/artifacts``), else
    made absolute in the working directory (the single-machine default)."""
    if is_uri(location) or os.path.isabs(location):
        return location
    if root:
        return join(root if is_uri(root) else os.path.abspath(root), os.path.normpath(location))
    return os.path.abspath(location)
