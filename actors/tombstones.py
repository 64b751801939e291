"""Forgotten users: whose personal serving data the ranker must not use again.

``DELETE /v1/users/{id}`` adds the user here; every ranker replica checks it before using a
user's embedding or purchase history, also after a restart or a model reload.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


def _record(user_id: str) -> bytes:
    """One line per user: the id as a JSON string, ASCII only, so that nothing an id holds (a
    newline, U+2028, a quote) can end the record early or split it in two."""
    return (json.dumps(user_id, ensure_ascii=True) + "\n").encode("ascii")


def _parse(line: str) -> str:
    """A record's user id. A line that is not a JSON string is a plain id, one per line, as
    versions before the JSON records wrote them (and as a torn last record is read: an id nobody
    has, because a torn record was never acknowledged)."""
    if line.startswith('"'):
        try:
            value = json.loads(line)
        except ValueError:
            return line
        if isinstance(value, str):
            return value
    return line


class Tombstones:
    """Users forgotten through ``DELETE /v1/users/{id}``: their personal serving data (embedding,
    buy-again history) is not used again, by this replica or any other, also after a reload.

    Kept in an append-only file of JSON strings, one per line (:func:`_record`), so every ranker
    replica sees a deletion on its next request (one ``stat`` per check) and a restarted replica
    still honours it. With no path it is in-memory only (unit tests).
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
                # "\n" only: str.splitlines() would also split at characters a plain id of the
                # earlier format may hold (U+2028, U+0085, ...).
                lines = self.path.read_bytes().decode("utf-8", "replace").split("\n")
                self._users |= {_parse(line) for line in lines if line}
                self._stamp = stamp

    def add(self, user_id: str) -> None:
        with self._lock:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    record = _record(user_id)
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
