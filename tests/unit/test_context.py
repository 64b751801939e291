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
