"""Request and response models of the online API, with the limits every request is held to.

Every request model forbids unknown keys (a typo such as ``"kk": 5`` is a 422, not a silently
ignored field) and bounds every string and list, so a single request cannot make a replica
allocate without limit. ``serve_app.py`` turns validation errors into
``{"error": ..., "field": "events[3].event", "message": ...}``; :func:`field_path` builds the
``field`` part.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

from graph import schema as S

MAX_K = 200
DEFAULT_K = S.TOP_K
MAX_EVENTS_PER_BATCH = 500
MAX_EXCLUDE = 500
MAX_ID_LEN = 128
MAX_QUERY_LEN = 256
MAX_CATEGORY_LEN = 256
MAX_SIMILAR = 100

EventType = Literal["view", "click", "add_to_cart", "remove_from_cart", "purchase", "search"]
Device = Literal["desktop", "mobile", "tablet", "app", "other"]
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]
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


class EventIn(_Strict):
    """One shopper event. ``item_id`` is required except for ``search`` (which needs ``query``);
    ``session_id`` and/or ``user_id`` say whose it is.

    Items unknown to the model are accepted and kept in the session: they never cause an error.
    """

    user_id: Id | None = Field(default=None, description="the shopper, when known (logged in)")
    session_id: Id | None = Field(
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
    event_id: Id | None = Field(
        default=None, description="idempotency key: re-posting an event with the same id stores it once"
    )

    @field_validator("session_id")
    @classmethod
    def _whose(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("user_id") is None:
            raise ValueError("an event needs a session_id, a user_id or both")
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
    """Request context. Missing fields fall back to the server clock / "unknown"."""

    ts: datetime | None = Field(
        default=None, description="request time; its UTC offset (or `timezone`) gives the local hour"
    )
    timezone: str | None = Field(
        default=None, max_length=64, description="IANA zone (e.g. 'America/Chicago') for the local time"
    )
    device: Device | None = None
    region: str | None = Field(default=None, min_length=1, max_length=64)
    country: str | None = Field(
        default=None, pattern=r"^[A-Za-z]{2}$", description="ISO 3166-1 alpha-2 (holiday calendar)"
    )

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

    user_id: Id | None = None
    session_id: Id | None = Field(default=None, validate_default=True)
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


class AcceptedEvent(_Out):
    index: int = Field(description="position of the event in the request")
    session_id: str = Field(description="the session it was filed under")
    event: str
    item_id: str | None
    event_id: str = Field(description="idempotency key (given, or derived from the content)")


class EventsAccepted(_Out):
    accepted: int
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
    items: list[RecommendedItem]
    model_version: str
    intent: list[IntentCategory]
    context: ContextOut
    user_known: bool
    session_events: int


class SimilarResponse(_Out):
    item_id: str
    model_version: str
    items: list[RecommendedItem]


class ModelInfo(_Out):
    version: str
    created: str | None
    loaded_at: str
    num_users: int
    num_items: int
    metrics: dict[str, Any]
    data: dict[str, Any] | None


class ForgetResponse(_Out):
    user_id: str
    events_removed: int = Field(description="session-state events removed (memory and log)")
    personal_data_removed: bool = Field(
        description="the model's embedding and purchase history of the user are no longer used"
    )


class ReloadResponse(_Out):
    previous_version: str
    version: str
    swapped: bool


class Health(_Out):
    status: Literal["ok"]
    model_version: str


class ErrorDetail(_Out):
    field: str
    message: str


class ErrorBody(_Out):
    """Every 4xx/5xx body: the error's name, the field at fault and what to do."""

    error: str
    field: str | None = None
    message: str
    details: list[ErrorDetail] | None = None


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
