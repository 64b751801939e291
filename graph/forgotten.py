"""The forgotten-users file: users whose data neither serving nor retraining may use again.

``DELETE /v1/users/{id}`` appends the user here (:class:`actors.tombstones.Tombstones`, the
serving side); ``train_job.py --forgotten`` reads it and drops every event of those users before
anything is fitted or written (:func:`graph.data.Dataset.without_users`). Both sides read and
write the records with the functions of this module, so the format exists once.

Format: one record per line, the user id as a JSON string, ASCII only (:func:`encode_record`), so
nothing an id holds (a newline, U+2028, a quote) can end a record early or split it in two. Lines
that are not a JSON string are plain ids, one per line, as versions before the JSON records wrote
them (:func:`parse_record`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Final

import pyarrow.fs as pafs

from graph.artifacts import filesystem
from graph.errors import DataError

FORGOTTEN_FILE: Final = "forgotten_users.txt"
# The serving app's default ``state_dir`` (serve_app.AppArgs) and so the file's default place.
DEFAULT_STATE_DIR: Final = "state"
DEFAULT_FORGOTTEN_PATH: Final = f"{DEFAULT_STATE_DIR}/{FORGOTTEN_FILE}"


def encode_record(user_id: str) -> bytes:
    """One line: the id as an ASCII-only JSON string, then ``\\n``."""
    return (json.dumps(user_id, ensure_ascii=True) + "\n").encode("ascii")


def parse_record(line: str) -> str:
    """A record's user id. A line that is not a JSON string is a plain id of the earlier format
    (and a torn last record is read the same way: an id nobody has, because a torn record was
    never acknowledged)."""
    if line.startswith('"'):
        try:
            value = json.loads(line)
        except ValueError:
            return line
        if isinstance(value, str):
            return value
    return line


def parse_records(data: bytes) -> set[str]:
    """Every user id in the file's bytes."""
    # "\n" only: str.splitlines() would also split at characters a plain id of the earlier
    # format may hold (U+2028, U+0085, ...).
    return {parse_record(line) for line in data.decode("utf-8", "replace").split("\n") if line}


def record_name(user_id: str) -> str:
    """The object holding one user's record on an object store (where the forgotten users are a
    folder of records, since objects cannot be appended to): a hash of the id, so any id is a
    valid object name and forgetting a user twice writes the same object."""
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest() + ".json"


def read_forgotten(path_or_uri: str) -> frozenset[str]:
    """The users listed in a forgotten-users file (a local path or a pyarrow URI), or in a
    folder of such records (the layout on an object store, :func:`record_name`).

    Raises:
        DataError: The file does not exist or cannot be read (a mistyped path must not let a
            retrain use forgotten users silently).
    """
    fs, path = filesystem(path_or_uri)
    kind = fs.get_file_info(path).type
    if kind not in (pafs.FileType.File, pafs.FileType.Directory):
        raise DataError(
            f"forgotten-users file {path_or_uri} does not exist: pass the file the serving app "
            f"writes (<state_dir>/{FORGOTTEN_FILE}, default {DEFAULT_FORGOTTEN_PATH})",
            field="forgotten",
        )
    try:
        if kind == pafs.FileType.File:
            paths = [path]
        else:
            paths = [i.path for i in fs.get_file_info(pafs.FileSelector(path))
                     if i.type == pafs.FileType.File]
        data = bytearray()
        for p in paths:
            with fs.open_input_stream(p) as f:
                data += bytes(f.read())
    except OSError as exc:
        raise DataError(f"forgotten-users file {path_or_uri} could not be read ({exc})",
                        field="forgotten") from exc
    return frozenset(parse_records(bytes(data)))
