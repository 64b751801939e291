"""The machine's cache of derived files: things a process can rebuild from a model version but
that cost seconds to build, kept so that the next process on the machine (a replacement replica,
the next test, an evaluation after training) loads them instead.

Every entry is named by a digest of everything it is built from (the input bytes, the library
versions, the parameters), so a stale entry is never read: a changed input is a different name.
Entries are written to a temporary folder and renamed into place, so a concurrent reader sees
a whole entry or none. A damaged entry is reported and rebuilt; a folder that cannot be written
is reported once per entry and the build is used without being kept. Each kind keeps its
:data:`KEEP_PER_KIND` most recently used entries (model versions come and go).

The folder is ``$INTENTREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/intentrec``, else
``~/.cache/intentrec``; deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "INTENTREC_CACHE_DIR"
KEEP_PER_KIND = 6  # entries per kind: the serving version, a split's, a few rollbacks

T = TypeVar("T")


def cache_dir() -> Path:
    """The machine's cache folder: ``$INTENTREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/intentrec``,
    else ``~/.cache/intentrec``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "intentrec"


def digest(parts: Iterable[bytes | str | memoryview]) -> str:
    """A hex name for the inputs of an entry (BLAKE2b, 20 bytes), length-prefixed part by part
    so that ``("ab", "c")`` and ``("a", "bc")`` differ."""
    h = hashlib.blake2b(digest_size=20)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little") if isinstance(b, bytes) else
                 b.nbytes.to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cached(kind: str, key: str, build: Callable[[], T], save: Callable[[T, Path], None],
           load: Callable[[Path], T], root: Path | None = None) -> T:
    """The entry ``kind/key`` loaded from the cache, else built, stored and returned.

    Args:
        kind: The entry's family (a folder name: ``ann-index``, ``bm25``).
        key: Its name, a :func:`digest` of all it is built from.
        build: Makes the object.
        save: Writes the object into an empty folder.
        load: Reads it back from such a folder; any exception marks the entry damaged.
        root: The cache folder (default :func:`cache_dir`).
    """
    folder = (root or cache_dir()) / kind
    path = folder / key
    if path.is_dir():
        try:
            obj = load(path)
        except Exception as e:  # damaged or from an incompatible library: rebuild and replace
            log.warning("the cached %s %s cannot be loaded (%s: %s); building it again",
                        kind, path, type(e).__name__, e)
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.utime(path)  # most recently used: kept by the pruning below
            return obj
    obj = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder))
        try:
            save(obj, tmp)
            os.replace(tmp, path)  # atomic; a concurrent writer's equal entry may win
        except OSError:
            if not path.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(folder)
    except OSError as e:
        log.warning("cannot keep the %s in %s (%s); every process will build it again: set %s "
                    "to a writable folder", kind, folder, e, CACHE_DIR_ENV)
    return obj


def _prune(folder: Path, keep: int = KEEP_PER_KIND, stale_tmp_s: float = 3600.0) -> None:
    """Keep the ``keep`` most recently used entries; drop the temporary folders of writers that
    died more than ``stale_tmp_s`` ago."""
    import time

    entries, now = [], time.time()
    for p in folder.iterdir():
        try:
            mtime = p.stat().st_mtime
        except OSError:  # removed meanwhile by another process
            continue
        if not p.name.startswith("."):
            entries.append((mtime, p))
        elif now - mtime > stale_tmp_s:
            shutil.rmtree(p, ignore_errors=True)
    for _, old in sorted(entries, reverse=True)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
