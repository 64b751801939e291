"""Write-ahead log storage of a session shard: a local append-only file, or one object per commit.

:class:`SessionLog` is what :class:`actors.session_state.ShardState` writes its log records and
snapshots through (it encodes and replays them; this module only stores bytes);
:func:`open_log` picks the implementation from ``wal_uri``:

- Local paths (or ``file://``): :class:`LocalLog`, one append-only NDJSON file per log
  generation, written with ``os.write`` and ``fdatasync``. A torn last line (the process died
  mid-write; it was never acknowledged) is cut off with :meth:`SessionLog.truncate` on restore.
- Any other ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://...``): :class:`ObjectLog`. Object
  stores cannot append, so each commit is written as its own small segment object
  (``wal-<first_seq>.jsonl``, durable when the upload completes) and snapshots compact them.
  Latency is one PUT per commit.
- ``fsync=False`` still survives the actor process being killed (the page cache belongs to the
  kernel), not a machine crash.
- A local path is local to the node the shard runs on: on a multi-node cluster use a shared mount
  or an object-store URI, or a shard rescheduled to another node starts empty.

Each shard has its own directory ``shard-<i>-of-<n>`` under ``wal_uri``.

Every record of a ``.jsonl`` file (log segments and snapshots) is one line prefixed with the
CRC-32 of its JSON (:func:`frame`, :func:`unframe`), so a record damaged on disk is detected, not
replayed: the shard sets it aside in a ``quarantine-*.bad`` file, counts it and keeps every good
record (:mod:`actors.session_state`). Lines written before checksums existed (plain JSON) are still
read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import pyarrow.fs as pafs

from graph.errors import ConfigError

logger = logging.getLogger(__name__)

URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
QUARANTINE_PREFIX = "quarantine-"


class CorruptRecordError(ValueError):
    """A log or snapshot line whose checksum does not match its bytes."""


def frame(data: bytes) -> bytes:
    """Newline-terminated JSON records, each prefixed with its CRC-32 (``"%08x "``)."""
    lines = data.split(b"\n")
    return b"".join(b"%08x %s\n" % (zlib.crc32(line), line) for line in lines[:-1]) + lines[-1]


def unframe(line: bytes) -> bytes:
    """The JSON of one framed line (without its newline); a plain JSON line (written before
    checksums) is returned as it is.

    Raises:
        CorruptRecordError: The checksum is missing, malformed or does not match.
    """
    if line.startswith(b"{"):
        return line
    head, sep, body = line.partition(b" ")
    if not sep or len(head) != 8:
        raise CorruptRecordError("no checksum prefix")
    try:
        want = int(head, 16)
    except ValueError:
        raise CorruptRecordError(f"malformed checksum {head[:8]!r}") from None
    got = zlib.crc32(body)
    if got != want:
        raise CorruptRecordError(f"checksum mismatch (stored {want:08x}, computed {got:08x})")
    return body


def _framed(name: str, chunk: bytes) -> bytes:
    # Records (.jsonl) are framed; a quarantine file keeps the damaged bytes exactly as found.
    return frame(chunk) if name.endswith(".jsonl") else chunk


# --------------------------------------------------------------------------------------------
# Log storage: a local append-only file, or one object per commit on a pyarrow filesystem
# --------------------------------------------------------------------------------------------


class SessionLog(Protocol):
    """A shard's log directory: append-only segments, snapshots written atomically, by name."""

    def names(self) -> list[str]: ...
    def read(self, name: str) -> bytes: ...
    def open_segment(self, first_seq: int) -> str: ...
    def append(self, data: bytes, first_seq: int) -> None: ...
    def write_atomic(self, name: str, chunks: Iterable[bytes]) -> None: ...
    def delete(self, name: str) -> None: ...
    def truncate(self, name: str, size: int) -> None: ...
    def close(self) -> None: ...


def _segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.jsonl"


class LocalLog:
    """Append-only files on a local disk: ``os.write`` of a whole commit, then ``fdatasync``."""

    def __init__(self, directory: str, fsync: bool) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._fd: int | None = None
        self._size = 0
        self.segment = ""

    def names(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_file())

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def _sync_dir(self) -> None:
        if self.fsync:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def open_segment(self, first_seq: int) -> str:
        self.close()
        self.segment = _segment_name(first_seq)
        self._fd = os.open(self.dir / self.segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._sync_dir()  # the new file's directory entry must be durable too
        return self.segment

    def append(self, data: bytes, first_seq: int) -> None:
        if self._fd is None:
            self.open_segment(first_seq)
        assert self._fd is not None
        data = frame(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError:
            # Drop a partial commit so later records never follow a torn line.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                logger.exception("could not truncate %s after a failed write", self.segment)
            raise
        self._size += len(data)

    def write_atomic(self, name: str, chunks: Iterable[bytes]) -> None:
        tmp = self.dir / (name + ".tmp")
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(_framed(name, chunk))
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        self._sync_dir()

    def delete(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)

    def truncate(self, name: str, size: int) -> None:
        os.truncate(self.dir / name, size)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ObjectLog:
    """A ``pyarrow.fs`` filesystem (object stores cannot append): one object per commit."""

    def __init__(self, fs: pafs.FileSystem, base: str) -> None:
        self.fs = fs
        self.base = base.rstrip("/")
        self.fs.create_dir(self.base, recursive=True)

    def _path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def names(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._path(name)) as f:
            return bytes(f.readall())

    def open_segment(self, first_seq: int) -> str:
        return _segment_name(first_seq)

    def append(self, data: bytes, first_seq: int) -> None:
        # An object becomes visible only when its upload completes: a commit is all or nothing.
        with self.fs.open_output_stream(self._path(_segment_name(first_seq))) as f:
            f.write(frame(data))

    def write_atomic(self, name: str, chunks: Iterable[bytes]) -> None:
        tmp = self._path(name + ".tmp")
        with self.fs.open_output_stream(tmp) as f:
            for chunk in chunks:
                f.write(_framed(name, chunk))
        self.fs.move(tmp, self._path(name))

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self._path(name))

    def truncate(self, name: str, size: int) -> None:
        with self.fs.open_input_stream(self._path(name)) as f:
            data = f.read(size)
        with self.fs.open_output_stream(self._path(name)) as f:
            f.write(data)

    def close(self) -> None:
        pass


def open_log(
    wal_uri: str, shard: int, num_shards: int, fsync: bool, filesystem: pafs.FileSystem | None
) -> SessionLog:
    """The log of shard ``shard`` of ``num_shards`` under ``wal_uri`` (see the module docstring).

    Args:
        wal_uri: ``SessionStateConfig.wal_uri``: a local path, ``file://`` or a pyarrow fs URI.
        shard: The shard's index.
        num_shards: The number of shards (part of the directory name).
        fsync: ``SessionStateConfig.fsync`` (local logs only).
        filesystem: Write through this pyarrow filesystem, ``wal_uri`` being a path inside it.

    Raises:
        ConfigError: ``wal_uri`` cannot be opened.
    """
    sub = f"shard-{shard:04d}-of-{num_shards:04d}"
    uri = wal_uri
    if filesystem is not None:
        return ObjectLog(filesystem, f"{uri.rstrip('/')}/{sub}")
    if not URI_RE.match(uri):
        return LocalLog(os.path.join(os.path.abspath(uri), sub), fsync)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"wal_uri ({uri!r}) cannot be opened: {exc}", "wal_uri") from exc
    if isinstance(fs, pafs.LocalFileSystem):
        return LocalLog(os.path.join(path, sub), fsync)
    return ObjectLog(fs, f"{path.rstrip('/')}/{sub}")
