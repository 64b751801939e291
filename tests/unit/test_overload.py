"""Overload and fault answers without Ray: bounded queues in code and config, timeouts below the
HTTP timeout, 503 with Retry-After, degraded recommendations and /healthz while a shard is down.

The ingress class is driven directly with stand-in shard and ranker handles (anything with
``.method.remote(...)`` awaitables); the same paths run against real Ray in
``tests/integration/test_resilience.py``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.serve.exceptions import BackPressureError

import serve_app
from actors.api import RecommendationRequest
from actors.context import enrich_context
from actors.overload import RETRY_AFTER_S, bounded
from actors.session_events import SessionEvent
from actors.session_state import SessionStateConfig, SessionStore
from graph.errors import UnavailableError

CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


class _Call:
    """``handle.method`` whose ``.remote(...)`` answers with ``answer(*args)`` (a coroutine)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def remote(self, *args: Any) -> Any:
        return self.answer(*args)


async def _hang(*_: Any) -> Any:
    await asyncio.Event().wait()  # a hung (e.g. SIGSTOPped) shard: never answers


async def _died(*_: Any) -> Any:
    raise ray.exceptions.ActorDiedError()


SESSION_EVENTS = 2  # what a live stand-in shard holds for every session


def _events(session_id: str | None) -> list[SessionEvent]:
    return [SessionEvent(None, session_id or "", f"item-{n}", "view", 1_700_000_000.0 + n,
                         seq=n, event_id=f"{session_id}-{n}") for n in range(SESSION_EVENTS)]


class _Shard:
    def __init__(self, alive: bool | str) -> None:
        async def sessions(reqs: list[tuple[str | None, str | None]]) -> list[dict[str, Any]]:
            return [{"session_id": s, "events": _events(s), "user_events": []} for s, _ in reqs]

        async def stats() -> dict[str, Any]:
            return {"corrupt_records": 2, "quarantined_bytes": 40}

        bad = _hang if alive == "hung" else _died
        self.get_sessions = _Call(sessions if alive is True else bad)
        self.stats = _Call(stats if alive is True else bad)


class _Ranker:
    def __init__(self, fail: BaseException | None = None) -> None:
        async def recommend(query: Any) -> dict[str, Any]:
            if fail is not None:
                raise fail
            return {"items": [], "model_version": "v1", "intent": [], "user_known": False,
                    "session_events": len(query.events)}

        async def model_info() -> dict[str, Any]:
            return {"version": "v1"}

        self.recommend = _Call(recommend)
        self.model_info = _Call(model_info)


def _ingress(shards: list[_Shard], ranker: _Ranker) -> Any:
    config = SessionStateConfig(num_shards=len(shards), call_timeout_s=0.2)
    args = serve_app.AppArgs(allow_anonymous=True, session=config, health_timeout_s=0.2)
    cls = next(c for c in serve_app.Ingress.func_or_class.__mro__ if "recommend" in vars(c))
    return cls(ranker, None, args.model_dump(), store=SessionStore.over(config, shards))


def _session_on(shard: int, num_shards: int) -> str:
    store = SessionStore.over(SessionStateConfig(num_shards=num_shards), [])
    return next(f"s{i}" for i in range(1000) if store.shard_of(f"s{i}") == shard)


def test_every_deployment_bounds_its_queue_and_says_when_to_retry() -> None:
    from actors.context import ContextEnricher
    from actors.ranker import GNNRanker

    for dep in (serve_app.Ingress, GNNRanker, ContextEnricher):
        cfg = dep._deployment_config
        assert cfg.max_queued_requests > 0, dep.name
        assert cfg.backpressure_config.status_code == 503, dep.name
        assert cfg.backpressure_config.retry_after_s == RETRY_AFTER_S, dep.name
    app = yaml.safe_load(CONFIG.read_text())["applications"][0]
    for d in app["deployments"]:
        assert d["max_queued_requests"] > 0, d["name"]
        assert d["backpressure_config"]["retry_after_s"] > 0, d["name"]


def test_component_timeouts_are_below_the_http_request_timeout() -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    http_timeout = cfg["http_options"]["request_timeout_s"]
    args = serve_app.AppArgs.model_validate(cfg["applications"][0]["args"])
    assert args.session.call_timeout_s < http_timeout
    assert args.ranker_timeout_s < http_timeout
    assert args.health_timeout_s < http_timeout
    defaults = serve_app.AppArgs()
    assert defaults.session.call_timeout_s < defaults.ranker_timeout_s < http_timeout


@pytest.mark.parametrize("fault", ["hung", "died"])
def test_a_down_shard_degrades_the_recommendation_instead_of_failing(fault: str) -> None:
    ing = _ingress([_Shard(True), _Shard(fault)], _Ranker())
    down, up = _session_on(1, 2), _session_on(0, 2)
    out = asyncio.run(ing.recommend(RecommendationRequest(session_id=down)))
    assert out["degraded"] == ["session"]
    assert out["session_events"] == 0  # ranked without the session it could not read
    live = asyncio.run(ing.recommend(RecommendationRequest(session_id=up)))
    assert live["degraded"] == []
    assert live["session_events"] == SESSION_EVENTS  # the live shard's events reach the ranker


def test_a_recommendation_with_a_session_reads_only_the_session_shard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The user's events across sessions only count without a session, so a request with a
    session and a user makes one shard call: the user's shard is not read (here it is down)."""
    key = "client-key-for-the-test"
    monkeypatch.setenv(serve_app.CLIENT_KEY_ENV, key)
    ing = _ingress([_Shard(True), _Shard("died")], _Ranker())
    session = _session_on(0, 2)
    user = next(f"u{i}" for i in range(1000) if ing.store.shard_of(f"u{i}") == 1)
    out = asyncio.run(ing.recommend(RecommendationRequest(session_id=session, user_id=user),
                                    api_key=key))
    assert out["degraded"] == []
    assert out["session_events"] == SESSION_EVENTS
    # without a session, the user's shard is what holds their events: it is read
    alone = asyncio.run(ing.recommend(RecommendationRequest(user_id=user), api_key=key))
    assert alone["degraded"] == ["session"]


@pytest.mark.parametrize("fault", ["hung", "died"])
def test_healthz_names_the_down_shard(fault: str) -> None:
    ing = _ingress([_Shard(True), _Shard(fault)], _Ranker())
    health = asyncio.run(ing.healthz())
    assert health["status"] == "degraded"
    assert [s["status"] for s in health["shards"]] == ["ok", "down"]
    assert health["shards"][1]["name"].endswith("-1-of-2")
    assert health["shards"][1]["error"]
    assert health["wal_corrupt_records"] == 2
    ok = asyncio.run(_ingress([_Shard(True), _Shard(True)], _Ranker()).healthz())
    assert ok["status"] == "ok" and ok["wal_corrupt_records"] == 4


@pytest.mark.parametrize("fail", [BackPressureError(10, 10), ray.exceptions.ActorDiedError()],
                         ids=["queue-full", "replica-died"])
def test_a_ranker_fault_is_a_503_with_retry_after(fail: BaseException) -> None:
    ing = _ingress([_Shard(True)], _Ranker(fail))
    with pytest.raises(UnavailableError) as info:
        asyncio.run(ing.recommend(RecommendationRequest(session_id="s1")))
    assert "retry" in info.value.message
    resp = asyncio.run(serve_app._project_error(None, info.value))  # type: ignore[arg-type]
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == str(RETRY_AFTER_S)
    assert json.loads(bytes(resp.body))["error"] == "UnavailableError"


def test_an_error_ray_raises_for_a_dead_replica_is_a_503_not_a_500() -> None:
    from starlette.requests import Request

    req = Request({"type": "http", "method": "GET", "path": "/v1/model", "headers": []})
    resp = asyncio.run(serve_app._unexpected(req, ray.exceptions.ActorDiedError()))
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == str(RETRY_AFTER_S)


def test_bounded_names_the_setting_on_timeout() -> None:
    with pytest.raises(UnavailableError) as info:
        asyncio.run(bounded(_hang(), 0.05, "the ranker", "ranker_timeout_s"))
    assert "ranker_timeout_s" in info.value.message


def test_fastapis_own_errors_use_the_one_error_format() -> None:
    """An undecodable body (FastAPI's 400, found by schemathesis) is a 422 naming ``body``; other
    errors FastAPI raises itself (an unknown route) keep their status in the ErrorBody format."""
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    req = Request({"type": "http", "method": "POST", "path": "/v1/events", "headers": []})
    resp = asyncio.run(serve_app._http_error(req, HTTPException(400, "error parsing the body")))
    assert resp.status_code == 422
    assert json.loads(bytes(resp.body))["field"] == "body"
    resp = asyncio.run(serve_app._http_error(req, HTTPException(404, "Not Found")))
    assert resp.status_code == 404
    assert json.loads(bytes(resp.body)) == {"error": "HTTPError", "message": "Not Found"}


class _Enricher:
    """The real ContextEnricher's ``enrich_many`` behind a stand-in handle that counts calls and
    holds each for ``delay_s`` (so that requests arriving meanwhile queue behind it); the first
    ``hang_first`` calls never answer."""

    def __init__(self, delay_s: float = 0.02, hang_first: int = 0) -> None:
        from actors.context import ContextEnricher

        real = ContextEnricher.func_or_class()
        self.batches: list[int] = []

        async def enrich_many(requests: list[Any]) -> list[Any]:
            self.batches.append(len(requests))
            if len(self.batches) <= hang_first:
                await asyncio.Event().wait()
            await asyncio.sleep(delay_s)
            return await real.enrich_many(requests)

        self.enrich_many = _Call(enrich_many)


def _ingress_with(enricher: Any, ranker_timeout_s: float = 10.0, context_cache_size: int = 1024) -> Any:
    config = SessionStateConfig(num_shards=1, call_timeout_s=0.2)
    args = serve_app.AppArgs(allow_anonymous=True, session=config, ranker_timeout_s=ranker_timeout_s,
                             context_cache_size=context_cache_size)
    cls = next(c for c in serve_app.Ingress.func_or_class.__mro__ if "recommend" in vars(c))
    return cls(_Ranker(), enricher, args.model_dump(),
               store=SessionStore.over(config, [_Shard(True)]))


def test_concurrent_requests_share_enricher_calls_and_each_gets_its_own_context() -> None:
    enricher = _Enricher()
    ing = _ingress_with(enricher)
    now = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
    zones = ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Berlin", "Australia/Sydney", "UTC"]

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(ing._enrich({"timezone": zones[0], "device": "d0"}, now))
        await asyncio.sleep(0.005)  # its call is in flight
        calls = [ing._enrich({"timezone": z, "device": f"d{i}"}, now)
                 for i, z in enumerate(zones) if i > 0]
        calls.append(ing._enrich({"timezone": "Nowhere/Atlantis"}, now))  # refused on its own
        return await asyncio.gather(first, *calls, return_exceptions=True)

    out = asyncio.run(scenario())
    # the first request's call goes alone; the six arriving meanwhile go together in the next
    assert enricher.batches == [1, 6]
    for i, z in enumerate(zones):
        want = enrich_context({"timezone": z, "device": f"d{i}"},
                              now=datetime.fromtimestamp(now, UTC)).wire()
        assert out[i] == want, z
    assert isinstance(out[-1], KeyError)  # zoneinfo's unknown-zone error, for that request only
    assert len({o["display"]["hour"] for o in out[:-1]}) > 1  # the contexts were not mixed up


def test_a_hung_enricher_call_fails_its_requests_with_503_and_the_next_call_goes_through() -> None:
    enricher = _Enricher(delay_s=0.0, hang_first=1)
    ing = _ingress_with(enricher, ranker_timeout_s=0.2)

    async def scenario() -> tuple[Any, Any]:
        first = await asyncio.gather(ing._enrich(None, 1_700_000_000.0), return_exceptions=True)
        return first[0], await ing._enrich(None, 1_700_000_000.0)

    hung, answered = asyncio.run(scenario())
    assert isinstance(hung, UnavailableError) and "ranker_timeout_s" in hung.message
    assert answered["display"]["hour"] == 22
    assert enricher.batches == [1, 1]


def test_an_enricher_of_an_earlier_release_is_called_once_per_request_during_a_rolling_update() -> None:
    from ray.serve.exceptions import RayServeException

    from actors.context import ContextEnricher

    real = ContextEnricher.func_or_class()
    singles: list[Any] = []

    class _OldEnricher:
        """A replica without ``enrich_many``, as Serve 2.60 answers for a missing method."""

        def __init__(self) -> None:
            async def enrich_many(requests: list[Any]) -> list[Any]:
                raise RayServeException("Tried to call a method 'enrich_many' that does not "
                                        "exist. Available methods: ['enrich'].")

            async def enrich(ctx: Any, now: float) -> Any:
                singles.append(ctx)
                return await real.enrich(ctx, now)

            self.enrich_many = _Call(enrich_many)
            self.enrich = _Call(enrich)

    ing = _ingress_with(_OldEnricher())
    now = 1_700_000_000.0

    async def scenario() -> list[Any]:
        return await asyncio.gather(ing._enrich({"timezone": "Asia/Tokyo"}, now),
                                    ing._enrich({"timezone": "Nowhere/Atlantis"}, now),
                                    ing._enrich(None, now), return_exceptions=True)

    tokyo, refused, utc = asyncio.run(scenario())
    assert len(singles) == 3
    assert tokyo["display"]["hour"] == 7 and utc["display"]["hour"] == 22
    assert isinstance(refused, KeyError)
    # any other Serve error is not taken for an earlier release: it fails the requests
    other = _Enricher()

    async def broken(requests: list[Any]) -> list[Any]:
        raise RayServeException("the replica is shutting down")

    other.enrich_many = _Call(broken)
    with pytest.raises(RayServeException, match="shutting down"):
        asyncio.run(_ingress_with(other)._enrich(None, now))


def test_the_ingress_answers_a_known_context_from_its_cache_until_the_quarter_hour_ends() -> None:
    enricher = _Enricher(delay_s=0.0)
    ing = _ingress_with(enricher)
    start = 1_700_000_100.0  # 2023-11-14 22:15:00 UTC, the start of a quarter-hour
    ctx = {"device": "mobile", "timezone": "Asia/Kolkata"}

    async def scenario() -> list[Any]:
        times = [start + 1.5, start + 300.25, start + 899.9, start + 900.0, start + 1000.0]
        out = [await ing._enrich(dict(ctx), t) for t in times]
        out.append(await ing._enrich({"device": "tablet", "timezone": "Asia/Kolkata"}, start + 5))
        for t in (start + 6, start + 7):  # refused by the enricher, each time
            out.extend(await asyncio.gather(ing._enrich({"timezone": "Nowhere/Atlantis"}, t),
                                            return_exceptions=True))
        return [*times, *out]

    res = asyncio.run(scenario())
    times, out = res[:5], res[5:]
    # one call for the first quarter-hour, one for the next, one for the other device, and the
    # refused zone goes to the enricher each time (refused there, with its own error)
    assert enricher.batches == [1, 1, 1, 1, 1]
    for t, got in zip(times, out, strict=False):
        assert got == enrich_context(ctx, now=datetime.fromtimestamp(t, UTC)).wire()
    assert out[0]["display"]["local_time"] != out[1]["display"]["local_time"]
    assert out[5]["display"]["device"] == "tablet"
    assert all(isinstance(o, KeyError) for o in out[6:])
    # with the cache off, every request is the enricher's
    off = _Enricher(delay_s=0.0)
    ing_off = _ingress_with(off, context_cache_size=0)
    for t in (start + 1, start + 2):
        asyncio.run(ing_off._enrich(dict(ctx), t))
    assert off.batches == [1, 1]


class _BatchRanker:
    """A ranker stand-in that answers each request with its own session id (``model_version``),
    counts single and batched calls, and holds every call until ``gate`` opens; a session named
    ``refused`` gets a 422 of its own. ``batches=False``: a replica of an earlier release, which
    has no ``recommend_many``; ``hang_batches``: batched calls never answer."""

    def __init__(self, batches: bool = True, hang_batches: bool = False) -> None:
        from ray.serve.exceptions import RayServeException

        from graph.errors import BadRequestError

        self.gate = asyncio.Event()
        self.singles: list[str] = []
        self.batches: list[list[str]] = []

        def answer(q: Any) -> Any:
            if q.session_id == "refused":
                return BadRequestError("refused for the test", field="session_id")
            return {"items": [], "model_version": f"v-{q.session_id}", "intent": [],
                    "user_known": False, "session_events": len(q.events)}

        async def recommend(q: Any) -> dict[str, Any]:
            self.singles.append(q.session_id)
            await self.gate.wait()
            out = answer(q)
            if isinstance(out, Exception):
                raise out
            return out  # type: ignore[no-any-return]

        async def recommend_many(queries: list[Any]) -> list[Any]:
            if not batches:
                raise RayServeException("Tried to call a method 'recommend_many' that does not "
                                        "exist. Available methods: ['recommend'].")
            self.batches.append([q.session_id for q in queries])
            if hang_batches:
                await asyncio.Event().wait()
            await self.gate.wait()
            return [answer(q) for q in queries]

        async def model_info() -> dict[str, Any]:
            return {"version": "v1"}

        self.recommend = _Call(recommend)
        self.recommend_many = _Call(recommend_many)
        self.model_info = _Call(model_info)


def _ingress_ranked(ranker: _BatchRanker, in_flight: int = 2, ranker_timeout_s: float = 10.0,
                    batch_size: int = 8) -> Any:
    config = SessionStateConfig(num_shards=1, call_timeout_s=0.2)
    args = serve_app.AppArgs(allow_anonymous=True, session=config, inline_context=True,
                             ranker_calls_in_flight=in_flight, ranker_timeout_s=ranker_timeout_s,
                             ranker_batch_size=batch_size)
    cls = next(c for c in serve_app.Ingress.func_or_class.__mro__ if "recommend" in vars(c))
    return cls(ranker, None, args.model_dump(), store=SessionStore.over(config, [_Shard(True)]))


async def _recommend_in_two_waves(ing: Any, ranker: _BatchRanker, first: list[str],
                                  then: list[str]) -> list[Any]:
    """``first`` reach the ranker one after another and wait there; ``then`` arrive together
    meanwhile; then it answers."""
    early = []
    for s in first:
        early.append(asyncio.ensure_future(ing.recommend(RecommendationRequest(session_id=s))))
        await asyncio.sleep(0.05)
    late = [asyncio.ensure_future(ing.recommend(RecommendationRequest(session_id=s)))
            for s in then]
    await asyncio.sleep(0.05)
    ranker.gate.set()
    return await asyncio.gather(*early, *late, return_exceptions=True)


def test_concurrent_recommendations_share_ranker_calls_and_each_gets_its_own_answer() -> None:
    from graph.errors import BadRequestError

    ranker = _BatchRanker()
    ing = _ingress_ranked(ranker, in_flight=2)
    then = ["s2", "s3", "refused", "s5", "s6", "s7"]
    out = asyncio.run(_recommend_in_two_waves(ing, ranker, ["s0", "s1"], then))
    # two calls out at once, each alone; the six arriving meanwhile go together in the next
    assert sorted(ranker.singles) == ["s0", "s1"]
    assert ranker.batches == [then]
    for sid, res in zip(["s0", "s1", *then], out, strict=True):
        if sid == "refused":  # its own error, and only its own
            assert isinstance(res, BadRequestError) and res.field == "session_id"
        else:
            assert res["model_version"] == f"v-{sid}", sid  # not another request's answer
            assert res["session_events"] == SESSION_EVENTS
    health = asyncio.run(ing.healthz())
    assert health["ranker_calls"] == {"calls": 3, "requests": 8}


def test_full_ranker_batches_go_out_at_once_so_the_rankers_calls_grow_with_the_load() -> None:
    """Serve autoscales the ranker on its calls in flight: past ``ranker_calls_in_flight``, each
    full batch of ``ranker_batch_size`` is one more call, not a larger batch."""
    ranker = _BatchRanker()
    ing = _ingress_ranked(ranker, in_flight=1, batch_size=2)
    then = [f"s{n}" for n in range(1, 6)]
    out = asyncio.run(_recommend_in_two_waves(ing, ranker, ["s0"], then))
    assert ranker.singles[0] == "s0"
    assert ranker.batches[:2] == [["s1", "s2"], ["s3", "s4"]]  # sent while s0's call was out
    assert "s5" in ranker.singles[1:]  # the odd one out, once a call ended
    assert [o["model_version"] for o in out] == [f"v-s{n}" for n in range(6)]
    assert asyncio.run(ing.healthz())["ranker_calls"] == {"calls": 4, "requests": 6}


def test_a_ranker_of_an_earlier_release_is_called_once_per_request_during_a_rolling_update() -> None:
    ranker = _BatchRanker(batches=False)
    ing = _ingress_ranked(ranker, in_flight=1)
    out = asyncio.run(_recommend_in_two_waves(ing, ranker, ["s0"], ["s1", "s2", "s3"]))
    assert sorted(ranker.singles) == ["s0", "s1", "s2", "s3"] and ranker.batches == []
    assert [o["model_version"] for o in out] == ["v-s0", "v-s1", "v-s2", "v-s3"]


def test_ranker_calls_in_flight_0_sends_one_call_per_request() -> None:
    ranker = _BatchRanker()
    ing = _ingress_ranked(ranker, in_flight=0)
    out = asyncio.run(_recommend_in_two_waves(ing, ranker, ["s0"], ["s1", "s2"]))
    assert sorted(ranker.singles) == ["s0", "s1", "s2"] and ranker.batches == []
    assert [o["model_version"] for o in out] == ["v-s0", "v-s1", "v-s2"]
    assert asyncio.run(ing.healthz())["ranker_calls"] == {"calls": 3, "requests": 3}


def test_a_hung_ranker_batch_fails_its_requests_with_503_naming_the_timeout() -> None:
    ranker = _BatchRanker(hang_batches=True)
    ing = _ingress_ranked(ranker, in_flight=1, ranker_timeout_s=0.3)
    out = asyncio.run(_recommend_in_two_waves(ing, ranker, ["s0"], ["s1", "s2"]))
    assert out[0]["model_version"] == "v-s0"  # the lone call answered
    assert ranker.batches == [["s1", "s2"]]
    for res in out[1:]:
        assert isinstance(res, UnavailableError) and "ranker_timeout_s" in res.message
