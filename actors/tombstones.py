"""Forgotten users: whose personal serving data the ranker must not use again.

``DELETE /v1/users/{id}`` adds the user here; every ranker replica checks it before using a
user's embedding or purchase history, also after a restart or a model reload. The file's format is
:mod:`graph.forgotten`'s, which ``train_job.py --forgotten`` reads to leave the users out of the
next model version.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow.fs as pafs

from actors.clock import Clock, system_clock
from graph import storage
from graph.forgotten import encode_record, parse_records, record_name


class Tombstones:
    """Users forgotten through ``DELETE /v1/users/{id}``: their personal serving data (embedding,
    buy-again history) is not used again, by this replica or any other, also after a reload.

    On a local disk (a path or ``file://``): an append-only file of JSON strings, one per line
    (:mod:`graph.forgotten`, the format ``train_job.py --forgotten`` reads too). Every check
    ``stat``s the file and re-reads it when its size or time changed; the file only grows, so a
    replica whose next request comes after a ``DELETE`` was answered sees it, on any replica of
    the node.

    On an object store (``s3://``, ``gs://``, ``abfs://``; what a cluster uses, so that a node
    lost or replaced loses no forget): object stores cannot append, so the location is a folder
    with one object per forgotten user (named by a hash of the id, holding the same record). The
    replica that answered the ``DELETE`` stops at once; the others list the folder at most every
    ``refresh_s`` seconds of ``clock``, which bounds how long they may still use the user.

    A restarted replica still honours every record. With no path it is in-memory only.

    Args:
        path: The file (local) or folder (object store); None: in memory.
        clock: Time source for the object-store refresh bound (:mod:`actors.clock`).
        refresh_s: Seconds between listings of an object-store folder.
    """

    def __init__(self, path: str | None, clock: Clock = system_clock,
                 refresh_s: float = 1.0) -> None:
        self._users: set[str] = set()
        self._lock = threading.Lock()
        self.path: Path | None = None
        self._objects: tuple[pafs.FileSystem, str] | None = None
        if path is not None and storage.is_local(path):
            self.path = Path(storage.filesystem(path)[1])
        elif path is not None:
            self._objects = storage.filesystem(path)
        self._stamp: tuple[int, int] | None = None
        self._read: set[str] = set()  # object names already read
        self._clock = clock
        self._refresh_s = refresh_s
        self._listed_at: float | None = None
        self.refresh()

    def refresh(self) -> None:
        if self._objects is not None:
            self._refresh_objects()
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with self._lock:
                self._users |= parse_records(self.path.read_bytes())
                self._stamp = stamp

    def _refresh_objects(self) -> None:
        assert self._objects is not None
        now = self._clock()
        if self._listed_at is not None and now - self._listed_at < self._refresh_s:
            return
        fs, folder = self._objects
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        new = [i for i in infos if i.type == pafs.FileType.File and i.base_name not in self._read]
        for info in new:
            with fs.open_input_stream(info.path) as f:
                users = parse_records(bytes(f.read()))
            with self._lock:
                self._users |= users
                self._read.add(info.base_name)
        self._listed_at = now

    def add(self, user_id: str) -> None:
        """Record the user durably (before this returns), then stop using them here."""
        with self._lock:
            if self._objects is not None:
                fs, folder = self._objects
                name = record_name(user_id)
                with fs.open_output_stream(f"{folder}/{name}") as f:  # one PUT: all or nothing
                    f.write(encode_record(user_id))
                self._read.add(name)
            elif self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    record = encode_record(user_id)
                    size = os.fstat(fd).st_size
                    # A torn last record (a crash mid-write) must not swallow this one.
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        record = b"\n" + record
                    os.write(fd, record)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._users.add(user_id)

    def __contains__(self, user_id: object) -> bool:
        self.refresh()
        return user_id in self._users
