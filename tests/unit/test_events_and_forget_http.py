"""``POST /v1/events`` retries and ``DELETE /v1/users/{id}`` over HTTP, through the serving app's
own code in one process (``bench/inprocess_app.py``: the same FastAPI routes, ``Ingress``,
``RankerService`` and session shards, every Ray hop a direct call; no Ray).

The server clock is a settable one (:mod:`actors.clock` is injectable), so the dedupe window is
crossed by moving the clock, never by sleeping; the integration tier checks the same on the real
Serve app within the window.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

KEY = "client-key-for-unit-tests-0123"
ADMIN_KEY = "admin-key-for-unit-tests-01234"
T0 = 1_512_000_000.0  # 2017-11-30: a fixed server time, whatever day the test runs


class Clock:
    """The server clock, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class App:
    """The in-process app and its clock; ``call`` runs one request on a fresh event loop."""

    def __init__(self, api: Any, clock: Clock, root: str) -> None:
        self.api, self.clock, self.root = api, clock, root

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.api)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
                return await c.request(method, path, json=body, headers=headers)

        return asyncio.run(go())

    def post_events(self, body: Any, key: str | None = None) -> httpx.Response:
        headers = {"X-API-Key": KEY} | ({"Idempotency-Key": key} if key is not None else {})
        return self.call("POST", "/v1/events", body, headers)

    def session_events(self, session_id: str) -> int:
        r = self.call("POST", "/v1/recommendations", {"session_id": session_id, "k": 1})
        assert r.status_code == 200, r.text
        n: int = r.json()["session_events"]
        return n


@pytest.fixture
def app(svd_artifact_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    from ray import serve

    from bench.inprocess_app import build

    # build() points serve.get_replica_context at its ingress; restore it after the test.
    monkeypatch.setattr(serve, "get_replica_context", serve.get_replica_context)
    monkeypatch.setenv("INTENTREC_API_KEY", KEY)
    monkeypatch.setenv("INTENTREC_ADMIN_KEY", ADMIN_KEY)
    root = tmp_path / "models"
    shutil.copytree(svd_artifact_root, root)  # the forget test deletes a version
    clock = Clock(T0)
    api = build({"artifacts_root": str(root), "state_dir": str(tmp_path / "state"),
                 "reload_poll_s": 0, "inline_context": True,
                 "session": {"num_shards": 2, "wal_uri": str(tmp_path / "wal")}}, clock)
    yield App(api, clock, str(root))


def test_the_in_process_bound_calls_its_shards_directly_not_over_grpc(app: App) -> None:
    """The benchmark's bound replaces every hop by a direct call: its shards' reads and appends
    must not go over the gRPC data plane to its own process."""
    ev = {"session_id": "direct", "event": "view", "item_id": "i1"}
    assert app.post_events(ev).status_code == 202
    assert app.session_events("direct") == 1
    calls = app.call("GET", "/healthz").json()["session_calls"]
    assert calls["grpc_calls"] == 0 and calls["ray_calls"] >= 2, calls


# --- a retry is not stored twice ------------------------------------------------------------


def test_a_retry_without_ts_or_event_id_is_stored_once(app: App) -> None:
    """The server stamps the time of an event sent without ``ts``; a retry used to get another
    time, hence another id, and was stored twice."""
    ev = {"session_id": "retry", "user_id": "u-1", "event": "add_to_cart", "item_id": "sku-1"}
    first = app.post_events(ev)
    assert first.status_code == 202, first.text
    app.clock.now += 2.0  # the client timed out and sends it again
    again = app.post_events(ev)
    assert again.status_code == 202 and again.json() == first.json()
    assert app.session_events("retry") == 1


def test_different_content_is_stored_twice(app: App) -> None:
    base = {"session_id": "two", "event": "view", "item_id": "sku-1"}
    assert app.post_events(base).status_code == 202
    for change in ({"item_id": "sku-2"}, {"event": "click"}, {"user_id": "u-2"}):
        app.clock.now += 1.0
        assert app.post_events({**base, **change}).status_code == 202
    assert app.session_events("two") == 4


def test_after_the_dedupe_window_the_same_event_is_stored_again(app: App) -> None:
    """A genuine repeat after ``session.dedupe_window_s`` (10 s by default) is a new event;
    within it, it is taken as a retry (clients that need both send ``event_id``)."""
    ev = {"session_id": "window", "event": "view", "item_id": "sku-1"}
    assert app.post_events(ev).status_code == 202
    app.clock.now += 9.9
    assert app.post_events(ev).status_code == 202
    assert app.session_events("window") == 1
    app.clock.now += 0.2  # 10.1 s after the first
    assert app.post_events(ev).status_code == 202
    assert app.session_events("window") == 2
    # With event_ids, a repeat within the window is kept.
    for n in range(2):
        assert app.post_events({**ev, "event_id": f"view-{n}"}).status_code == 202
    assert app.session_events("window") == 4


def test_an_idempotency_key_makes_a_request_safe_to_retry(app: App) -> None:
    batch = {"events": [
        {"session_id": "keyed", "event": "view", "item_id": "sku-1"},
        {"session_id": "keyed", "event": "view", "item_id": "sku-1"},  # a repeat on purpose
        {"session_id": "keyed", "event": "search", "query": "kids cereal"},
    ]}
    first = app.post_events(batch, key="order-7f3a")
    assert first.status_code == 202, first.text
    assert app.session_events("keyed") == 3  # under a key, each position is its own event

    app.clock.now += 600.0  # long after the dedupe window (and within the session TTL)
    again = app.post_events(batch, key="order-7f3a")
    assert again.status_code == 202 and again.json() == first.json()
    assert app.session_events("keyed") == 3

    other = app.post_events({"events": batch["events"][:1]}, key="order-7f3a")
    assert other.status_code == 409, other.text
    assert other.json()["field"] == "Idempotency-Key"
    assert "another request body" in other.json()["message"]
    assert app.session_events("keyed") == 3  # nothing of the conflicting request is stored

    assert app.post_events(batch, key="order-7f3b").status_code == 202  # a new key: new events
    assert app.session_events("keyed") == 6


def test_an_invalid_request_claims_no_key_and_a_bad_key_is_a_422(app: App) -> None:
    bad = {"session_id": "k2", "event": "view", "item_id": "x", "ts": "2999-01-01T00:00:00Z"}
    r = app.post_events(bad, key="k-2")
    assert r.status_code == 422 and r.json()["field"] == "ts", r.text
    good = {"session_id": "k2", "event": "view", "item_id": "x"}
    assert app.post_events(good, key="k-2").status_code == 202  # the fixed request, same key
    r = app.post_events(good, key="a\tb")
    assert r.status_code == 422 and r.json()["field"] == "Idempotency-Key", r.text


def test_an_events_device_and_region_are_kept_for_the_retrain_and_checked(
        app: App, tmp_path: Path) -> None:
    """Events posted with a device and region come out of the session log's export with them
    (``train_job.py --online-events`` learns their department lifts from there)."""
    from actors.session_export import read_online_events

    body = {"events": [
        {"session_id": "dev", "user_id": "u-d", "event": "view", "item_id": "sku-1",
         "device": "mobile", "region": "Texas"},
        {"session_id": "dev", "user_id": "u-d", "event": "click", "item_id": "sku-2"}]}
    assert app.post_events(body).status_code == 202
    r = app.post_events({"session_id": "dev", "event": "view", "item_id": "x", "device": "fridge"})
    assert r.status_code == 422 and r.json()["field"] == "device", r.text
    events, _ = read_online_events(str(tmp_path / "wal"))
    assert [(e.item_id, e.device, e.region) for e in events] == [
        ("sku-1", "mobile", "Texas"), ("sku-2", None, None)]


def test_a_recommendation_that_names_no_device_takes_its_sessions(app: App) -> None:
    """A shop may send the device and region with its events only: the recommendation then ranks
    with the session's latest ones, and its answer's context says so."""
    assert app.post_events({"events": [
        {"session_id": "ctx", "event": "view", "item_id": "sku-1", "device": "tablet"},
        {"session_id": "ctx", "event": "view", "item_id": "sku-2", "device": "app",
         "region": "Ohio"},
        {"session_id": "ctx", "event": "view", "item_id": "sku-3"}]}).status_code == 202

    def context(body: dict[str, Any]) -> tuple[str, str]:
        r = app.call("POST", "/v1/recommendations", {"k": 3, **body})
        assert r.status_code == 200, r.text
        return r.json()["context"]["device"], r.json()["context"]["region"]

    assert context({"session_id": "ctx"}) == ("app", "Ohio")
    assert context({"session_id": "ctx", "context": {"device": "desktop"}}) == ("desktop", "Ohio")
    assert context({"session_id": "elsewhere"}) == ("unknown", "unknown")


def test_the_session_context_fills_only_what_the_request_left_out() -> None:
    from actors.session_events import SessionEvent
    from serve_app import _session_context

    def ev(n: int, **kw: Any) -> SessionEvent:
        return SessionEvent.create("view", session_id="s", item_id=f"i{n}", ts=T0 + n, **kw)

    enriched = {"signal": {"hour": 9, "device": None, "region": None},
                "display": {"hour": 9, "device": "unknown", "region": "unknown"}}
    events = (ev(1, device="mobile", region="Texas"), ev(2, device="app"), ev(3))
    signal, display = _session_context(enriched, events)
    assert signal == {"hour": 9, "device": "app", "region": "Texas"}
    assert display == {"hour": 9, "device": "app", "region": "Texas"}
    assert enriched["signal"]["device"] is None  # the (maybe cached) enricher answer is unchanged
    named = {"signal": {"device": "desktop", "region": "Ohio"}, "display": {}}
    assert _session_context(named, events) == (named["signal"], named["display"])
    assert _session_context(enriched, (ev(4),)) == (enriched["signal"], enriched["display"])


# --- forget says exactly what it did ------------------------------------------------------------


def test_delete_says_what_was_removed_and_what_remains(app: App) -> None:
    from graph.artifacts import latest_version, read_artifact

    version = latest_version(app.root)
    user = read_artifact(app.root).user_ids.tolist()[0]
    admin = {"X-API-Key": ADMIN_KEY}
    events = {"events": [
        {"session_id": "s-a", "user_id": user, "event": "view", "item_id": "sku-1"},
        {"session_id": "s-a", "event": "view", "item_id": "sku-2"},  # anonymous, same session
        {"session_id": "s-b", "user_id": user, "event": "view", "item_id": "sku-3"},
    ]}
    assert app.post_events(events).status_code == 202
    personal = app.call("POST", "/v1/recommendations", {"user_id": user}, {"X-API-Key": KEY})
    assert personal.json()["user_known"]

    r = app.call("DELETE", f"/v1/users/{user}", headers=admin)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["sessions_removed"] == 2 and out["events_removed"] == 3
    assert out["serving_stopped"] and out["model_versions_with_user"] == [version]
    assert out["personal_data_removed"] is False  # the model version still holds the user
    assert version in out["remains"][0] and "train_job.py" in out["remains"][0]
    assert "forgotten-users file" in out["remains"][-1]
    personal = app.call("POST", "/v1/recommendations", {"user_id": user}, {"X-API-Key": KEY})
    assert personal.json()["user_known"] is False and personal.json()["session_events"] == 0

    # Once no version lists the user (retrained, old versions deleted), only the id remains.
    shutil.rmtree(Path(app.root) / version)
    out = app.call("DELETE", f"/v1/users/{user}", headers=admin).json()
    assert out["model_versions_with_user"] == [] and out["personal_data_removed"] is True
    assert out["sessions_removed"] == out["events_removed"] == 0
    assert len(out["remains"]) == 1 and "forgotten-users file" in out["remains"][0]
