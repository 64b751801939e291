"""Items added with ``PUT /v1/items/{id}``, kept under the state root for every ranker replica.

One record per item, a JSON object of its attributes (:class:`graph.new_items.NewItem`), in a
folder (local disk or object store, :mod:`graph.storage`) and named by a hash of the id
(:func:`graph.forgotten.record_name`: any id is a valid file or object name, and a second
``PUT`` of the same id replaces its record). A record is written whole: a temporary file renamed
over it on a local disk, one object ``PUT`` on an object store. Every replica lists the folder
(:meth:`AddedItems.stamp`, names, sizes and times only) about once a second and re-reads it when
the listing changed; a restarted replica reads it at start.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from typing import Any

import pyarrow.fs as pafs

from graph import storage
from graph.forgotten import record_name
from graph.new_items import NewItem

ADDED_ITEMS_DIR = "items"
"""The folder's name under the app's ``state_dir``."""
Stamp = tuple[tuple[str, int, int], ...]


class AddedItems:
    """The folder of added-item records.

    Args:
        path: The folder (local path or URI); None keeps records in memory only (tests, or an
            app without a state root).
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fs: pafs.FileSystem | None = None
        self._folder = ""
        if path is not None:
            self._fs, self._folder = storage.filesystem(path)
        self._memory: dict[str, NewItem] = {}
        self._lock = threading.Lock()

    def put(self, item: NewItem) -> None:
        """Store ``item`` durably (replacing an earlier record of its id) before returning."""
        data = json.dumps(_record(item), ensure_ascii=True, sort_keys=True).encode("ascii")
        with self._lock:
            self._memory[item.item_id] = item
            if self._fs is None:
                return
            name = f"{self._folder}/{record_name(item.item_id)}"
            if isinstance(self._fs, pafs.LocalFileSystem):
                os.makedirs(self._folder, exist_ok=True)
                tmp = f"{self._folder}/.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, name)
            else:
                with self._fs.open_output_stream(name) as out:  # one PUT: all or nothing
                    out.write(data)

    def stamp(self) -> Stamp:
        """What changes when a record is added or replaced: the records' names, sizes and
        modification times."""
        if self._fs is None:
            with self._lock:
                return tuple((k, 0, 0) for k in sorted(self._memory))
        infos = self._fs.get_file_info(pafs.FileSelector(self._folder, allow_not_found=True))
        return tuple(sorted(
            (i.base_name, int(i.size or 0), int(i.mtime_ns or 0)) for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(".json")))

    def load(self) -> list[NewItem]:
        """Every stored item, sorted by id (one order on every replica). A record that cannot be
        read is skipped (it is rewritten by the next ``PUT`` of its id)."""
        if self._fs is None:
            with self._lock:
                return [self._memory[k] for k in sorted(self._memory)]
        out: dict[str, NewItem] = {}
        for name, _, _ in self.stamp():
            try:
                with self._fs.open_input_stream(f"{self._folder}/{name}") as f:
                    item = _parse(json.loads(bytes(f.read())))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            out[item.item_id] = item
        return [out[k] for k in sorted(out)]


def _record(item: NewItem) -> dict[str, Any]:
    return {"item_id": item.item_id, "title": item.title, "category": item.category,
            "brand": item.brand, "price": item.price, "available": item.available}


def _parse(d: dict[str, Any]) -> NewItem:
    price = d.get("price")
    return NewItem(item_id=str(d["item_id"]), title=str(d["title"]), category=str(d["category"]),
                   brand=None if d.get("brand") is None else str(d["brand"]),
                   price=None if price is None else float(price),
                   available=bool(d.get("available", True)))
