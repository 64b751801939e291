"""Session state of the online path: sharded, bounded per session, durable across actor crashes.

The session layer is three modules:

- :mod:`actors.session_events`: the event model (:class:`~actors.session_events.SessionEvent`,
  validation, ``event_id`` derivation) and routing (:func:`~actors.session_events.shard_for`).
- :mod:`actors.session_log`: the write-ahead log storage (a local append-only file, or one object
  per commit on a ``pyarrow.fs`` filesystem).
- this module: the configuration, the shards and the client.

Layout:

- :class:`SessionShard` is a named, detached Ray actor. Shard ``i`` of ``n`` holds, for the
  sessions and users routed to it, a time-ordered window of recent events per session (bounded by
  ``window`` and ``ttl_seconds``, LRU-bounded by ``max_sessions_per_shard``) and a short history
  per user (``user_history`` events across sessions).
- :class:`ShardState` is the shard's logic as a plain class (no Ray), so unit tests and the
  benchmark drive it directly; the actor only adds the asyncio plumbing (group commit).
- :class:`SessionStore` is the client the Serve ingress uses: it routes by a stable hash and fans
  out. It keeps one call in flight per shard and kind (append / read): requests that arrive while
  one is in flight go out together in the next call (no timer, so a lone request leaves at once).
  Under load that turns many actor calls into few, which is where a Serve ingress spends its CPU;
  each request still gets its own result or error, and the shard group-commits a combined append
  as one fsync. Those reads and appends go to a gRPC port the shard opens on its node
  (:mod:`actors.shard_channel`), about 1 ms of CPU less per call than a Ray actor call; any call
  the port cannot take is resent as a Ray actor call, and the rest (claims, forgets, stats) are
  Ray calls.

Routing: a session lives on ``blake2b(session_id) % num_shards``; a user's history lives on the
user's *home* shard ``blake2b(user_id) % num_shards``. An event with a user is written to both
(one call when they coincide), so a read needs at most two calls, never a fan-out. Events posted
without a session are filed under the user's implicit session ``"user:<user_id>"``, which is
routed to the user's home shard (one call for user-only requests). Changing ``num_shards`` starts
from empty state: every shard directory is named ``shard-<i>-of-<n>``.

Durability (write-ahead log): ``append`` assigns sequence numbers, writes the batch to the log
(write + flush + fsync when ``fsync``), applies it to memory and only then returns: an acknowledged
event is on disk. On start (also after a crash: ``max_restarts=-1``) the shard loads its newest
snapshot and replays the log records after it. Every ``snapshot_every`` appended events the memory
image is written as a snapshot and the older log is deleted. A torn last record (the process died
mid-write; it was never acknowledged) is ignored with a warning and truncated away on restore.
How the log is stored (local files or object-store segments, what ``fsync=False`` survives) is
described in :mod:`actors.session_log`.

Idempotency: every event carries an ``event_id`` (client-supplied, or derived:
:mod:`actors.session_events`). A shard remembers the last ``dedupe_capacity`` ids with the sequence
number and time they got; re-appending a known id returns the original ``(seq, event_id)`` and
stores nothing. That is what makes ``max_task_retries=-1`` safe, and the resend over Ray of an
append whose gRPC call failed: a retried append after a crash cannot duplicate events. An event the
server stamped (posted without ``ts`` and ``event_id``) carries a ``dedupe_key`` instead: it is a
duplicate of a stored event with that key less than ``dedupe_window_s`` away in time (on the
injected clock that stamped both), else it is stored under a new id
(:func:`actors.session_events.window_event_ids`). An ``Idempotency-Key`` is *claimed* on the shard
its hash picks, with a fingerprint of the request body: the same key with another body is a
:class:`~graph.errors.ConflictError` (409); the last ``dedupe_capacity`` keys per shard are
remembered, durably like events.

Forgetting a user writes a tombstone to the log, drops every session the user appeared in and the
user's history from memory, and compacts before acknowledging, so the user's events are gone from
disk too (replaying the tombstone covers a crash in between).

Record formats (one JSON object per line):
``{"t": "append", "events": [{"seq", "event_id", "roles", "user_id", "session_id", "item_id",
"event", "ts", "query"}, ...]}``, ``{"t": "forget", "seq", "user_id"}``, ``{"t": "key", "seq",
"key", "fp"}`` (a claimed idempotency key, hashed, and its body fingerprint); a snapshot is a
header ``{"t": "snapshot", "version", "shard", "num_shards", "last_seq"}`` then ``session``,
``user``, ``seen`` (``[event_id, seq, user_id, ts]``) and ``keys`` lines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import pyarrow.fs as pafs
import ray
from pydantic import BaseModel, ConfigDict, field_validator

from actors.clock import Clock, system_clock
from actors.session_events import (
    SessionEvent,
    check_id,
    default_session_key,
    event_from_json,
    event_to_json,
    insert_ordered,
    shard_for,
    stable_hash,
    validate_event,
    window_event_ids,
)
from actors.session_log import QUARANTINE_PREFIX, URI_RE, open_log, unframe
from actors.shard_channel import Endpoint, ShardChannel, ShardServer
from graph.errors import (
    BadRequestError,
    ConfigError,
    ConflictError,
    IntentrecError,
    UnavailableError,
)

logger = logging.getLogger(__name__)

ROLE_SESSION: Final = 1
ROLE_USER: Final = 2
_SNAPSHOT_VERSION: Final = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

_RANGES: Final[dict[str, tuple[float, float, str]]] = {
    "num_shards": (1, 1024, "use about one shard per 2-4 serving replicas, e.g. 4"),
    "window": (1, 10_000, "a session window of 20-100 events is typical, e.g. 50"),
    "ttl_seconds": (1, 30 * 86_400, "sessions are usually 30 min of inactivity: 1800"),
    "user_history": (0, 10_000, "use e.g. 50 (0 keeps no per-user history)"),
    "max_sessions_per_shard": (1, 10_000_000, "bound memory per shard, e.g. 100000"),
    "max_users_per_shard": (1, 10_000_000, "bound memory per shard, e.g. 100000"),
    "dedupe_capacity": (0, 10_000_000, "keep at least the events of a few retry windows, e.g. 100000"),
    "dedupe_window_s": (0, 3600, "a client's retries come within seconds: use e.g. 10 (0 = off)"),
    "max_clock_skew_seconds": (0, 86_400, "use e.g. 300"),
    "snapshot_every": (1, 10_000_000, "use e.g. 10000"),
    "num_cpus": (0, 64, "session shards are I/O bound: use 0"),
    "call_timeout_s": (0.1, 3600, "keep it below the HTTP request timeout, e.g. 5"),
}


class SessionStateConfig(BaseModel):
    """Configuration of the session-state layer (strict: unknown keys are errors).

    Args:
        num_shards: Number of shard actors. Changing it starts from empty state.
        window: Events kept per session (the most recent by event time).
        ttl_seconds: Events older than this (by ``ts``) leave the window; a session whose newest
            event is older is evicted.
        user_history: Events kept per user across sessions (0: none).
        max_sessions_per_shard: Memory bound: least recently used sessions are evicted beyond it.
        max_users_per_shard: Memory bound on per-user histories, LRU as well.
        dedupe_capacity: Event ids (and idempotency keys) remembered per shard for idempotent
            retries.
        dedupe_window_s: An event posted without ``ts`` and ``event_id`` (the server stamps its
            time) is a retry of a stored one with the same session, user, event type, item and
            query whose server time is at most this many seconds away, and is not stored again.
            Measured on the injected server clock. 0: such events are never deduplicated.
        max_clock_skew_seconds: How far in the future an event's ``ts`` may be.
        wal_uri: Log directory: a local path (relative paths are made absolute by the client),
            ``file:///abs/path``, or a pyarrow filesystem URI such as ``s3://bucket/prefix``.
        fsync: fdatasync the local log before acknowledging (survives power loss, not just a
            process kill).
        snapshot_every: Compact the log into a snapshot after this many appended events.
        namespace: Ray namespace of the shard actors.
        actor_prefix: Shard ``i`` of ``n`` is the actor ``<actor_prefix>-<i>-of-<n>``.
        num_cpus: CPUs reserved per shard actor.
        call_timeout_s: Client-side limit for one shard call (including a restart wait); keep
            it below the HTTP request timeout, so that a down shard gives a 503 (events) or a
            degraded answer (recommendations) instead of the proxy's timeout.
        transport: How the client sends the two calls every request makes (session reads and
            event appends): ``grpc`` straight to a port each shard opens on its node's Ray
            address, with a token handed out over Ray (:mod:`actors.shard_channel`; about 1 ms
            of CPU less per call than a Ray actor call), falling back to a Ray call whenever the
            port cannot be used; ``ray``: Ray actor calls only (when the nodes' firewall lets
            only Ray's own ports through).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_shards: int = 4
    window: int = 50
    ttl_seconds: float = 1800.0
    user_history: int = 50
    max_sessions_per_shard: int = 100_000
    max_users_per_shard: int = 100_000
    dedupe_capacity: int = 100_000
    dedupe_window_s: float = 10.0
    max_clock_skew_seconds: float = 300.0
    wal_uri: str = "./state/sessions"
    fsync: bool = True
    snapshot_every: int = 10_000
    namespace: str = "intentrec"
    actor_prefix: str = "intentrec-session"
    num_cpus: float = 0.0
    call_timeout_s: float = 5.0
    transport: Literal["grpc", "ray"] = "grpc"

    @field_validator(*_RANGES)
    @classmethod
    def _in_range(cls, v: float, info: Any) -> float:
        lo, hi, fix = _RANGES[info.field_name]
        if not lo <= v <= hi:
            raise ValueError(f"{info.field_name} ({v}) must be between {lo} and {hi}; {fix}")
        return v

    @field_validator("wal_uri")
    @classmethod
    def _wal_uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("wal_uri ('') must name a directory, e.g. './state/sessions' or s3://b/p")
        return v

    @field_validator("namespace", "actor_prefix")
    @classmethod
    def _name(cls, v: str, info: Any) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{info.field_name} ({v!r}) must be 1-100 letters, digits, '.', '_' or '-'")
        return v

    def shard_name(self, index: int) -> str:
        """Actor name of shard ``index``."""
        return f"{self.actor_prefix}-{index}-of-{self.num_shards}"

    def resolved(self) -> SessionStateConfig:
        """This config with a relative local ``wal_uri`` made absolute (in the caller's cwd)."""
        if URI_RE.match(self.wal_uri) or os.path.isabs(self.wal_uri):
            return self
        return self.model_copy(update={"wal_uri": os.path.abspath(self.wal_uri)})


# --------------------------------------------------------------------------------------------
# The shard's logic (plain Python)
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Session:
    events: deque[SessionEvent]
    users: set[str] = field(default_factory=set)
    last_ts: float = 0.0


@dataclass(slots=True)
class _Staged:
    """One operation between sequencing and applying: its log record and its eventual result."""

    kind: str  # "append" | "forget" | "claim"
    record: bytes  # b"" when there is nothing to write (all duplicates, unknown user, a retry)
    first_seq: int
    events: list[tuple[SessionEvent, int]] = field(default_factory=list)
    stored: list[tuple[int, str]] = field(default_factory=list)  # (seq, event_id) per event
    user_id: str | None = None
    claim: tuple[str, str] | None = None  # (hashed key, body fingerprint)


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What forgetting a user removed from session state (memory and log).

    Args:
        sessions: Session windows dropped (the user's implicit session included). A session
            lives on one shard, so counts of several shards add up.
        event_ids: Distinct events removed: the windows' events (anonymous ones of those
            sessions included) and the user's history, which holds copies of the same events.
    """

    sessions: int = 0
    event_ids: frozenset[str] = frozenset()

    def __or__(self, other: Forgotten) -> Forgotten:
        return Forgotten(self.sessions + other.sessions, self.event_ids | other.event_ids)

    @property
    def events(self) -> int:
        """How many distinct events were removed."""
        return len(self.event_ids)


class ShardState:
    """Sessions, user histories and the write-ahead log of one shard; no Ray involved.

    Operations go through three steps so the actor can group-commit: :meth:`stage` (validate,
    deduplicate, assign sequence numbers, encode), :meth:`write` (blocking I/O only; touches no
    in-memory state) and :meth:`apply`. :meth:`append` and :meth:`forget_user` run all three.

    Args:
        config: The store configuration.
        shard_index: This shard's index in ``[0, num_shards)``.
        clock: Unix-seconds clock (tests inject one to exercise the TTL).
        filesystem: Write the log through this pyarrow filesystem, one object per commit, with
            ``wal_uri`` as a path inside it (tests use it for the object-store path).
    """

    def __init__(
        self,
        config: SessionStateConfig,
        shard_index: int,
        *,
        clock: Clock = system_clock,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        if not 0 <= shard_index < config.num_shards:
            raise ConfigError(f"shard_index ({shard_index}) must be in [0, {config.num_shards})")
        self.config = config
        self.shard_index = shard_index
        self._clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._users: OrderedDict[str, deque[SessionEvent]] = OrderedDict()
        self._user_sessions: dict[str, set[str]] = {}
        # event_id -> (seq, user_id, ts) of stored events; ts None: restored from a snapshot of a
        # release that did not keep it.
        self._seen: OrderedDict[str, tuple[int, str | None, float | None]] = OrderedDict()
        self._pending: dict[str, tuple[int, float]] = {}  # staged but not yet applied
        # Claimed idempotency keys (hashed) -> body fingerprint; staged claims apart.
        self._keys: OrderedDict[str, str] = OrderedDict()
        self._pending_keys: dict[str, str] = {}
        # Users whose events may be on disk (latest snapshot + log since): forget_user must
        # compact for them even when memory no longer holds them.
        self._disk_users: set[str] = set()
        self._next_seq = 1
        self._since_snapshot = 0
        self._forget_pending = False
        # The previous snapshot and the log since it are kept on disk as a fallback for a
        # damaged latest snapshot (install_snapshot); a forget must then compact even for a user
        # no longer in memory, so that no older generation keeps the user's events.
        self._older_generation = False
        self.counters: dict[str, float] = dict.fromkeys(
            ("appended", "commits", "duplicates", "evicted_lru", "evicted_ttl", "forgotten_events",
             "snapshots", "restored_snapshot_seq", "restored_records", "torn_records", "corrupt_records",
             "corrupt_snapshots", "quarantined_bytes", "restore_seconds"), 0,
        )  # fmt: skip
        self._log = open_log(config.wal_uri, shard_index, config.num_shards, config.fsync, filesystem)
        self._restore()

    # --- staging -----------------------------------------------------------------------

    def stage(self, op: tuple[str, Any, Any]) -> _Staged:
        """Sequence one operation: ``("append", events, roles)``, ``("forget", user_id, None)`` or
        ``("claim", key, fingerprint)``."""
        kind, a, b = op
        if kind == "append":
            return self._stage_append(a, b)
        if kind == "forget":
            return self._stage_forget(a)
        if kind == "claim":
            return self._stage_claim(a, b)
        raise BadRequestError(f"unknown shard operation {kind!r}")

    def _known(self, event_id: str) -> tuple[int, float | None] | None:
        """``(seq, ts)`` of a stored or staged event id, else None."""
        seen = self._seen.get(event_id)
        if seen is not None:
            return seen[0], seen[2]
        return self._pending.get(event_id)

    def _window_match(self, ev: SessionEvent) -> tuple[str, tuple[int, float | None] | None]:
        """For a server-stamped event: the id it is stored under if new, and the stored
        occurrence it repeats within ``dedupe_window_s`` (``(seq, ts)``), if any."""
        window = self.config.dedupe_window_s
        ids = window_event_ids(ev.dedupe_key, ev.ts, window)
        for eid in ids:
            known = self._known(eid)
            if known is not None and known[1] is not None and abs(known[1] - ev.ts) <= window:
                return eid, known
        return ids[0], None

    def _stage_append(self, events: Sequence[SessionEvent], roles: Sequence[int] | None) -> _Staged:
        now = self._clock()
        if roles is not None and len(roles) != len(events):
            raise BadRequestError(f"roles ({len(roles)}) must match events ({len(events)})", "roles")
        checked = [
            validate_event(ev, f"events[{i}]", now, self.config.max_clock_skew_seconds)
            for i, ev in enumerate(events)
        ]
        staged = _Staged("append", b"", self._next_seq)
        for i, ev in enumerate(checked):
            if ev.event_id:
                known = self._known(ev.event_id)
            else:  # stamped by the server: a retry may carry another time, within the window
                eid, known = self._window_match(ev)
                ev = replace(ev, event_id=eid, dedupe_key="")
            if known is None:
                seq = self._next_seq
                self._next_seq += 1
                self._pending[ev.event_id] = (seq, ev.ts)
                staged.events.append(
                    (replace(ev, seq=seq), ROLE_SESSION | ROLE_USER if roles is None else roles[i])
                )
                if ev.user_id is not None:
                    self._disk_users.add(ev.user_id)
            else:
                seq = known[0]
                self.counters["duplicates"] += 1
            staged.stored.append((seq, ev.event_id))
        if staged.events:
            rec = {"t": "append", "events": [event_to_json(e, r) for e, r in staged.events]}
            staged.record = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
            staged.first_seq = staged.events[0][0].seq
        return staged

    def _stage_claim(self, key: str, fingerprint: str) -> _Staged:
        """Claim an idempotency key (hashed by the client) for a request body's fingerprint."""
        staged = _Staged("claim", b"", self._next_seq, claim=(key, fingerprint))
        first = self._keys.get(key) or self._pending_keys.get(key)
        if first is not None:
            if first != fingerprint:
                raise ConflictError(
                    "this Idempotency-Key was first sent with another request body; a retry must "
                    "repeat the request exactly, and a new request needs a new key",
                    "Idempotency-Key",
                )
            return staged  # a retry: nothing to write
        seq = self._next_seq
        self._next_seq += 1
        self._pending_keys[key] = fingerprint
        rec = {"t": "key", "seq": seq, "key": key, "fp": fingerprint}
        staged.record = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        staged.first_seq = seq
        return staged

    def _stage_forget(self, user_id: str) -> _Staged:
        check_id(user_id, "user_id", optional=False)
        staged = _Staged("forget", b"", self._next_seq, user_id=user_id)
        if (self._older_generation or user_id in self._disk_users or user_id in self._users
                or user_id in self._user_sessions):
            seq = self._next_seq
            self._next_seq += 1
            rec = {"t": "forget", "seq": seq, "user_id": user_id}
            staged.record = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        return staged

    def write(self, staged: Sequence[_Staged]) -> None:
        """Write the staged records as one commit (blocking I/O; safe off the event loop).

        Raises:
            UnavailableError: The log could not be written; nothing of the commit is applied.
        """
        data = b"".join(s.record for s in staged)
        if not data:
            return
        first = min(s.first_seq for s in staged if s.record)
        try:
            self._log.append(data, first)
        except OSError as exc:
            raise UnavailableError(
                f"session shard {self.shard_index} could not write its log ({exc}); retry"
            ) from exc
        self.counters["commits"] += 1

    def abort(self, staged: _Staged) -> None:
        """Forget a staged operation whose write failed (its sequence numbers stay unused)."""
        for ev, _ in staged.events:
            self._pending.pop(ev.event_id, None)
        if staged.claim is not None and staged.record:
            self._pending_keys.pop(staged.claim[0], None)

    def apply(self, staged: _Staged) -> list[tuple[int, str]] | Forgotten | bool:
        """Apply a written operation to memory; returns its result: ``(seq, event_id)`` per
        appended event, what a forget removed, or whether a claim was a retry."""
        if staged.kind == "forget":
            assert staged.user_id is not None
            if not staged.record:
                return Forgotten()
            self._forget_pending = True
            return self._apply_forget(staged.user_id)
        if staged.kind == "claim":
            assert staged.claim is not None
            if not staged.record:
                return True
            self._pending_keys.pop(staged.claim[0], None)
            self._remember_key(*staged.claim)
            self._since_snapshot += 1
            return False
        now = self._clock()
        for ev, roles in staged.events:
            self._pending.pop(ev.event_id, None)
            self._apply_event(ev, roles, now)
        self._since_snapshot += len(staged.events)
        self.counters["appended"] += len(staged.events)
        self._enforce_bounds(now)
        return staged.stored

    def compaction_due(self) -> bool:
        """A forget was applied, or ``snapshot_every`` events were appended since the snapshot."""
        return self._forget_pending or self._since_snapshot >= self.config.snapshot_every

    # --- synchronous API (tests, benchmark) ----------------------------------------------

    def append(self, events: Sequence[SessionEvent],
               roles: Sequence[int] | None = None) -> list[tuple[int, str]]:
        """Durably append ``events`` (log first, then memory).

        Args:
            events: The events; all are validated before anything is written.
            roles: Per event, bit 1 = session window, bit 2 = user history (default: both).

        Returns:
            Each event's ``(seq, event_id)``: the original ones for a duplicate (an ``event_id``
            seen before, or a server-stamped event within the dedupe window).

        Raises:
            BadRequestError: An event is invalid; nothing is stored.
            UnavailableError: The log could not be written; nothing is stored.
        """
        staged = self.stage(("append", events, roles))
        try:
            self.write([staged])
        except Exception:
            self.abort(staged)
            raise
        result = self.apply(staged)
        if self.compaction_due():
            self.compact()
        assert isinstance(result, list)
        return result

    def claim(self, key: str, fingerprint: str) -> bool:
        """Durably claim an idempotency key for a body fingerprint; True if it was claimed before
        with the same one (a retry).

        Raises:
            ConflictError: The key was claimed with another fingerprint.
        """
        staged = self.stage(("claim", key, fingerprint))
        self.write([staged])
        retry = self.apply(staged)
        if self.compaction_due():
            self.compact()
        assert isinstance(retry, bool)
        return retry

    def forget_user(self, user_id: str) -> Forgotten:
        """Remove the user's sessions and history from memory and disk; returns what went."""
        staged = self.stage(("forget", user_id, None))
        self.write([staged])
        removed = self.apply(staged)
        if self.compaction_due():
            self.compact()
        assert isinstance(removed, Forgotten)
        return removed

    def compact(self) -> None:
        """Write the memory image as a snapshot and delete the older log and snapshots."""
        self.install_snapshot(self.snapshot_payload())

    # --- reads -------------------------------------------------------------------------

    def get_session(self, session_id: str | None, user_id: str | None = None) -> dict[str, Any]:
        """The session's window (expired events dropped) and the user's history, oldest first.

        Returns:
            ``{"session_id", "user_id", "events": list[SessionEvent], "user_events": [...]}``;
            a part this shard does not hold is an empty list.
        """
        now = self._clock()
        events: list[SessionEvent] = []
        if session_id is not None:
            sess = self._sessions.get(session_id)
            if sess is not None:
                cutoff = now - self.config.ttl_seconds
                while sess.events and sess.events[0].ts < cutoff:
                    sess.events.popleft()
                if sess.events:
                    self._sessions.move_to_end(session_id)
                    events = list(sess.events)
                else:
                    self._drop_session(session_id)
                    self.counters["evicted_ttl"] += 1
        user_events: list[SessionEvent] = []
        if user_id is not None and user_id in self._users:
            self._users.move_to_end(user_id)
            user_events = list(self._users[user_id])
        return {"session_id": session_id, "user_id": user_id, "events": events, "user_events": user_events}

    def stats(self) -> dict[str, Any]:
        """Sizes and counters of this shard."""
        return {
            "shard": self.shard_index,
            "sessions": len(self._sessions),
            "users": len(self._users),
            "session_events": sum(len(s.events) for s in self._sessions.values()),
            "user_events": sum(len(h) for h in self._users.values()),
            "dedupe_ids": len(self._seen),
            "idempotency_keys": len(self._keys),
            "next_seq": self._next_seq,
            "since_snapshot": self._since_snapshot,
            **self.counters,
        }

    def close(self) -> None:
        """Close the log file."""
        self._log.close()

    # --- memory ------------------------------------------------------------------------

    def _apply_event(self, ev: SessionEvent, roles: int, now: float) -> None:
        cfg = self.config
        if roles & ROLE_SESSION and ev.ts >= now - cfg.ttl_seconds:
            sess = self._sessions.get(ev.session_id)
            if sess is None:
                sess = self._sessions[ev.session_id] = _Session(deque(maxlen=cfg.window))
            else:
                self._sessions.move_to_end(ev.session_id)
            insert_ordered(sess.events, ev)
            sess.last_ts = max(sess.last_ts, ev.ts)
            if ev.user_id is not None:
                sess.users.add(ev.user_id)
                self._user_sessions.setdefault(ev.user_id, set()).add(ev.session_id)
        if roles & ROLE_USER and ev.user_id is not None and cfg.user_history > 0:
            hist = self._users.get(ev.user_id)
            if hist is None:
                hist = self._users[ev.user_id] = deque(maxlen=cfg.user_history)
            else:
                self._users.move_to_end(ev.user_id)
            insert_ordered(hist, ev)
        if cfg.dedupe_capacity > 0:
            self._seen[ev.event_id] = (ev.seq, ev.user_id, ev.ts)
            if len(self._seen) > cfg.dedupe_capacity:
                self._seen.popitem(last=False)

    def _remember_key(self, key: str, fingerprint: str) -> None:
        if self.config.dedupe_capacity > 0:
            self._keys[key] = fingerprint
            if len(self._keys) > self.config.dedupe_capacity:
                self._keys.popitem(last=False)

    def _drop_session(self, session_id: str) -> int:
        sess = self._sessions.pop(session_id)
        for uid in sess.users:
            owned = self._user_sessions.get(uid)
            if owned is not None:
                owned.discard(session_id)
                if not owned:
                    del self._user_sessions[uid]
        return len(sess.events)

    def _enforce_bounds(self, now: float) -> None:
        cfg = self.config
        while len(self._sessions) > cfg.max_sessions_per_shard:
            self._drop_session(next(iter(self._sessions)))
            self.counters["evicted_lru"] += 1
        # Amortised TTL sweep from the least recently touched end; the rest expire lazily on read.
        cutoff = now - cfg.ttl_seconds
        for _ in range(16):
            if not self._sessions:
                break
            sid, sess = next(iter(self._sessions.items()))
            if sess.last_ts >= cutoff:
                break
            self._drop_session(sid)
            self.counters["evicted_ttl"] += 1
        while len(self._users) > cfg.max_users_per_shard:
            self._users.popitem(last=False)
            self.counters["evicted_lru"] += 1

    def _apply_forget(self, user_id: str) -> Forgotten:
        sessions = 0
        event_ids: set[str] = set()
        for sid in list(self._user_sessions.get(user_id, ())):
            if sid in self._sessions:
                event_ids.update(e.event_id for e in self._sessions[sid].events)
                self._drop_session(sid)
                sessions += 1
        self._user_sessions.pop(user_id, None)
        hist = self._users.pop(user_id, None)
        if hist is not None:
            event_ids.update(e.event_id for e in hist)
        for eid in [k for k, (_, uid, _) in self._seen.items() if uid == user_id]:
            del self._seen[eid]
        self.counters["forgotten_events"] += len(event_ids)
        return Forgotten(sessions, frozenset(event_ids))

    # --- snapshots and restore ---------------------------------------------------------

    def snapshot_payload(self) -> tuple[int, list[bytes], set[str]]:
        """Encode the memory image (on the owning thread); returns (last_seq, chunks, users)."""
        last_seq = self._next_seq - 1
        header = {
            "t": "snapshot", "version": _SNAPSHOT_VERSION, "shard": self.shard_index,
            "num_shards": self.config.num_shards, "last_seq": last_seq,
        }  # fmt: skip
        lines = [header]
        users: set[str] = set()
        for sid, sess in self._sessions.items():
            lines.append(
                {"t": "session", "session_id": sid, "events": [event_to_json(e) for e in sess.events]}
            )
            users.update(sess.users)
        for uid, hist in self._users.items():
            lines.append({"t": "user", "user_id": uid, "events": [event_to_json(e) for e in hist]})
            users.add(uid)
        seen = [[eid, seq, uid, ts] for eid, (seq, uid, ts) in self._seen.items()]
        for i in range(0, len(seen), 1000):
            lines.append({"t": "seen", "ids": seen[i : i + 1000]})
        keys = [[key, fp] for key, fp in self._keys.items()]
        for i in range(0, len(keys), 1000):
            lines.append({"t": "keys", "items": keys[i : i + 1000]})
        chunks = [(json.dumps(x, separators=(",", ":")) + "\n").encode() for x in lines]
        return last_seq, chunks, users

    def install_snapshot(self, payload: tuple[int, list[bytes], set[str]]) -> None:
        """Write a snapshot, start a new log generation, delete everything older (blocking I/O)."""
        last_seq, chunks, users = payload
        old = self._log.names()
        name = f"snapshot-{last_seq:020d}.jsonl"
        self._log.write_atomic(name, chunks)
        segment = self._log.open_segment(last_seq + 1)
        # Keep one older generation (the previous snapshot and the log after it) to restore from
        # should this snapshot be damaged; after a forget keep nothing older (forget means the
        # user's events leave the disk now).
        previous = [n for n in old if _is_snapshot(n) and _seq_of(n) < last_seq]
        keep_after = _seq_of(previous[-1]) if previous and not self._forget_pending else None
        for n in old:
            if self._forget_pending and n.startswith(QUARANTINE_PREFIX):
                self._log.delete(n)  # damaged bytes may hold the forgotten user too
                continue
            if n in (name, segment) or not n.startswith(("wal-", "snapshot-")):
                continue
            if keep_after is not None and _seq_of(n) >= keep_after + (n.startswith("wal-")):
                continue  # the previous snapshot itself, or a segment after it
            self._log.delete(n)
        self._older_generation = keep_after is not None
        self._disk_users = set(users) | (self._disk_users if keep_after is not None else set())
        self._since_snapshot = 0
        self._forget_pending = False
        self.counters["snapshots"] += 1

    def _restore(self) -> None:
        """Load the newest readable snapshot, replay the log after it, set damage aside.

        A damaged record (checksum mismatch or unreadable JSON) in the middle of the log is
        moved to a quarantine file, counted (``corrupt_records``, ``quarantined_bytes``, shown in
        ``/healthz``) and logged; every good record after it is replayed. A damaged or unreadable
        latest snapshot is quarantined whole (``corrupt_snapshots``) and the shard restores from
        the previous snapshot and the log after it (kept for this), or, when there is none, keeps
        the snapshot's good lines. Either way the shard then compacts, so the damage leaves the
        live log. Refusing to start instead would take every session of the shard down over one
        damaged record; the quarantined bytes stay for an operator to inspect.
        """
        t0 = time.perf_counter()
        names = self._log.names()
        for n in names:
            if n.endswith(".tmp"):
                self._log.delete(n)  # an interrupted snapshot; the previous one is intact
        snapshots = [n for n in names if _is_snapshot(n)]
        self._older_generation = len(snapshots) > 1
        last_seq = 0
        while snapshots:
            name = snapshots.pop()
            loaded = self._load_snapshot(name, fallback_exists=bool(snapshots))
            if loaded is not None:
                last_seq = loaded
                break
        self.counters["restored_snapshot_seq"] = last_seq
        self._next_seq = last_seq + 1
        tombstones = 0
        now = self._clock()
        segments = [n for n in names if n.startswith("wal-") and n.endswith(".jsonl")]
        for i, name in enumerate(segments):
            if i + 1 < len(segments) and _seq_of(segments[i + 1]) - 1 <= last_seq:
                continue  # wholly before the snapshot: kept only as a fallback
            data = self._log.read(name)
            cut = len(data) if data.endswith(b"\n") or not data else data.rfind(b"\n") + 1
            body = data[:cut]
            if cut < len(data):
                # The process died inside os.write: this commit was never acknowledged. Cut it
                # off so that no later record is ever written after a torn line.
                logger.warning(
                    "session shard %d: ignoring a torn last record in %s (%d bytes)",
                    self.shard_index, name, len(data) - cut,
                )  # fmt: skip
                self.counters["torn_records"] += 1
                self._log.truncate(name, cut)
            for lineno, line in enumerate(body.split(b"\n"), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(unframe(line))
                    tombstones += self._replay(rec, last_seq, now)
                except (ValueError, KeyError, TypeError) as exc:
                    self._quarantine(name, lineno, line, exc)
        self._enforce_bounds(now)
        self._log.open_segment(self._next_seq)
        if tombstones:
            self._forget_pending = True  # drop older generations too: they hold the user
        if tombstones or self.counters["corrupt_records"] or self.counters["corrupt_snapshots"]:
            # A forget was logged but maybe not compacted, or damage was set aside: a fresh
            # snapshot of the good state takes the damaged files out of the live log.
            self.compact()
        self.counters["restore_seconds"] = time.perf_counter() - t0

    def _quarantine(self, name: str, lineno: int, data: bytes, reason: BaseException) -> None:
        """Set damaged bytes aside in ``quarantine-<name>-<line>.bad``, count and log them."""
        target = f"{QUARANTINE_PREFIX}{name}-{lineno:08d}.bad"
        self._log.write_atomic(target, [data])
        self.counters["corrupt_records"] += 1
        self.counters["quarantined_bytes"] += len(data)
        logger.error(
            "session shard %d: corrupt record %s:%d (%s, %d bytes) set aside in %s; the records "
            "after it are replayed", self.shard_index, name, lineno, reason, len(data), target,
        )  # fmt: skip

    def _replay(self, rec: dict[str, Any], last_seq: int, now: float) -> int:
        if rec["t"] == "key":
            seq = int(rec["seq"])
            self._next_seq = max(self._next_seq, seq + 1)
            if seq > last_seq:
                self._remember_key(rec["key"], rec["fp"])
                self._since_snapshot += 1
                self.counters["restored_records"] += 1
            return 0
        if rec["t"] == "forget":
            seq = int(rec["seq"])
            self._next_seq = max(self._next_seq, seq + 1)
            if seq > last_seq:
                self._apply_forget(rec["user_id"])
                self.counters["restored_records"] += 1
                return 1
            return 0
        if rec["t"] != "append":
            raise ValueError(f"unknown record type {rec['t']!r}")
        for d in rec["events"]:
            ev = event_from_json(d)
            self._next_seq = max(self._next_seq, ev.seq + 1)
            if ev.seq <= last_seq or ev.event_id in self._seen:
                continue
            self._apply_event(ev, int(d["roles"]), now)
            if ev.user_id is not None:
                self._disk_users.add(ev.user_id)
            self._since_snapshot += 1
            self.counters["restored_records"] += 1
        return 0

    def _load_snapshot(self, name: str, fallback_exists: bool) -> int | None:
        """Install snapshot ``name``; its ``last_seq``, or None when it is damaged and an older
        snapshot should be used instead (it is then quarantined whole).

        Raises:
            ConfigError: The snapshot belongs to another shard layout or format version.
        """
        data = self._log.read(name)
        lines = data.splitlines()
        try:
            header = json.loads(unframe(lines[0]))
            if header.get("t") != "snapshot":
                raise ValueError(f"first line is a {header.get('t')!r} record, not the header")
            last_seq = int(header["last_seq"])
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            self._drop_snapshot(name, data, exc, fallback_exists)
            return None
        if header.get("version") != _SNAPSHOT_VERSION:
            raise ConfigError(f"{name} is not a version-{_SNAPSHOT_VERSION} session snapshot")
        if (header["shard"], header["num_shards"]) != (self.shard_index, self.config.num_shards):
            raise ConfigError(f"{name} belongs to shard {header['shard']} of {header['num_shards']}")
        records: list[dict[str, Any]] = []
        bad: list[tuple[int, bytes, BaseException]] = []
        for lineno, line in enumerate(lines[1:], 2):
            try:
                records.append(json.loads(unframe(line)))
            except ValueError as exc:
                bad.append((lineno, line, exc))
        if bad and fallback_exists:
            self._drop_snapshot(name, data, bad[0][2], fallback_exists)
            return None
        for lineno, line, problem in bad:  # no older state to fall back on: keep what is readable
            self._quarantine(name, lineno, line, problem)
        window, hist_len = self.config.window, self.config.user_history
        for rec in records:
            if rec["t"] == "session":
                events = [event_from_json(d) for d in rec["events"]]
                sess = _Session(deque(events, maxlen=window))
                sess.users = {e.user_id for e in events if e.user_id is not None}
                sess.last_ts = max((e.ts for e in events), default=0.0)
                self._sessions[rec["session_id"]] = sess
                for uid in sess.users:
                    self._user_sessions.setdefault(uid, set()).add(rec["session_id"])
                self._disk_users |= sess.users
            elif rec["t"] == "user" and hist_len > 0:
                self._users[rec["user_id"]] = deque(map(event_from_json, rec["events"]), maxlen=hist_len)
                self._disk_users.add(rec["user_id"])
            elif rec["t"] == "seen":
                for eid, seq, uid, *rest in rec["ids"]:
                    self._seen[eid] = (int(seq), uid, float(rest[0]) if rest else None)
            elif rec["t"] == "keys":
                for key, fp in rec["items"]:
                    self._keys[key] = fp
        return last_seq

    def _drop_snapshot(self, name: str, data: bytes, reason: BaseException,
                       fallback_exists: bool) -> None:
        """Quarantine a damaged snapshot whole; the restore goes on from the one before."""
        target = f"{QUARANTINE_PREFIX}{name}.bad"
        self._log.write_atomic(target, [data])
        self._log.delete(name)
        self.counters["corrupt_snapshots"] += 1
        self.counters["quarantined_bytes"] += len(data)
        logger.error(
            "session shard %d: snapshot %s is damaged (%s); moved to %s, restoring from %s",
            self.shard_index, name, reason, target,
            "the previous snapshot and the log after it" if fallback_exists
            else "the log alone (no older snapshot: events only it held are lost)",
        )  # fmt: skip


_DAMAGE_COUNTERS = ("corrupt_records", "corrupt_snapshots", "quarantined_bytes")


def _is_snapshot(name: str) -> bool:
    return name.startswith("snapshot-") and name.endswith(".jsonl")


def _seq_of(name: str) -> int:
    """The sequence number in a log or snapshot file name (``wal-<first>``, ``snapshot-<last>``)."""
    return int(name.rsplit("-", 1)[1].split(".", 1)[0])


# --------------------------------------------------------------------------------------------
# The Ray actor
# --------------------------------------------------------------------------------------------


class SessionShard:
    """Ray actor around :class:`ShardState` (apply ``ray.remote`` via :class:`SessionStore`).

    An asyncio actor: reads run on the event loop and never wait for a disk flush. Writes are
    queued and *group-committed*: one writer drains the queue, writes every waiting operation as
    one commit (one fdatasync) in a worker thread, then applies them in arrival order and
    acknowledges. Only the writer mutates the log; reads only see applied, i.e. durable, state.

    Args:
        config: ``SessionStateConfig.model_dump()`` (re-validated here).
        shard_index: This shard's index.
        clock: The server clock (event-time validation, TTL); see :mod:`actors.clock`.
    """

    def __init__(self, config: dict[str, Any], shard_index: int,
                 clock: Clock = system_clock) -> None:
        self._state = ShardState(SessionStateConfig.model_validate(config), shard_index,
                                 clock=clock)
        from ray.util.metrics import Gauge

        # Damage found on this start (also in /healthz): an alert on > 0 asks someone to look
        # at the shard's quarantine-*.bad files.
        damaged = Gauge("intentrec_session_log_damaged_records",
                        "Corrupt log records and snapshots set aside by the shard's last restore",
                        tag_keys=("shard",))
        counters = self._state.counters
        damaged.set(counters["corrupt_records"] + counters["corrupt_snapshots"],
                    tags={"shard": str(shard_index)})
        self._queue: list[tuple[tuple[str, Any, Any], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._data_plane = ShardServer({"get_sessions": self.get_sessions,
                                        "append_many": self.append_many})

    async def endpoint(self) -> Endpoint:
        """Where this shard's reads and appends are served over gRPC (opened on the first ask, on
        the node's Ray address), with the token a call must carry: :mod:`actors.shard_channel`."""
        return await self._data_plane.endpoint(ray.util.get_node_ip_address())

    async def append(self, events: list[SessionEvent],
                     roles: list[int] | None = None) -> list[tuple[int, str]]:
        """Durably append; returns ``(seq, event_id)`` per event (see :meth:`ShardState.append`)."""
        result: list[tuple[int, str]] = await self._submit(("append", events, roles))
        return result

    async def append_many(
        self, batch: list[tuple[list[SessionEvent], list[int] | None]]
    ) -> list[list[tuple[int, str]] | BaseException]:
        """Several independent appends in one call and one group commit. Each gets its own result:
        its ``(seq, event_id)`` pairs, or the error (returned, not raised) that rejected it alone."""
        outs = await asyncio.gather(*(self._submit(("append", evs, rls)) for evs, rls in batch),
                                    return_exceptions=True)
        return list(outs)

    async def get_sessions(
        self, requests: list[tuple[str | None, str | None]]
    ) -> list[dict[str, Any] | BaseException]:
        """Several :meth:`get_session` reads in one call; an error is returned in its place."""
        out: list[dict[str, Any] | BaseException] = []
        for session_id, user_id in requests:
            try:
                out.append(self._state.get_session(session_id, user_id))
            except IntentrecError as exc:
                out.append(exc)
        return out

    async def forget_user(self, user_id: str) -> Forgotten:
        """Remove a user from memory and disk (compacted before returning); what went."""
        result: Forgotten = await self._submit(("forget", user_id, None))
        return result

    async def claim(self, key: str, fingerprint: str) -> bool:
        """Claim an idempotency key durably (see :meth:`ShardState.claim`)."""
        result: bool = await self._submit(("claim", key, fingerprint))
        return result

    async def get_session(self, session_id: str | None, user_id: str | None = None) -> dict[str, Any]:
        """See :meth:`ShardState.get_session`."""
        return self._state.get_session(session_id, user_id)

    async def stats(self) -> dict[str, Any]:
        """Shard sizes and counters, plus the process id and whether it was restarted.

        Outside a Ray worker (the in-process bound of ``bench/serve_bench.py``, unit tests) the
        shard was never restarted; asking Ray's runtime context there would start a whole local
        Ray cluster (``ray.get_runtime_context`` initialises Ray when it is not)."""
        restarted = ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
        return {**self._state.stats(), "pid": os.getpid(), "restarted": restarted}

    async def ping(self) -> dict[str, Any]:
        """The configuration this shard runs with (the client checks it matches its own)."""
        return self._state.config.model_dump()

    async def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    async def _submit(self, op: tuple[str, Any, Any]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            # A forget closes its group so that an append queued after it is deduplicated
            # against the post-forget state, not against events the forget removes.
            n = next((i + 1 for i, (op, _) in enumerate(self._queue) if op[0] == "forget"), len(self._queue))
            group, self._queue = self._queue[:n], self._queue[n:]
            try:
                await self._commit(group)
            except Exception as exc:  # a bug: fail the callers rather than leave them waiting
                logger.exception("session shard %d: commit failed", self._state.shard_index)
                for _, fut in group:
                    _settle(fut, exc=UnavailableError(f"session shard failed ({exc}); retry"))

    async def _commit(self, group: list[tuple[tuple[str, Any, Any], asyncio.Future[Any]]]) -> None:
        staged: list[tuple[_Staged, asyncio.Future[Any]]] = []
        for op, fut in group:
            try:
                staged.append((self._state.stage(op), fut))
            except IntentrecError as exc:
                _settle(fut, exc=exc)
        try:
            await asyncio.to_thread(self._state.write, [s for s, _ in staged])
        except Exception as exc:
            for s, fut in staged:
                self._state.abort(s)
                _settle(fut, exc=exc)
            return
        results = [self._state.apply(s) for s, _ in staged]
        compact_error: Exception | None = None
        if self._state.compaction_due():
            try:
                payload = self._state.snapshot_payload()
                await asyncio.to_thread(self._state.install_snapshot, payload)
            except Exception as exc:
                logger.exception("session shard %d: compaction failed", self._state.shard_index)
                compact_error = exc
        for (s, fut), res in zip(staged, results, strict=True):
            if s.kind == "forget" and s.record and compact_error is not None:
                msg = f"user removed from memory but not yet from disk ({compact_error}); retry"
                _settle(fut, exc=UnavailableError(msg))
            else:
                _settle(fut, result=res)


def _settle(fut: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():  # the caller was cancelled
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class Coalescer:
    """Sends calls to one callee, at most ``max_in_flight`` at a time while they keep up; items
    submitted while that many are in flight go out together in the next call.

    There is no timer: a lone item leaves at once, and batches form only while earlier calls are
    in flight, i.e. exactly when the callee is busy. With ``max_batch``, a call carries at most
    that many items, and a full batch that finds every call busy goes out at once as one more
    call: calls in flight then grow with the load instead of batches, so a callee that
    autoscales on its calls in flight (a Serve deployment) still sees the load. Bound to the
    event loop it was created on.

    Args:
        send: Sends a list of items in one call and returns one result per item, in order; a
            result that is an exception fails that item alone. Raising fails the whole batch.
        max_in_flight: Calls in flight at once, full batches aside (1: one call to a shard at a
            time).
        max_batch: Most items in one call; None: no limit (every waiting item goes in the next).
    """

    def __init__(self, send: Callable[[list[Any]], Awaitable[list[Any]]],
                 max_in_flight: int = 1, max_batch: int | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.loop = asyncio.get_running_loop()
        self._send = send
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._pumps: set[asyncio.Task[None]] = set()  # referenced until done
        self._in_flight = 0  # pumps not yet returned (a done task's callback may still be queued)
        self._starting = 0  # pumps that have not taken their first batch yet
        self.calls = 0
        self.items = 0

    async def submit(self, item: Any) -> Any:
        """Send ``item`` (with whatever else is waiting) and return its own result."""
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._pending.append((item, fut))
        full = (self.max_batch is not None
                and len(self._pending) >= self.max_batch * (self._starting + 1))
        if self._in_flight < self.max_in_flight or full:
            self._in_flight += 1
            self._starting += 1
            pump = self.loop.create_task(self._run())
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)
        return await fut

    async def _run(self) -> None:
        try:
            await self._pump()
        finally:
            self._in_flight -= 1

    async def _pump(self) -> None:
        first = True
        while self._pending:
            n = len(self._pending) if self.max_batch is None else self.max_batch
            batch, self._pending = self._pending[:n], self._pending[n:]
            if first:
                self._starting -= 1
                first = False
            self.calls += 1
            self.items += len(batch)
            try:
                results = await self._send([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} items")
            except Exception as exc:
                for _, fut in batch:
                    _settle(fut, exc=exc)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if isinstance(res, BaseException):
                    _settle(fut, exc=res)
                else:
                    _settle(fut, result=res)
        if first:  # started, but what it was started for went with another pump
            self._starting -= 1


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """What the session state knows for one request.

    Args:
        session_id: The session read (the user's implicit session when only a user was given).
        user_id: The user, if given.
        events: The session's window, oldest first (expired events dropped).
        user_events: The user's recent history across sessions, oldest first (may overlap
            ``events``).
    """

    session_id: str | None
    user_id: str | None
    events: tuple[SessionEvent, ...]
    user_events: tuple[SessionEvent, ...]


class SessionStore:
    """Client of the shard actors, used by the Serve ingress (safe to create in every replica).

    Creates or attaches to the named shards (``get_if_exists=True``). They are *detached*: owned
    by no replica, so they survive a replica restart or scale-down and are shared by all
    replicas; the cost is that they outlive ``serve shutdown`` and must be removed with
    :meth:`kill`. A crashed shard restarts (``max_restarts=-1``) and calls are retried
    (``max_task_retries=-1``, safe because appends are idempotent by ``event_id``).

    Args:
        config: The store configuration; a relative ``wal_uri`` is resolved here.
        clock: The server clock, for this client's validation and for shards it creates (a shard
            that already runs keeps its own).
    """

    def __init__(self, config: SessionStateConfig | None = None,
                 clock: Clock = system_clock) -> None:
        self.config = (config or SessionStateConfig()).resolved()
        self._clock = clock
        cls = ray.remote(SessionShard)
        payload = self.config.model_dump()
        self.handles: list[Any] = [
            cls.options(
                name=self.config.shard_name(i),
                namespace=self.config.namespace,
                get_if_exists=True,
                lifetime="detached",
                max_restarts=-1,
                max_task_retries=-1,
                num_cpus=self.config.num_cpus,
            ).remote(payload, i, clock)
            for i in range(self.config.num_shards)
        ]
        self._coalescers: dict[tuple[str, int, int], Coalescer] = {}
        self._channels: dict[tuple[int, int], ShardChannel] = {}

    @classmethod
    def over(cls, config: SessionStateConfig, handles: Sequence[Any],
             clock: Clock = system_clock) -> SessionStore:
        """A client over given shard handles (anything with ``.method.remote(...)`` awaitables)
        instead of the named actors: for the in-process benchmark bound. A handle that answers
        ``endpoint`` gets the gRPC data plane unless ``config.transport`` is ``ray``."""
        store = cls.__new__(cls)
        store.config = config.resolved()
        store._clock = clock
        store.handles = list(handles)
        store._coalescers = {}
        store._channels = {}
        return store

    def _coalescer(self, kind: str, shard: int) -> Coalescer:
        """The coalescer of one shard and kind on the running event loop (a replica has one loop;
        tests and tools may drive one store from several)."""
        loop = asyncio.get_running_loop()
        key = (kind, shard, id(loop))
        c = self._coalescers.get(key)
        if c is None or c.loop is not loop:  # new loop, or a dead loop's id reused
            channel = self._channels.get((shard, id(loop)))
            if channel is None or channel.loop is not loop:  # one per shard and loop, both kinds
                channel = ShardChannel(self.handles[shard], shard,
                                       use_grpc=self.config.transport == "grpc")
                self._channels[(shard, id(loop))] = channel
            method = "append_many" if kind == "append" else "get_sessions"
            c = Coalescer(lambda items: self._call(channel.call(method, items)))
            self._coalescers[key] = c
        return c

    def transport_stats(self) -> dict[str, int]:
        """Shard reads and appends sent over gRPC and over Ray, and gRPC calls (or asks for a
        shard's port) that failed, each call then sent over Ray; summed over shards and loops."""
        out = {"grpc_calls": 0, "ray_calls": 0, "failed_grpc_calls": 0}
        for ch in list(self._channels.values()):
            out["grpc_calls"] += ch.grpc_calls
            out["ray_calls"] += ch.ray_calls
            out["failed_grpc_calls"] += ch.failed_grpc_calls
        return out

    def batching_stats(self) -> dict[str, dict[str, int]]:
        """Shard calls and the requests they carried, per kind (``append``/``get``)."""
        out: dict[str, dict[str, int]] = {}
        for (kind, _, _), c in list(self._coalescers.items()):
            k = out.setdefault(kind, {"calls": 0, "items": 0})
            k["calls"] += c.calls
            k["items"] += c.items
        return out

    def shard_of(self, key: str) -> int:
        """Shard of a session id or user id (see :func:`shard_for`)."""
        return shard_for(key, self.config.num_shards)

    async def _call(self, ref: Any) -> Any:
        try:
            return await asyncio.wait_for(ref, timeout=self.config.call_timeout_s)
        except IntentrecError:
            raise
        except TimeoutError as exc:
            raise UnavailableError(
                f"session state did not answer within {self.config.call_timeout_s} s "
                "(session.call_timeout_s); retry"
            ) from exc
        except ray.exceptions.RayActorError as exc:
            raise UnavailableError(f"session shard unavailable ({exc}); retry") from exc

    async def append(self, events: Sequence[SessionEvent],
                     idempotency: tuple[str, str] | None = None) -> list[str]:
        """Durably store events (all or nothing on validation); returns each event's stored id.

        Re-sending an event with the same ``event_id`` is accepted again but stored once, and so
        is a server-stamped event within the dedupe window (its stored id is the original's).

        Args:
            events: The events of one request.
            idempotency: ``(Idempotency-Key, fingerprint of the request body)``: the key is
                claimed for that body before anything is stored (:meth:`claim`).

        Raises:
            BadRequestError: An event is invalid (the field is named, e.g. ``events[3].event``).
            ConflictError: The idempotency key was used before with another body.
            UnavailableError: A shard could not be reached; retrying the same events is safe.
        """
        now = self._clock()
        checked = [
            validate_event(ev, f"events[{i}]", now, self.config.max_clock_skew_seconds)
            for i, ev in enumerate(events)
        ]
        if idempotency is not None:  # after validation: a refused request claims no key
            await self.claim(*idempotency)
        # Per shard: the events, their roles there, and their positions in ``checked``.
        per_shard: dict[int, tuple[list[SessionEvent], list[int], list[int]]] = {}
        for n, ev in enumerate(checked):
            s = self.shard_of(ev.session_id)
            u = self.shard_of(ev.user_id) if ev.user_id is not None else s
            targets = [(s, ROLE_SESSION | ROLE_USER)] if s == u else [(s, ROLE_SESSION), (u, ROLE_USER)]
            for shard, roles in targets:
                evs, rls, pos = per_shard.setdefault(shard, ([], [], []))
                evs.append(ev)
                rls.append(roles)
                pos.append(n)
        results = await asyncio.gather(
            *(self._coalescer("append", s).submit((evs, rls)) for s, (evs, rls, _) in per_shard.items())
        )
        ids = [""] * len(checked)
        for (_, rls, pos), stored in zip(per_shard.values(), results, strict=True):
            for roles, n, (_, event_id) in zip(rls, pos, stored, strict=True):
                if roles & ROLE_SESSION:  # the session's shard answers for the event
                    ids[n] = event_id
        return ids

    async def claim(self, key: str, fingerprint: str) -> bool:
        """Claim an ``Idempotency-Key`` for a request body's fingerprint on the shard the key's
        hash picks; True when the same key and body were claimed before (a retry).

        Raises:
            ConflictError: The key was claimed before with another body (409).
        """
        hashed = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        handle = self.handles[stable_hash(hashed) % self.config.num_shards]
        retry: bool = await self._call(handle.claim.remote(hashed, fingerprint))
        return retry

    async def get(self, session_id: str | None = None, user_id: str | None = None) -> SessionSnapshot:
        """Read a session's window and the user's history (at most two shard calls).

        With only ``user_id``, the session is the user's implicit one (events posted without a
        session).

        Raises:
            BadRequestError: Neither id is given.
        """
        if not session_id and not user_id:
            raise BadRequestError("give a session_id, a user_id or both", "session_id")
        sid = session_id or default_session_key(user_id or "")
        s = self.shard_of(sid)
        u = self.shard_of(user_id) if user_id else s
        calls = [self._coalescer("get", s).submit((sid, user_id if u == s else None))]
        if u != s:
            calls.append(self._coalescer("get", u).submit((None, user_id)))
        parts = await asyncio.gather(*calls)
        user_events = parts[-1]["user_events"] if user_id else []
        return SessionSnapshot(sid, user_id, tuple(parts[0]["events"]), tuple(user_events))

    async def forget_user(self, user_id: str) -> Forgotten:
        """Remove the user's session data from every shard's memory and log; what went."""
        check_id(user_id, "user_id", optional=False)
        parts = await asyncio.gather(*(self._call(h.forget_user.remote(user_id)) for h in self.handles))
        out = Forgotten()
        for part in parts:
            out |= part
        return out

    async def stats(self) -> list[dict[str, Any]]:
        """Per-shard sizes and counters."""
        return list(await asyncio.gather(*(self._call(h.stats.remote()) for h in self.handles)))

    async def shard_health(self, timeout_s: float) -> list[dict[str, Any]]:
        """Each shard's state for ``/healthz``: ``{"shard", "name", "status": "ok"|"down",
        "error"?, "corrupt_records"?, "corrupt_snapshots"?, "quarantined_bytes"?}``, waiting at
        most ``timeout_s`` for each (a shard that is restarting, replaying its log or hung is
        "down")."""

        async def one(i: int, handle: Any) -> dict[str, Any]:
            out: dict[str, Any] = {"shard": i, "name": self.config.shard_name(i)}
            try:
                st = await asyncio.wait_for(handle.stats.remote(), timeout=timeout_s)
            except TimeoutError:
                return {**out, "status": "down", "error": f"no answer within {timeout_s} s"}
            except Exception as exc:  # the actor died for good, or failed to restore
                return {**out, "status": "down", "error": f"{type(exc).__name__}: {exc}"[:300]}
            return {**out, "status": "ok",
                    **{k: int(st.get(k, 0)) for k in _DAMAGE_COUNTERS}}

        return list(await asyncio.gather(*(one(i, h) for i, h in enumerate(self.handles))))

    async def ready(self, timeout_s: float = 120.0) -> None:
        """Wait for every shard (up to ``timeout_s``: a first start or a long log replay may
        take longer than one call's ``call_timeout_s``) and check it runs this store's
        configuration.

        Raises:
            ConfigError: A shard with the same name already runs another configuration.
            TimeoutError: A shard did not start within ``timeout_s``.
        """
        from actors.shard_attach import drift, drift_error

        mine = self.config.model_dump()
        for i, theirs in enumerate(
            await asyncio.wait_for(asyncio.gather(*(h.ping.remote() for h in self.handles)),
                                   timeout=timeout_s)
        ):
            diff = drift(mine, theirs)
            if diff:
                raise drift_error(self.config, self.config.shard_name(i), diff)

    def kill(self) -> None:
        """Kill the shard actors for good (their logs stay on disk), and the app's shared
        impression book, the other detached actor named after ``actor_prefix``
        (:mod:`actors.feedback`)."""
        from actors.feedback import book_name, kill_book

        for h in self.handles:
            ray.kill(h, no_restart=True)
        kill_book(book_name(self.config.actor_prefix), self.config.namespace)
