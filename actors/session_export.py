"""Export the accepted online events from the session state's write-ahead log to the canonical
events schema (SPEC.md "Data"), read-only, for ``train_job.py --online-events``.

Each shard directory (``shard-<i>-of-<n>``, :func:`actors.session_log.open_log`) holds its
newest snapshot and the log segments after it. The export reads both without taking a lock or
changing a byte (a torn last line, which the shard itself would cut off on restore, is skipped),
so it can run against a live app's log. What it holds is what the session state keeps: the
events of sessions still in their window and each user's recent history, not an archive.

Rules:
- each event once, by its ``event_id`` (a session event and the same event in a user's history
  are one);
- a user forgotten through ``DELETE /v1/users/{id}`` (a ``forget`` record) loses every event of
  the sessions they had, as the shard does;
- an event without a ``user_id`` (an anonymous session) is kept under the user
  ``session:<session_id>``, so that the session's co-occurrences reach the graph;
- the events' ``device`` and ``region`` (posted with the event) become the optional context
  columns when any event has one, so that the retrain learns their department lifts.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.fs as pafs

from actors.session_events import SessionEvent, event_from_json
from actors.session_log import URI_RE, unframe
from graph import schema as S
from graph.errors import ConfigError

log = logging.getLogger(__name__)

SHARD_DIR = re.compile(r"^shard-\d{4}-of-\d{4}$")
ANONYMOUS_USER_PREFIX = "session:"


@dataclass
class ExportReport:
    """What an export found."""

    shards: int = 0
    events: int = 0
    users: int = 0
    anonymous_events: int = 0
    forgotten_users: int = 0
    skipped_records: int = 0
    sources: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.events:,} online events of {self.users:,} users from {self.shards} session "
                f"shard(s) ({self.anonymous_events:,} from anonymous sessions; "
                f"{self.forgotten_users} forgotten user(s) left out"
                + (f"; {self.skipped_records} unreadable record(s) skipped" if self.skipped_records
                   else "") + ")")


def _filesystem(wal_uri: str) -> tuple[pafs.FileSystem, str]:
    if not URI_RE.match(wal_uri):
        return pafs.LocalFileSystem(), os.path.abspath(wal_uri)
    try:
        return pafs.FileSystem.from_uri(wal_uri)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--online-events ({wal_uri!r}) cannot be opened: {exc}; give the "
                          "session state's wal_uri (serve_config.yaml: session.wal_uri)",
                          field="online_events") from exc


def _lines(fs: pafs.FileSystem, path: str) -> Iterator[bytes]:
    with fs.open_input_stream(path) as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # a torn last record: never acknowledged
    for line in data.split(b"\n"):
        if line.strip():
            yield line


def read_online_events(wal_uri: str) -> tuple[list[SessionEvent], ExportReport]:
    """Every event the session state's log under ``wal_uri`` holds (see the module rules).

    Raises:
        ConfigError: ``wal_uri`` has no shard directories (names the path and the fix).
    """
    fs, root = _filesystem(wal_uri)
    info = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    shard_dirs = sorted(i.path for i in info
                        if i.type == pafs.FileType.Directory and SHARD_DIR.match(i.base_name))
    if not shard_dirs:
        raise ConfigError(
            f"no session shard directories (shard-<i>-of-<n>) under {wal_uri!r}: give the session "
            "state's wal_uri, the folder the serving app writes its write-ahead log to "
            "(serve_config.yaml: session.wal_uri)", field="online_events")
    report = ExportReport(shards=len(shard_dirs))
    events: dict[str, SessionEvent] = {}
    forgotten: set[str] = set()
    for shard in shard_dirs:
        files = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(shard))
                       if i.type == pafs.FileType.File and i.base_name.endswith(".jsonl"))
        snapshots = [n for n in files if n.startswith("snapshot-")]
        names = snapshots[-1:] + [n for n in files if n.startswith("wal-")]
        for name in names:
            report.sources.append(f"{shard}/{name}")
            for line in _lines(fs, f"{shard}/{name}"):
                try:
                    rec = json.loads(unframe(line))  # checksummed records (session_log)
                    kind = rec["t"]
                    if kind in ("session", "user", "append"):
                        for d in rec["events"]:
                            ev = event_from_json(d)
                            events.setdefault(ev.event_id, ev)
                    elif kind == "forget":
                        forgotten.add(rec["user_id"])
                        _forget(events, rec["user_id"])
                except (ValueError, KeyError, TypeError) as exc:
                    report.skipped_records += 1
                    log.warning("skipping an unreadable record in %s/%s: %s", shard, name, exc)
    out = sorted(events.values(), key=lambda e: (e.ts, e.seq))
    report.events = len(out)
    report.anonymous_events = sum(e.user_id is None for e in out)
    report.users = len({e.user_id or ANONYMOUS_USER_PREFIX + e.session_id for e in out})
    report.forgotten_users = len(forgotten)
    return out, report


def _forget(events: dict[str, SessionEvent], user_id: str) -> None:
    """Drop a forgotten user's events and every event of the sessions they had (the shard's
    rule), from what was read so far; later records of the user are new events."""
    sessions = {e.session_id for e in events.values() if e.user_id == user_id}
    for eid in [eid for eid, e in events.items()
                if e.user_id == user_id or e.session_id in sessions]:
        del events[eid]


def to_canonical(events: list[SessionEvent]) -> pd.DataFrame:
    """Canonical events rows (``user_id``, ``item_id``, ``ts``, ``event``, ``session_id``,
    ``query``, and ``device`` / ``region`` when any event carries one); an anonymous session's
    events go to the user ``session:<session_id>``."""
    out = pd.DataFrame({
        S.USER_COL: [e.user_id or ANONYMOUS_USER_PREFIX + e.session_id for e in events],
        S.ITEM_COL: pd.Series([e.item_id for e in events], dtype="object"),
        S.TS_COL: pd.to_datetime([e.ts for e in events], unit="s", utc=True).tz_localize(None),
        S.EVENT_COL: [e.event for e in events],
        S.SESSION_COL: [e.session_id for e in events],
        S.QUERY_COL: pd.Series([e.query for e in events], dtype="object"),
    })
    for col, values in ((S.DEVICE_COL, [e.device for e in events]),
                        (S.REGION_COL, [e.region for e in events])):
        if any(v is not None for v in values):
            out[col] = pd.Series(values, dtype="object")
    return out


def export_online_events(wal_uri: str, output: str) -> ExportReport:
    """Write the online events under ``wal_uri`` to ``output`` (Parquet, canonical schema)."""
    events, report = read_online_events(wal_uri)
    df = to_canonical(events)
    if "://" not in output:
        os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    df.to_parquet(output, index=False)
    return report
