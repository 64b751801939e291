"""Request and response models of the online API, with the limits every request is held to.

Every request model forbids unknown keys (a typo such as ``"kk": 5`` is a 422, not a silently
ignored field) and bounds every string and list, so a single request cannot make a replica
allocate without limit (the body as a whole is bounded before it is read:
:mod:`actors.body_limit`). ``serve_app.py`` turns validation errors into
``{"error": ..., "field": "events[3].event", "message": ...}``; :func:`field_path` builds the
``field`` part.

Ids (:data:`Id`, and :func:`path_id` for ids in a URL) follow one rule wherever they enter: 1 to
128 characters, surrounding whitespace dropped, no control characters or line separators
(:func:`actors.session_events.id_problem`); ``/`` is allowed, and ``DELETE /v1/users/{user_id}``
takes it sent as it is or percent-encoded. Session ids must not start with ``user:``, the prefix
of a user's implicit session (reading it would be reading the user's history without the key).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)
from pydantic.json_schema import JsonDict
from starlette.convertors import Convertor, register_url_convertor

from actors.session_events import USER_SESSION_PREFIX, id_problem
from actors.split import SplitOut
from graph import schema as S

MAX_K = 200
DEFAULT_K = S.TOP_K
MAX_EVENTS_PER_BATCH = 500
MAX_EXCLUDE = 500
MAX_ID_LEN = 128
MAX_QUERY_LEN = 256
MAX_CATEGORY_LEN = 256
MAX_SIMILAR = 100
# request_id of a recommendation response (actors/feedback.py): 32 lowercase hex digits.
REQUEST_ID_PATTERN = r"^[0-9a-f]{32}$"

# context.ts: any instant in this range is representable in every time zone, and every later
# stage (holiday calendars, pandas timestamps) handles it.
MIN_CONTEXT_TS = datetime(1970, 1, 1, tzinfo=UTC)
MAX_CONTEXT_TS = datetime(2200, 1, 1, tzinfo=UTC)

EventType = Literal["view", "click", "add_to_cart", "remove_from_cart", "purchase", "search"]
Device = Literal["desktop", "mobile", "tablet", "app", "other"]
assert Device.__args__ == S.DEVICES, "Device drifted from graph.schema"  # type: ignore[attr-defined]


def _printable_id(value: str) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _not_reserved(value: str) -> str:
    if value.startswith(USER_SESSION_PREFIX):
        raise ValueError(
            f"session ids starting with {USER_SESSION_PREFIX!r} are reserved for a user's implicit "
            "session: post events with only a user_id to use it, and ask for it with that user_id "
            "(and the client key)"
        )
    return value


def path_id(value: str) -> str:
    """An id taken from a URL path, checked like one from a JSON body (which the models strip)."""
    value = value.strip()
    if not value:
        raise ValueError("an id must not be empty or only whitespace")
    return _printable_id(value)


class IdConvertor(Convertor[str]):
    """Route convertor ``{name:id}``: the rest of the path, whatever it holds.

    Starlette's ``{name}`` stops at ``/`` (so ``DELETE /v1/users/shop%2F42`` found no route) and
    ``{name:path}`` stops at a newline (so ``/v1/users/a%0Ab`` was a 404): this one takes both,
    and :func:`path_id` then refuses what no id may hold with a 422 naming the field.
    """

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("id", IdConvertor())

# The schema's pattern says what _printable_id checks (and that an id is not only whitespace,
# which stripping would leave empty), so generated clients and fuzzers know the rule.
_ID_PATTERN = "^(?=[\\s\\S]*\\S)[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]*$"
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN,
                          json_schema_extra={"pattern": _ID_PATTERN}),
               AfterValidator(_printable_id)]
SessionId = Annotated[Id, AfterValidator(_not_reserved)]
# A region (a request's context.region, an event's region): printable like an id (an event's is
# stored in the log and exported, a request's shown in the answer), at most 64 characters.
Region = Annotated[str, Field(min_length=1, max_length=64, json_schema_extra={"pattern": _ID_PATTERN}),
                   AfterValidator(_printable_id)]
_EVENT_TYPES_LITERAL: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]
assert set(_EVENT_TYPES_LITERAL) == set(S.EVENT_TYPES), "EventType drifted from graph.schema"

# Tags of the single-or-batch union on POST /v1/events. They appear in pydantic's error
# locations and field_path() drops them, so errors read "events[3].event", not "batch.events...".
BATCH_TAG = "batch"
SINGLE_TAG = "single"
UNION_TAGS: frozenset[str] = frozenset({BATCH_TAG, SINGLE_TAG})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------


def _required_string(*fields: str) -> dict[str, Any]:
    return {"required": list(fields), "properties": {f: {"type": "string"} for f in fields}}


# Rules across fields, in the schema too (the validators below enforce them).
_WHO: JsonDict = {"anyOf": [_required_string("session_id"), _required_string("user_id")]}
_WHAT: JsonDict = {"anyOf": [
    {**_required_string("query"), "properties": {"event": {"const": S.SEARCH},
                                                  "query": {"type": "string"}}},
    {**_required_string("item_id"), "properties": {
        "event": {"enum": [e for e in _EVENT_TYPES_LITERAL if e != S.SEARCH]},
        "item_id": {"type": "string"}}},
]}


class EventIn(_Strict):
    """One shopper event. ``item_id`` is required except for ``search`` (which needs ``query``);
    ``session_id`` and/or ``user_id`` say whose it is.

    Items unknown to the model are accepted and kept in the session: they never cause an error.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True,
                              json_schema_extra={"allOf": [_WHO, _WHAT]})

    user_id: Id | None = Field(default=None, description="the shopper, when known (logged in)")
    session_id: SessionId | None = Field(
        default=None, validate_default=True,
        description="the shopping session; without one, the event goes to the user's implicit "
        "session (the one a request with only this user_id reads)",
    )
    event: EventType
    # validate_default: the checks below must run when the field is absent, so that the error
    # names the missing field ("events[3].item_id") rather than the whole event.
    item_id: Id | None = Field(default=None, validate_default=True)
    ts: datetime | None = Field(default=None, description="event time; default: the server clock")
    query: str | None = Field(default=None, min_length=1, max_length=MAX_QUERY_LEN,
                              validate_default=True)
    # The canonical event schema's optional columns: validated, not used by online ranking.
    qty: float | None = Field(default=None, gt=0, le=10_000, description="not used online")
    price: float | None = Field(default=None, ge=0, le=1_000_000, description="not used online")
    from_request: str | None = Field(
        default=None, max_length=MAX_ID_LEN,
        description="the request_id of the recommendation response the shopper acted on (32 hex "
        "digits, as returned): attributes a click or an add-to-cart to the model version and "
        "position that showed the item",
    )
    device: Device | None = Field(
        default=None, description="where the shopper acted, as a recommendation request's "
        "`context.device`: kept with the event and exported for retraining (`train_job.py "
        "--online-events`), where the model learns each device's department lift")
    region: Region | None = Field(
        default=None,
        description="the shopper's region, as `context.region`: kept and exported like `device`")
    event_id: Id | None = Field(
        default=None, description="idempotency key: re-posting an event with the same id stores it "
        "once. Without it (and without ts), an identical event within the dedupe window (10 s by "
        "default) is taken as a retry: send an event_id to post a genuine repeat"
    )

    @field_validator("session_id")
    @classmethod
    def _whose(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("user_id") is None:
            raise ValueError("an event needs a session_id, a user_id or both")
        return v

    @field_validator("from_request")
    @classmethod
    def _request_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(REQUEST_ID_PATTERN, v):
            raise ValueError(f"{v!r} is not a request_id; send the request_id of the "
                             "recommendation response as it came (32 hex digits), or leave it out")
        return v

    @field_validator("item_id")
    @classmethod
    def _item_needed(cls, v: str | None, info: ValidationInfo) -> str | None:
        event = info.data.get("event")
        if v is None and event is not None and event != S.SEARCH:
            raise ValueError(f"a {event!r} event needs an item_id")
        return v

    @field_validator("query")
    @classmethod
    def _query_needed(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("event") == S.SEARCH:
            raise ValueError("a 'search' event needs a query (the search text)")
        return v


class EventBatch(_Strict):
    """A batch of events (1 to 500)."""

    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS_PER_BATCH)


def _event_body_tag(v: Any) -> str:
    if isinstance(v, dict):
        return BATCH_TAG if "events" in v else SINGLE_TAG
    return BATCH_TAG if hasattr(v, "events") else SINGLE_TAG


# The body of POST /v1/events: one event, or {"events": [...]}.
EventsBody = Annotated[
    Annotated[EventBatch, Tag(BATCH_TAG)] | Annotated[EventIn, Tag(SINGLE_TAG)],
    Discriminator(_event_body_tag),
]


class ContextIn(_Strict):
    """Request context. Missing fields fall back to the server clock; a missing device or region
    to the session's (its latest event posted with one), else "unknown"."""

    ts: datetime | None = Field(
        default=None, description="request time, between 1970-01-01 and 2200-01-01 (UTC); its UTC "
        "offset (or `timezone`) gives the local hour"
    )
    timezone: str | None = Field(
        default=None, max_length=64, description="IANA zone (e.g. 'America/Chicago') for the local time"
    )
    device: Device | None = None
    region: Region | None = None
    country: str | None = Field(
        default=None, pattern=r"^[A-Za-z]{2}$", description="ISO 3166-1 alpha-2 (holiday calendar)"
    )

    @field_validator("ts")
    @classmethod
    def _ts_in_range(cls, v: datetime | None) -> datetime | None:
        # Checked before any zone conversion: 9999-12-31T23:59:59-14:00 shown in
        # Pacific/Kiritimati (UTC+14) is in year 10000, which datetime cannot hold.
        if v is None:
            return v
        instant = v if v.tzinfo is not None else v.replace(tzinfo=UTC)
        if not MIN_CONTEXT_TS <= instant < MAX_CONTEXT_TS:
            raise ValueError(f"must be between {MIN_CONTEXT_TS:%Y-%m-%d} and "
                             f"{MAX_CONTEXT_TS:%Y-%m-%d} (UTC); got {v.isoformat()}")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v!r}; use an IANA name like 'Europe/Berlin'") from exc
        return v

    @field_validator("country")
    @classmethod
    def _upper(cls, v: str | None) -> str | None:
        return None if v is None else v.upper()


class RecommendationRequest(_Strict):
    """``POST /v1/recommendations``: who, how many, in which context, with which filters."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra=_WHO)

    user_id: Id | None = Field(
        default=None, description="the shopper: personal recommendations, which need the client key"
    )
    session_id: SessionId | None = Field(default=None, validate_default=True)
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_K)
    context: ContextIn | None = None
    query: str | None = Field(default=None, min_length=1, max_length=MAX_QUERY_LEN,
                              description="search text, matched against item titles/categories")
    exclude_items: list[Id] = Field(default_factory=list, max_length=MAX_EXCLUDE)
    category: str | None = Field(
        default=None, min_length=1, max_length=MAX_CATEGORY_LEN,
        description="keep items whose category path starts with this (case-insensitive)",
    )

    @field_validator("session_id")
    @classmethod
    def _who(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("user_id") is None:
            raise ValueError("give a user_id, a session_id or both")
        return v


class ReloadRequest(_Strict):
    """``POST /v1/admin/reload``: load ``LATEST`` again, or roll to a named version."""

    version: str | None = Field(default=None, min_length=1, max_length=128,
                                description="a version folder name; default: what LATEST names")


# --------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------


class Attribution(_Out):
    """What a ``from_request`` event is credited to (``actors/feedback.py``)."""

    model_version: str
    position: int | None = Field(description="1-based position of the item in that response; "
                                 "null when the response did not show it")


class AcceptedEvent(_Out):
    index: int = Field(description="position of the event in the request")
    session_id: str = Field(description="the session it was filed under")
    event: str
    item_id: str | None
    event_id: str = Field(
        description="the id it is stored under: the given one, or derived (from the content and "
        "ts, from the Idempotency-Key, or, for an event without ts, the original's when it "
        "repeats one within the dedupe window)"
    )
    attributed: Attribution | None = Field(
        default=None, description="for an event with from_request: the model version and the "
        "position it was shown at, when this replica still remembers that response")


class EventsAccepted(_Out):
    """202 answer of ``POST /v1/events``; a retry (same Idempotency-Key and body, or the same
    events) gets the same answer and stores nothing new."""

    accepted: int = Field(description="events of the request accepted (duplicates included)")
    events: list[AcceptedEvent]


class RecommendedItem(_Out):
    item_id: str
    score: float
    title: str
    category: str
    price: float | None
    reasons: list[str]


class IntentCategory(_Out):
    category: str
    weight: float


class ContextOut(_Out):
    """The context as the enricher understood it (what moved the ranking)."""

    local_time: str
    hour: int
    weekday: str
    weekend: bool
    holiday: str | None
    season: str
    device: str
    region: str
    country: str


class RecommendationResponse(_Out):
    request_id: str = Field(description="send it back as from_request on the events this "
                            "answer leads to (clicks, add-to-cart)")
    items: list[RecommendedItem]
    model_version: str
    intent: list[IntentCategory]
    context: ContextOut
    user_known: bool
    session_events: int
    degraded: list[Literal["session"]] = Field(
        default_factory=list,
        description="what this answer had to do without: 'session' while the session's shard is "
        "down or slow (the answer then uses the user's model history and the context only)",
    )


class SimilarResponse(_Out):
    item_id: str
    model_version: str
    items: list[RecommendedItem]


class CategoryCount(_Out):
    category: str = Field(description="DEPARTMENT > CATEGORY: send it as the `category` filter "
                          "of POST /v1/recommendations to browse it")
    items: int


class Department(_Out):
    department: str
    items: int
    categories: list[CategoryCount]


class CatalogueResponse(_Out):
    """``GET /v1/catalogue``: departments and their categories, most items first."""

    model_version: str
    num_items: int
    departments: list[Department]


class ShoppersResponse(_Out):
    """``GET /v1/catalogue/shoppers``: user ids the model knows (a sample)."""

    model_version: str
    users: list[str]


class FeaturePsi(_Out):
    feature: str
    psi: float


class MixShare(_Out):
    training: float | None = Field(description="share of the ranker's training requests")
    live: float | None = Field(description="share of this replica's binned requests (null: none)")


class FeatureSkew(_Out):
    """Training–serving skew of the version in use on the replica that answered
    (:mod:`graph.skew`): each ranker feature's population stability index (PSI) over the
    candidates of one ranked request in ``sample_every``, against the candidates it was trained
    on."""

    status: Literal["stable", "moderate", "major", "no requests yet", "no profile"] = Field(
        description="by the largest PSI: stable under 0.1, moderate to 0.25, major above")
    detail: str | None = Field(default=None, description="why there is no profile")
    max_psi: float | None = None
    requests_ranked: int = Field(default=0, description="requests this replica ranked with the "
                                 "version (answers kept for nothing personal are not ranked)")
    requests_binned: int = 0
    candidates_binned: int = 0
    sample_every: int | None = None
    top: list[FeaturePsi] = Field(default_factory=list, description="the most shifted features")
    psi: dict[str, float] = Field(default_factory=dict, description="every feature, largest first")
    request_mix: dict[str, MixShare] = Field(
        default_factory=dict, description="share of requests with a known shopper, session items "
        "and a search, in training and live: a change there moves the GNN, session and query "
        "features")
    thresholds: dict[str, float] = Field(default_factory=dict)
    since: str | None = Field(default=None, description="when this replica loaded the version")


class ModelInfo(_Out):
    version: str
    created: str | None
    loaded_at: str
    num_users: int
    num_items: int
    metrics: dict[str, Any]
    data: dict[str, Any] | None
    gate: dict[str, Any] | None = Field(
        default=None, description="the publish gate of the run that trained this version "
        "(`train_job.py --require-lead`, `--require-no-regression`): its settings, the version "
        "it was compared with, whether it passed and why not; `passed: false` means the version "
        "was loaded by name although the gate kept it from `LATEST` (null: a version of an "
        "earlier release)")
    split: SplitOut | None = Field(default=None, description="the A/B split running now: its "
                                   "version answers `share` of the users (null: none)")
    context_columns: dict[str, int] = Field(
        default_factory=dict,
        description="the events' context columns (`device`, `region`) this model learned a "
        "department lift from, with how many values each; a request's `context.device` or "
        "`context.region` moves the ranking only with one of those values ({}: none, time and "
        "holidays only)")
    feature_skew: FeatureSkew | None = Field(
        default=None, description="the live features against the ranker's training profile on "
        "the replica that answered (null: no model yet)")


class ForgetResponse(_Out):
    """What ``DELETE /v1/users/{user_id}`` did, and what it could not do yet (``remains``)."""

    user_id: str
    sessions_removed: int = Field(
        description="session windows removed (the user's implicit session included), from the "
        "session state's memory and write-ahead log"
    )
    events_removed: int = Field(
        description="distinct events removed with them: the windows' events (anonymous ones of "
        "those sessions included) and the user's recent history"
    )
    serving_stopped: bool = Field(
        description="every ranker replica ignores the user's embedding and purchase history from "
        "its next request on (the forgotten-users file is durable before this answer; replicas on "
        "other nodes see it through the shared state_dir)"
    )
    model_versions_with_user: list[str] = Field(
        description="model versions under the artifacts root that still hold the user's "
        "embedding and purchase history: not used for serving; the next `train_job.py` leaves the "
        "user out, and these folders go when you delete them"
    )
    personal_data_removed: bool = Field(
        description="true only when nothing of the user remains but the id in the forgotten-users "
        "file: no session data and no model version listing the user"
    )
    remains: list[str] = Field(
        description="what remains and until when, in words; the last entry is always the user id "
        "in the forgotten-users file, which keeps serving and retraining from using the user"
    )


class ReloadResponse(_Out):
    previous_version: str
    version: str
    swapped: bool


class ShardHealth(_Out):
    shard: int
    name: str
    status: Literal["ok", "down"]
    error: str | None = None
    corrupt_records: int = Field(default=0, description="corrupt log records set aside on restore")
    corrupt_snapshots: int = Field(default=0, description="damaged snapshots set aside on restore")
    quarantined_bytes: int = Field(default=0, description="their size, kept in a side file")


class SessionCalls(_Out):
    """The answering ingress replica's session reads and appends since it started, by way."""

    grpc_calls: int = Field(description="sent to the shards' gRPC ports")
    ray_calls: int = Field(description="sent as Ray actor calls: resent after a failed gRPC call, "
                           "or every call with session.transport: ray or a shard without a port")
    failed_grpc_calls: int = Field(description="gRPC calls, or asks for a shard's port, that "
                                   "failed; each of those calls was sent over Ray instead")


class RankerCalls(_Out):
    """The answering ingress replica's recommendation calls to the ranker since it started."""

    calls: int = Field(description="Serve calls made to the ranker for recommendations; a batch "
                       "call that a ranker of an earlier release refuses (it cannot take a batch) "
                       "is not counted, and its requests then count one call each")
    requests: int = Field(description="recommendation requests they carried: more than calls "
                          "when requests arriving together went in one call "
                          "(ranker_calls_in_flight)")


class Health(_Out):
    """``ok``; ``degraded`` while a session shard is down (recommendations are then answered
    without the session and say so in ``degraded``)."""

    status: Literal["ok", "degraded"]
    model_version: str
    shards: list[ShardHealth]
    wal_corrupt_records: int = Field(
        description="damaged session-log records and snapshots set aside by the shards' last "
        "restores, summed (details per shard; the bytes are in the shard's quarantine files)")
    session_calls: SessionCalls
    ranker_calls: RankerCalls


class ErrorDetail(_Out):
    field: str
    message: str


class ErrorBody(_Out):
    """Every 4xx/5xx body: the error's name, the field at fault and what to do."""

    error: str
    field: str | None = None
    message: str
    details: list[ErrorDetail] | None = None


# Event fields added after idempotency keys were first stored: they join a body's fingerprint
# only when set, so that a retry of a request first sent to an earlier release (its key claimed in
# the session log) is still the same request.
_LATER_EVENT_FIELDS = frozenset({"device", "region"})


def body_fingerprint(events: Sequence[BaseModel]) -> str:
    """A hash of a request's validated events: what an ``Idempotency-Key`` is bound to. One event
    and a batch holding just that event are the same request."""
    body = json.dumps([{k: v for k, v in e.model_dump(mode="json").items()
                        if v is not None or k not in _LATER_EVENT_FIELDS} for e in events],
                      sort_keys=True)
    return hashlib.blake2b(body.encode(), digest_size=16).hexdigest()


def idempotency_key(value: str) -> str:
    """The ``Idempotency-Key`` header: the rule of an id (printable, at most 128 characters)."""
    return path_id(value)


def field_path(loc: Sequence[str | int], *, request_loc: bool = True) -> str:
    """Render a pydantic error location as a field path: ``("body","batch","events",3,"event")``
    → ``"events[3].event"``.

    Args:
        loc: The error's ``loc``.
        request_loc: ``loc`` comes from FastAPI and starts with where the value was (``body``,
            ``query``, ``path``, ...): that part is dropped. The tags of the events union are
            always dropped.
    """
    parts = list(loc)
    if request_loc and parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in UNION_TAGS or p.startswith(("function-", "tagged-union")):
            continue
        else:
            out += ("." if out else "") + p
    return out or "body"
