"""Context enrichment and session intent, as pure functions (no Ray)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from actors.context import enrich_context, holiday_name, infer_intent, local_time, season_of

NOW = datetime(2024, 7, 6, 14, 30, tzinfo=UTC)  # a Saturday


def test_aware_ts_keeps_the_clients_local_time() -> None:
    ts = datetime(2024, 7, 8, 8, 15, tzinfo=timezone(timedelta(hours=-5)))  # Monday 08:15 local
    ctx = enrich_context({"ts": ts})
    assert (ctx.hour, ctx.weekday, ctx.weekend) == (8, 0, False)


def test_timezone_field_converts_and_naive_ts_is_read_in_it() -> None:
    aware = datetime(2024, 7, 8, 12, 0, tzinfo=UTC)
    assert local_time(aware, "America/Chicago", "UTC").hour == 7
    naive = datetime(2024, 7, 8, 12, 0)
    assert local_time(naive, "Asia/Tokyo", "UTC").utcoffset() == timedelta(hours=9)
    assert local_time(naive, None, "UTC").hour == 12


def test_missing_ts_uses_the_server_clock() -> None:
    ctx = enrich_context(None, now=NOW, default_timezone="Europe/Berlin")
    assert ctx.hour == 16 and ctx.weekday == 5 and ctx.weekend
    assert ctx.device == "unknown" and ctx.region == "unknown" and ctx.country == "US"
    d = ctx.display()
    assert d["weekday"] == "Saturday" and d["local_time"].startswith("2024-07-06T16:30")


def test_public_holidays_follow_the_country() -> None:
    xmas = {"ts": datetime(2017, 12, 25, 10, 0)}
    assert enrich_context({**xmas, "country": "US"}).holiday == "Christmas Day"
    unity = {"ts": datetime(2024, 10, 3, 10, 0), "country": "DE"}
    assert enrich_context(unity).holiday == "German Unity Day"
    assert enrich_context({**unity, "country": "US"}).holiday is None
    # An unknown country is a hint we cannot use, never an error.
    assert holiday_name("XX", datetime(2024, 1, 1).date()) is None


def test_season_depends_on_the_hemisphere() -> None:
    assert season_of(7, "US") == "summer"
    assert season_of(7, "AU") == "winter"
    assert season_of(12, "de") == "winter"
    assert enrich_context({"ts": datetime(2024, 4, 2, 9), "country": "BR"}).season == "autumn"


def test_signal_feeds_the_shared_ranker_context() -> None:
    from graph.ranking import ContextSignal

    ctx = enrich_context({"ts": datetime(2017, 12, 25, 9, 0), "device": "mobile", "region": "TX"})
    sig = ctx.signal()
    assert isinstance(sig, ContextSignal)
    assert (sig.weekday, sig.hour, sig.is_holiday) == (0, 9, True)
    assert ctx.display()["device"] == "mobile" and ctx.display()["region"] == "TX"
    # The device and region reach the ranker's context; a request naming neither sends None.
    assert (sig.device, sig.region) == ("mobile", "TX")
    bare = enrich_context({"ts": datetime(2017, 12, 25, 9, 0)}).signal()
    assert (bare.device, bare.region) == (None, None)


CATS = {"milk": "DAIRY > MILK", "cheese": "DAIRY > CHEESE", "beer": "DRINKS > BEER"}


def test_intent_weighs_event_type_and_recency() -> None:
    now = 10_000.0
    # One recent cart beats two views of equal age; an hour-old purchase is discounted.
    events = [("milk", "add_to_cart", now), ("beer", "view", now), ("beer", "view", now),
              ("cheese", "purchase", now - 3600.0)]
    intent = infer_intent(events, CATS.get, now)
    cats = [c for c, _ in intent]
    assert cats[0] == "DAIRY > MILK"
    assert cats.index("DRINKS > BEER") < cats.index("DAIRY > CHEESE")
    assert sum(w for _, w in intent) == pytest.approx(1.0)


def test_intent_remove_from_cart_and_unknown_items() -> None:
    now = 500.0
    events = [("milk", "add_to_cart", now), ("milk", "remove_from_cart", now),
              ("mystery", "add_to_cart", now), (None, "search", now), ("beer", "click", now)]
    # remove_from_cart (-0.5) takes back most of the cart (+0.7): milk keeps 0.2 vs beer's 0.4.
    intent = infer_intent(events, CATS.get, now)
    assert [c for c, _ in intent] == ["DRINKS > BEER", "DAIRY > MILK"]
    assert [w for _, w in intent] == pytest.approx([2 / 3, 1 / 3])
    gone = [("milk", "view", now), ("milk", "remove_from_cart", now), ("beer", "view", now)]
    assert infer_intent(gone, CATS.get, now) == [("DRINKS > BEER", 1.0)]
    assert infer_intent([], CATS.get, now) == []
    assert infer_intent([("mystery", "view", now)], CATS.get, now) == []


# --- the ingress's cache of the enricher's answers -----------------------------------------

def _truth(ctx: dict | None, now: float, default_timezone: str = "UTC") -> dict:
    """The enricher's own answer (``ContextEnricher.enrich``)."""
    return enrich_context(ctx, default_timezone=default_timezone,
                          now=datetime.fromtimestamp(now, UTC)).wire()


def test_an_enrichment_holds_for_its_utc_quarter_hour_when_the_offset_allows() -> None:
    t = datetime(2024, 7, 8, 12, 7, 30, tzinfo=UTC).timestamp()
    quarter = [datetime(2024, 7, 8, 12, 0, tzinfo=UTC).timestamp(),
               datetime(2024, 7, 8, 12, 15, tzinfo=UTC).timestamp()]
    for zone in ("UTC", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Eucla"):  # +5:30 +5:45 +8:45
        assert _truth({"timezone": zone}, t)["valid"] == quarter, zone
    # a client offset that is not whole quarter-hours: its local hours do not start on one
    odd = datetime(2024, 7, 8, 12, 7, tzinfo=timezone(timedelta(hours=5, minutes=53)))
    assert _truth({"ts": odd}, t)["valid"] is None
    # New York's local mean time of 1880 (UTC−4:56:02)
    assert _truth({"ts": datetime(1880, 6, 1, 12, 0), "timezone": "America/New_York"}, t)["valid"] is None


def test_the_cache_answers_exactly_what_the_enricher_would() -> None:
    """Every answer from the cache equals the enricher's own, over requests crossing quarter-hours,
    local midnights, a holiday's start and both DST changes of New York in every form of context
    (server clock, naive ts, ts with its own offset, ts with a zone, an odd offset)."""
    from actors.context import ContextCache

    cache = ContextCache("America/Chicago")
    starts = [datetime(2024, 3, 10, 6, 0, tzinfo=UTC),  # 01:00 EST: New York springs forward at 2
              datetime(2024, 11, 3, 4, 0, tzinfo=UTC),  # 00:00 EDT: falls back at 2 (01:xx twice)
              datetime(2024, 12, 25, 4, 30, tzinfo=UTC)]  # around midnight, Christmas, in Chicago
    hits = misses = 0  # misses of answers with a span
    for start in starts:
        for step in range(0, 4 * 3600, 137):  # every 137 s for four hours
            now = start.timestamp() + step
            local = datetime.fromtimestamp(now, UTC)
            contexts: list[dict | None] = [
                None,
                {"timezone": "America/New_York", "device": "mobile"},
                {"ts": local.replace(tzinfo=None) - timedelta(hours=5), "country": "US"},  # naive
                {"ts": local.astimezone(timezone(timedelta(hours=-5))), "region": "east"},
                {"ts": local, "timezone": "America/New_York"},
                {"ts": local.isoformat(), "timezone": "Asia/Kathmandu", "country": "NP"},
                {"ts": local.astimezone(timezone(timedelta(hours=5, minutes=53)))},
            ]
            for ctx in contexts:
                want = _truth(ctx, now, "America/Chicago")
                probe = cache.probe(ctx, now)
                assert probe is not None
                got = cache.get(probe)
                if got is None:
                    misses += want["valid"] is not None
                    kept = cache.put(probe, want)
                    assert kept == (want["valid"] is not None), ctx
                else:
                    hits += 1
                    assert got == want, (ctx, now)
    # and it does answer most of them: one miss per context with a span and quarter-hour
    assert misses <= 6 * 16 * len(starts) and hits > 5 * misses


def test_the_cache_keeps_only_answers_it_can_reproduce() -> None:
    from actors.context import ContextCache

    now = datetime(2024, 7, 8, 12, 7, tzinfo=UTC).timestamp()
    cache = ContextCache("UTC")
    probe = cache.probe({"device": "app"}, now)
    assert probe is not None
    # an enricher of an earlier release declares no span: called every time
    earlier = {k: v for k, v in _truth({"device": "app"}, now).items() if k != "valid"}
    assert not cache.put(probe, earlier) and cache.get(probe) is None
    # an enricher with another default zone places the request elsewhere: not shortcut
    assert not cache.put(probe, _truth({"device": "app"}, now, "Asia/Tokyo"))
    assert cache.get(probe) is None
    assert cache.put(probe, _truth({"device": "app"}, now))
    assert cache.get(probe) == _truth({"device": "app"}, now)
    # the next quarter-hour, or another device, is the enricher's again
    assert cache.get(cache.probe({"device": "app"}, now + 900)) is None  # type: ignore[arg-type]
    assert cache.get(cache.probe({"device": "mobile"}, now)) is None  # type: ignore[arg-type]
    # an unknown zone is left to the enricher, which refuses it with the client's error
    assert cache.probe({"timezone": "Nowhere/Atlantis"}, now) is None
    assert ContextCache("UTC", capacity=0).probe(None, now) is None


def test_the_cache_is_bounded() -> None:
    from actors.context import ContextCache

    now = datetime(2024, 7, 8, 12, 7, tzinfo=UTC).timestamp()
    cache = ContextCache("UTC", capacity=3)
    for i in range(10):
        ctx = {"region": f"r{i}"}
        probe = cache.probe(ctx, now)
        assert probe is not None and cache.put(probe, _truth(ctx, now))
        assert len(cache) <= 3
