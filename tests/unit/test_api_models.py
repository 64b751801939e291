"""Request models: limits, strictness and error locations that name the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from actors.api import (
    MAX_EVENTS_PER_BATCH,
    MAX_K,
    ContextIn,
    EventBatch,
    EventIn,
    EventsBody,
    RecommendationRequest,
    ReloadRequest,
    body_fingerprint,
    field_path,
)

BODY: TypeAdapter[Any] = TypeAdapter(EventsBody)


def _fields(exc: ValidationError) -> list[str]:
    return [field_path(e["loc"], request_loc=False) for e in exc.errors()]


def _ev(**kw: Any) -> dict[str, Any]:
    return {"session_id": "s1", "event": "view", "item_id": "i1", **kw}


def test_single_event_and_batch_are_both_accepted() -> None:
    one = BODY.validate_python(_ev(event="add_to_cart"))
    assert isinstance(one, EventIn) and one.event == "add_to_cart"
    batch = BODY.validate_python({"events": [_ev(), _ev(event="search", item_id=None, query="milk")]})
    assert isinstance(batch, EventBatch) and len(batch.events) == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"events": [_ev(), _ev(), _ev(), _ev(event="bogus")]}, "events[3].event"),
        ({"events": [_ev(), _ev(event="add_to_cart", item_id=None)]}, "events[1].item_id"),
        ({"events": [_ev(event="search", item_id=None)]}, "events[0].query"),
        ({"events": [_ev(session_id="x" * 129)]}, "events[0].session_id"),
        ({"events": [_ev(qty=-1)]}, "events[0].qty"),
        ({"events": [_ev(colour="red")]}, "events[0].colour"),
        ({"events": []}, "events"),
        ({"events": [_ev()] * (MAX_EVENTS_PER_BATCH + 1)}, "events"),
        (_ev(ts="not a time"), "ts"),
        (_ev(session_id=None), "session_id"),
        ({"events": [_ev(), _ev(device="toaster")]}, "events[1].device"),
        (_ev(region=""), "region"),
        (_ev(region="r" * 65), "region"),
        (_ev(region="north\nsouth"), "region"),  # stored in a line-oriented log
    ],
)
def test_event_errors_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        BODY.validate_python(body)
    assert field in _fields(info.value), _fields(info.value)


def test_an_event_may_name_only_the_user() -> None:
    ev = BODY.validate_python({"user_id": "u1", "event": "view", "item_id": "i1"})
    assert ev.session_id is None and ev.user_id == "u1"


def test_an_event_carries_the_device_and_region_of_a_request_context() -> None:
    ev = BODY.validate_python(_ev(device="mobile", region=" Texas "))
    assert (ev.device, ev.region) == ("mobile", "Texas")
    # The same devices as a recommendation's context.device, so the lifts learned from the
    # events are found by the requests.
    assert EventIn.model_fields["device"].annotation == ContextIn.model_fields["device"].annotation


def test_a_body_fingerprint_is_the_earlier_releases_unless_a_device_or_region_is_sent() -> None:
    """Idempotency keys are claimed durably with the body's fingerprint: a retry of a request
    first sent to the release before events had a device must still match its claim."""
    import hashlib
    import json

    ev = BODY.validate_python(_ev(ts="2017-11-30T10:00:00Z", event_id="e1"))
    earlier = {k: v for k, v in ev.model_dump(mode="json").items() if k not in ("device", "region")}
    digest = hashlib.blake2b(json.dumps([earlier], sort_keys=True).encode(), digest_size=16)
    assert body_fingerprint([ev]) == digest.hexdigest()
    assert body_fingerprint([BODY.validate_python(_ev(ts="2017-11-30T10:00:00Z", event_id="e1",
                                                      device="app"))]) != digest.hexdigest()


def test_unknown_item_ids_are_valid_events() -> None:
    # Whether the model knows an item is the ranker's business: the event is kept either way.
    assert BODY.validate_python(_ev(item_id="never-seen-before")).item_id == "never-seen-before"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u", "k": MAX_K + 1}, "k"),
        ({"user_id": "u", "k": 0}, "k"),
        ({}, "session_id"),
        ({"user_id": "u", "exclude_items": ["x"] * 501}, "exclude_items"),
        ({"user_id": "u", "query": "q" * 257}, "query"),
        ({"user_id": "u", "category": ""}, "category"),
        ({"user_id": "u", "context": {"country": "USA"}}, "context.country"),
        ({"user_id": "u", "context": {"timezone": "Mars/Base"}}, "context.timezone"),
        ({"user_id": "u", "context": {"device": "toaster"}}, "context.device"),
        ({"user_id": "u", "context": {"region": "north\nsouth"}}, "context.region"),
        ({"user_id": "u", "context": {"region": "r" * 65}}, "context.region"),
        ({"user_id": "u", "kk": 5}, "kk"),
    ],
)
def test_recommendation_errors_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        RecommendationRequest.model_validate(body)
    assert field in _fields(info.value), _fields(info.value)


def test_recommendation_defaults_and_normalisation() -> None:
    req = RecommendationRequest.model_validate(
        {"session_id": "s", "context": {"country": "de", "timezone": "Europe/Berlin"}}
    )
    assert req.k == 20 and req.user_id is None and req.exclude_items == []
    assert req.context is not None and req.context.country == "DE"
    assert ContextIn().ts is None


def test_reload_request_is_strict() -> None:
    assert ReloadRequest().version is None
    with pytest.raises(ValidationError):
        ReloadRequest.model_validate({"verison": "v1"})


def test_field_path_rendering() -> None:
    assert field_path(("body", "batch", "events", 3, "event")) == "events[3].event"
    assert field_path(("body", "single", "ts")) == "ts"
    assert field_path(("query", "k")) == "k"
    assert field_path(("body",)) == "body"
    assert field_path(("query",), request_loc=False) == "query"


REQ: TypeAdapter[Any] = TypeAdapter(RecommendationRequest)
# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: each would
# split an id in a line-oriented file or log.
CONTROL = ["a\nb", "a\rb", "a\tb", "a\x00b", "a\x1bb", "a\x7fb", "a\x85b", "a\u2028b", "a\u2029b"]


@pytest.mark.parametrize("bad", CONTROL)
def test_ids_with_control_characters_are_refused_wherever_they_enter(bad: str) -> None:
    cases = [
        (BODY, _ev(user_id=bad), "user_id"),
        (BODY, _ev(session_id=bad), "session_id"),
        (BODY, {"events": [_ev(), _ev(item_id=bad)]}, "events[1].item_id"),
        (BODY, _ev(event_id=bad), "event_id"),
        (REQ, {"user_id": bad}, "user_id"),
        (REQ, {"session_id": bad}, "session_id"),
        (REQ, {"session_id": "s", "exclude_items": ["ok", bad]}, "exclude_items[1]"),
    ]
    for adapter, body, field in cases:
        with pytest.raises(ValidationError) as info:
            adapter.validate_python(body)
        assert field in _fields(info.value), (body, _fields(info.value))
        assert "control character" in str(info.value)


def test_ids_may_hold_slashes_spaces_and_any_script() -> None:
    for ok in ("shop/42", "a b", "über-kunde", "顧客-7", "a%0Ab", "user-🛒"):
        assert BODY.validate_python(_ev(user_id=ok, item_id=ok)).user_id == ok
        assert REQ.validate_python({"user_id": ok}).user_id == ok


def test_the_implicit_session_prefix_is_reserved() -> None:
    """``user:<id>`` is where a user's events without a session go; naming it as a session
    would read or write that user's history without the client key."""
    for adapter, body in ((BODY, _ev(session_id="user:42")), (REQ, {"session_id": "user:42"})):
        with pytest.raises(ValidationError) as info:
            adapter.validate_python(body)
        assert "session_id" in _fields(info.value) and "reserved" in str(info.value)


@pytest.mark.parametrize("ctx", [
    {"ts": "9999-12-31T23:59:59-14:00", "timezone": "Pacific/Kiritimati"},  # year 10000 there
    {"ts": "9999-12-31T23:59:59-14:00"},
    {"ts": "0001-01-01T00:00:00+14:00", "timezone": "UTC"},
    {"ts": "1969-12-31T23:59:59Z"},
    {"ts": "2200-01-01T00:00:00Z"},
])
def test_context_ts_outside_the_supported_range_names_the_field(ctx: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        REQ.validate_python({"session_id": "s", "context": ctx})
    assert _fields(info.value) == ["context.ts"]
    assert "between 1970-01-01 and 2200-01-01" in str(info.value)


def test_context_ts_inside_the_range_is_kept() -> None:
    for ts in ("1970-01-01T00:00:00Z", "2199-12-31T09:59:59-14:00", "2017-06-10T09:30:00"):
        ctx = {"ts": ts, "timezone": "Pacific/Kiritimati"}
        req = REQ.validate_python({"session_id": "s", "context": ctx})
        assert req.context is not None and req.context.ts is not None
