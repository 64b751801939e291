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

from graph.forgotten import encode_record, parse_records


class Tombstones:
    """Users forgotten through ``DELETE /v1/users/{id}``: their personal serving data (embedding,
    buy-again history) is not used again, by this replica or any other, also after a reload.

    Kept in an append-only file of JSON strings, one per line (:mod:`graph.forgotten`, the format
    ``train_job.py --forgotten`` reads too). Every check ``stat``s the file and re-reads it when
    its size or time changed; the file only grows, so a replica whose next request comes after
    a ``DELETE`` was answered sees it, on any replica of the node. On several nodes the file
    must be on a shared mount, and the bound is that mount's attribute cache (NFS: ``actimeo``).
    A restarted replica still honours it. With no path it is in-memory only (unit tests).
    """

    def __init__(self, path: str | None) -> None:
        self.path = None if path is None else Path(path)
        self._users: set[str] = set()
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
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

    def add(self, user_id: str) -> None:
        with self._lock:
            if self.path is not None:
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
