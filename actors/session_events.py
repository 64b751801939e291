"""Session events: the event model, its validation and idempotency keys, and shard routing.

- :class:`SessionEvent` is one shopper event as the session state keeps it;
  :func:`validate_event` checks one (raising ``BadRequestError`` naming the field) and fills its
  ``event_id``.
- Idempotency: every event carries an ``event_id``: the client's, or derived. An event with a
  ``ts`` gets :func:`derive_event_id` (content and time); one posted with an ``Idempotency-Key``
  header gets :func:`keyed_event_id` (key, position, content); one with neither a ``ts`` nor an
  ``event_id`` is stamped with the server clock and carries a ``dedupe_key``
  (:func:`content_key`) instead, which the shard turns into an id that a retry within the dedupe
  window shares (:func:`window_event_ids`). The shards in :mod:`actors.session_state`
  deduplicate on the id.
- Routing: :func:`shard_for` maps a session id or user id to ``blake2b(key) % num_shards``.
  Events posted without a session are filed under the user's implicit session
  ``"user:<user_id>"`` (:func:`default_session_key`), which is routed to the user's home shard.
- :func:`event_to_json` / :func:`event_from_json` are the event's form in the log records and
  snapshots; :func:`insert_ordered` keeps a bounded window in ``(ts, seq)`` order.
- :func:`id_problem` is the one rule for the characters of an id, which the API models
  (:mod:`actors.api`) and the shards (:func:`check_id`) both apply.

No Ray and no I/O here: the shards (:mod:`actors.session_state`) and the ingress both use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Final

from actors.clock import Clock, system_clock
from graph.errors import BadRequestError
from graph.schema import EVENT_TYPES, SEARCH

USER_SESSION_PREFIX: Final = "user:"
MAX_ID_CHARS: Final = 256
MAX_QUERY_CHARS: Final = 1024
# An event's device and region, as the recommendation request's context.region (actors.api).
MAX_ATTRIBUTE_CHARS: Final = 64
# C0 and C1 control characters, DEL, the Unicode line and paragraph separators (each ends a line
# for some reader: str.splitlines, a log viewer, a line-oriented file) and lone surrogates (which
# cannot be encoded as UTF-8). Everything else is allowed: any script, spaces, "/", "%".
_FORBIDDEN_ID_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One shopper event as the session state keeps it.

    Args:
        user_id: The shopper, or None for an anonymous session.
        session_id: The session; see :func:`default_session_key` for events without one.
        item_id: The item, None for a search.
        event: One of :data:`graph.schema.EVENT_TYPES`.
        ts: Event time, unix seconds. Windows are ordered by it and expire on it.
        query: Search text of a ``search`` event.
        seq: Assigned by the shard on append, increasing per shard; -1 before that.
        event_id: Idempotency key; "" means "derive it": from the content and ``ts``
            (:func:`derive_event_id`), or, with a ``dedupe_key``, in the shard.
        dedupe_key: Set for an event that arrived without ``ts`` and ``event_id`` (the server
            stamped its time): :func:`content_key`, from which the shard derives an id that a
            retry within ``dedupe_window_s`` shares (:func:`window_event_ids`). Never stored.
        device: Where the shopper acted (the canonical events' optional ``device`` column), or
            None. Kept in the log and exported, so that a retrain on the online events learns
            its context lift; not part of the event's identity (:func:`derive_event_id`).
        region: The same for the optional ``region`` column.
    """

    user_id: str | None
    session_id: str
    item_id: str | None
    event: str
    ts: float
    query: str | None = None
    seq: int = -1
    event_id: str = ""
    dedupe_key: str = ""
    device: str | None = None
    region: str | None = None

    @classmethod
    def create(
        cls,
        event: str,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        item_id: str | None = None,
        ts: float | None = None,
        query: str | None = None,
        event_id: str | None = None,
        clock: Clock = system_clock,
        idempotency_key: str | None = None,
        index: int = 0,
        device: str | None = None,
        region: str | None = None,
    ) -> SessionEvent:
        """Build an event with defaults: the user's implicit session, ``clock()`` as the time of
        an event sent without ``ts``, a derived ``event_id`` when none is given.

        Args:
            idempotency_key: The request's ``Idempotency-Key``: an event without ``event_id``
                gets :func:`keyed_event_id` of it and ``index``.
            index: The event's position in its request.

        Raises:
            BadRequestError: Neither a session_id nor a user_id is given.
        """
        if not session_id:
            if not user_id:
                raise BadRequestError(
                    "an event needs a session_id or a user_id; send at least one", "session_id"
                )
            session_id = default_session_key(user_id)
        ev = cls(user_id, session_id, item_id, event, clock() if ts is None else float(ts), query,
                 device=device, region=region)
        if event_id:
            return replace(ev, event_id=event_id)
        if idempotency_key:
            return replace(ev, event_id=keyed_event_id(ev, idempotency_key, index, ts))
        if ts is None:  # stamped here: a retry gets another time, so the shard dedupes by window
            return replace(ev, dedupe_key=content_key(ev))
        return replace(ev, event_id=derive_event_id(ev))


def _setstate(self: SessionEvent, state: list[Any]) -> None:
    """Unpickle an event, giving the fields an earlier release did not send their defaults.

    Shards are detached actors that outlive a deploy, and events travel between them and the
    ingress pickled (``actors.shard_channel``): during a rolling update an event pickled by the
    earlier release (without ``device`` and ``region``) must still load whole. Pickles of a later
    release with more fields load with the fields this one knows (as the dataclass default does).
    """
    fields = dataclasses.fields(self)
    for f, value in zip(fields, state, strict=False):
        object.__setattr__(self, f.name, value)
    for f in fields[len(state):]:
        object.__setattr__(self, f.name, f.default)


# Set after the decorator, which installs its own pair on frozen classes with slots.
SessionEvent.__setstate__ = _setstate  # type: ignore[attr-defined]


def default_session_key(user_id: str) -> str:
    """Session key for events posted with a user but no session: ``"user:<user_id>"``."""
    return USER_SESSION_PREFIX + user_id


def _digest(parts: list[Any]) -> str:
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()


def derive_event_id(ev: SessionEvent) -> str:
    """Content-derived idempotency key: identical events (same ts to the bit) are one event."""
    return _digest([ev.user_id, ev.session_id, ev.item_id, ev.event, repr(ev.ts), ev.query])


def content_key(ev: SessionEvent) -> str:
    """What an event is, without its time: session, user, event type, item and query."""
    return _digest(["content", ev.user_id, ev.session_id, ev.event, ev.item_id, ev.query])


def keyed_event_id(ev: SessionEvent, idempotency_key: str, index: int, ts: float | None) -> str:
    """The id of the ``index``-th event of a request sent with an ``Idempotency-Key``: the same
    for every retry of that request, whenever it comes (``ts`` is the client's, None when the
    server stamps it); distinct for each position, so a batch may repeat an event on purpose."""
    return _digest(["idempotency-key", idempotency_key, index, content_key(ev),
                    None if ts is None else repr(float(ts))])


def window_event_ids(dedupe_key: str, ts: float, window_s: float) -> tuple[str, ...]:
    """The ids under which an event of ``dedupe_key`` stamped at ``ts`` may already be stored by
    an occurrence less than ``window_s`` earlier or later; the first is the one a new occurrence
    is stored under.

    Time is cut into buckets of ``window_s``: an occurrence is stored under the id of its own
    bucket, and a retry within the window lies in the same bucket or a neighbouring one, so the
    shard looks up three ids and compares the stored time (:class:`actors.session_state.ShardState`).
    ``window_s == 0`` turns the window off: only the same time to the bit is the same event.
    """
    if window_s <= 0:
        return (_digest(["window", dedupe_key, repr(float(ts))]),)
    bucket = math.floor(ts / window_s)
    return tuple(_digest(["window", dedupe_key, window_s, b]) for b in (bucket, bucket - 1, bucket + 1))


def stable_hash(key: str) -> int:
    """Process-independent 64-bit hash (Python's ``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def shard_for(key: str, num_shards: int) -> int:
    """Shard of a session id or user id; a user's implicit session goes to the user's shard."""
    if key.startswith(USER_SESSION_PREFIX):
        key = key[len(USER_SESSION_PREFIX) :]
    return stable_hash(key) % num_shards


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an id (user, session, item or event id), or None.

    Ids are stored in files and logs written line by line (the write-ahead log, the forgotten-users
    file): a newline in an id once made ``DELETE /v1/users/a%0Ab`` forget user ``b``. The files
    encode ids safely now; refusing such ids everywhere they enter keeps one id one line anywhere.
    """
    bad = _FORBIDDEN_ID_CHAR.search(value)
    if bad is None:
        return None
    return (f"holds U+{ord(bad.group()):04X} at position {bad.start()}, a control character or "
            "line separator; an id is printable text (any script, spaces and '/' are fine)")


def check_id(value: object, where: str, *, optional: bool, max_chars: int = MAX_ID_CHARS) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > max_chars:
        raise BadRequestError(
            f"{where} ({value!r}) must be a non-empty string of at most {max_chars} characters",
            where,
        )
    problem = id_problem(value)
    if problem is not None:
        raise BadRequestError(f"{where} ({value!r}) {problem}", where)


def validate_event(ev: object, where: str, now: float, max_skew: float) -> SessionEvent:
    """Check one event and fill its ``event_id``; raise ``BadRequestError`` naming the field.

    Args:
        ev: The candidate event.
        where: Its path in the request, e.g. ``"events[3]"``.
        now: The validating process's clock (unix seconds).
        max_skew: How far in the future ``ts`` may be.
    """
    if not isinstance(ev, SessionEvent):
        raise BadRequestError(f"{where} must be a SessionEvent, got {type(ev).__name__}", where)
    check_id(ev.session_id, f"{where}.session_id", optional=False)
    check_id(ev.user_id, f"{where}.user_id", optional=True)
    if ev.event not in EVENT_TYPES:
        raise BadRequestError(
            f"{where}.event ({ev.event!r}) is not an event type; use one of {', '.join(EVENT_TYPES)}",
            f"{where}.event",
        )
    check_id(ev.item_id, f"{where}.item_id", optional=ev.event == SEARCH)
    if not isinstance(ev.ts, int | float) or not math.isfinite(ev.ts) or ev.ts <= 0:
        raise BadRequestError(f"{where}.ts ({ev.ts!r}) must be unix seconds > 0", f"{where}.ts")
    if ev.ts > now + max_skew:
        raise BadRequestError(
            f"{where}.ts ({ev.ts}) is {ev.ts - now:.0f}s in the future (more than {max_skew:.0f}s); "
            "send the event time in unix seconds (UTC)",
            f"{where}.ts",
        )
    if ev.query is not None and (not isinstance(ev.query, str) or len(ev.query) > MAX_QUERY_CHARS):
        raise BadRequestError(
            f"{where}.query must be a string of at most {MAX_QUERY_CHARS} characters", f"{where}.query"
        )
    check_id(ev.device, f"{where}.device", optional=True, max_chars=MAX_ATTRIBUTE_CHARS)
    check_id(ev.region, f"{where}.region", optional=True, max_chars=MAX_ATTRIBUTE_CHARS)
    if not isinstance(ev.event_id, str) or len(ev.event_id) > MAX_ID_CHARS:
        raise BadRequestError(f"{where}.event_id must be a short string", f"{where}.event_id")
    if ev.event_id or ev.dedupe_key:  # a dedupe_key's id is chosen by the shard
        return ev
    return replace(ev, event_id=derive_event_id(ev))


def event_to_json(ev: SessionEvent, roles: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "seq": ev.seq,
        "event_id": ev.event_id,
        "user_id": ev.user_id,
        "session_id": ev.session_id,
        "item_id": ev.item_id,
        "event": ev.event,
        "ts": ev.ts,
        "query": ev.query,
    }
    if ev.device is not None:
        out["device"] = ev.device
    if ev.region is not None:
        out["region"] = ev.region
    if roles is not None:
        out["roles"] = roles
    return out


def event_from_json(d: dict[str, Any]) -> SessionEvent:
    return SessionEvent(
        d["user_id"], d["session_id"], d["item_id"], d["event"], float(d["ts"]), d["query"],
        int(d["seq"]), d["event_id"], device=d.get("device"), region=d.get("region"),
    )  # fmt: skip


def _order(ev: SessionEvent) -> tuple[float, int]:
    return (ev.ts, ev.seq)


def insert_ordered(window: deque[SessionEvent], ev: SessionEvent) -> None:
    """Insert keeping (ts, seq) order in O(window); a full window drops its oldest event."""
    if not window or _order(window[-1]) <= _order(ev):
        window.append(ev)  # the common case: events arrive in time order
        return
    if len(window) == window.maxlen:
        if _order(ev) < _order(window[0]):
            return  # older than everything in a full window: outside it
        window.popleft()
    i = len(window)
    while i > 0 and _order(window[i - 1]) > _order(ev):
        i -= 1
    window.insert(i, ev)
