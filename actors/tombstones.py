"""Forgotten users: whose personal serving data the ranker must not use again.

``DELETE /v1/users/{id}`` adds the user here; every ranker replica checks it before using a
user's embedding or purchase history, also after a restart or a model reload.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class Tombstones:
    """Users forgotten through ``DELETE /v1/users/{id}``: their personal serving data (embedding,
    buy-again history) is not used again, by this replica or any other, also after a reload.

    Kept in an append-only file so every ranker replica sees a deletion on its next request
    (one ``stat`` per check) and a restarted replica still honours it. With no path it is
    in-memory only (unit tests).
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
                self._users = set(self.path.read_text().splitlines()) | self._users
                self._stamp = stamp

    def add(self, user_id: str) -> None:
        with self._lock:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    os.write(fd, (user_id + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._users.add(user_id)

    def __contains__(self, user_id: object) -> bool:
        self.refresh()
        return user_id in self._users
