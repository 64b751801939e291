"""The feedback loop's online half (actors/feedback.py): request ids, impressions, attribution
and the counters per model version and position."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import pytest
from pydantic import ValidationError

from actors import feedback
from actors.api import REQUEST_ID_PATTERN, EventIn
from actors.feedback import Feedback, FeedbackMetrics, Impressions, new_request_id


class FakeCounter:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert tags is not None
        self.counts[(tags["model_version"], tags["position"])] += int(value)


def fake_feedback(capacity: int = 100) -> tuple[Feedback, dict[str, FakeCounter]]:
    counters = {name: FakeCounter() for name in ("impressions", "clicks", "add_to_cart")}
    return Feedback(Impressions(capacity), FeedbackMetrics(counters)), counters  # type: ignore[arg-type]


def response(version: str, items: list[str]) -> dict[str, object]:
    return {"model_version": version, "items": [{"item_id": i} for i in items]}


def test_request_ids_are_unique_and_match_the_api_pattern() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(REQUEST_ID_PATTERN, i) for i in ids)


def test_clicks_and_carts_are_credited_to_version_and_position() -> None:
    fb, c = fake_feedback()
    rid = fb.served(response("v1", ["a", "b", "c"]))
    assert c["impressions"].counts == {("v1", "1"): 1, ("v1", "2"): 1, ("v1", "3"): 1}
    a = asyncio.run(fb.credit("click", "b", rid))
    assert a is not None and (a.model_version, a.position) == ("v1", 2)
    asyncio.run(fb.credit("add_to_cart", "c", rid))
    asyncio.run(fb.credit("add_to_cart", "zzz", rid))  # not shown by that response
    assert c["clicks"].counts == {("v1", "2"): 1}
    assert c["add_to_cart"].counts == {("v1", "3"): 1, ("v1", "none"): 1}
    # A view is not a click: it is attributed but counted nowhere.
    assert asyncio.run(fb.credit("view", "a", rid)) is not None
    assert sum(c["clicks"].counts.values()) == 1


def test_an_unknown_or_forgotten_request_counts_as_unknown_version() -> None:
    fb, c = fake_feedback(capacity=2)
    first = fb.served(response("v1", ["a"]))
    fb.served(response("v2", ["a"]))
    fb.served(response("v2", ["a"]))  # the oldest response is dropped
    assert asyncio.run(fb.credit("click", "a", first)) is None
    assert asyncio.run(fb.credit("click", "a", new_request_id())) is None
    assert c["clicks"].counts == {("unknown", "none"): 2}
    assert len(fb.impressions) == 2


def test_ctr_per_version_is_clicks_over_impressions() -> None:
    fb, c = fake_feedback()
    for version, clicks in (("v1", 1), ("v2", 3)):
        for n in range(4):
            rid = fb.served(response(version, ["a", "b"]))
            if n < clicks:
                asyncio.run(fb.credit("click", "a", rid))
    shown = Counter[str]()
    clicked = Counter[str]()
    for (v, _), n in c["impressions"].counts.items():
        shown[v] += n
    for (v, _), n in c["clicks"].counts.items():
        clicked[v] += n
    assert {v: clicked[v] / shown[v] for v in shown} == {"v1": 1 / 8, "v2": 3 / 8}


@pytest.mark.parametrize("bad", ["abc", "G" * 32, "0" * 31, "0" * 33, "A" * 32])
def test_from_request_must_be_a_request_id(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        EventIn.model_validate({"session_id": "s", "event": "click", "item_id": "i",
                                "from_request": bad})
    e = err.value.errors()[0]
    assert e["loc"] == ("from_request",) and "request_id" in e["msg"]
    ok = EventIn.model_validate({"session_id": "s", "event": "click", "item_id": "i",
                                 "from_request": new_request_id()})
    assert ok.from_request is not None


def test_an_item_id_holding_the_separator_is_still_found() -> None:
    imp = Impressions(10)
    rid = new_request_id()
    imp.record(rid, "v1", ["a", f"b{Impressions.SEP}c", "d"])
    hit = imp.attribute(rid, "d")
    assert hit is not None and hit.position == 3
    miss = imp.attribute(rid, "c")
    assert miss is not None and miss.position is None


def test_a_full_impressions_buffer_stays_within_its_documented_size() -> None:
    """The docstring's figure (100,000 responses of 20 items in about 39 MB) measured: the item
    ids arrive as fresh strings, as they do from a deserialized ranker answer."""
    import pickle
    import random
    import tracemalloc

    rng = random.Random(0)
    catalogue = [str(rng.randrange(10**6, 2 * 10**7)) for _ in range(20_000)]
    n = 5_000
    answers = [pickle.dumps([rng.choice(catalogue) for _ in range(20)]) for _ in range(n)]
    imp = Impressions(n)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for a in answers:
            imp.record(new_request_id(), "20261130T113313-112e36", pickle.loads(a))
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    # Only what the buffer and this loop allocated: the test process may also run the session's
    # Ray driver and gRPC threads, whose allocations tracemalloc counts too.
    mine = [tracemalloc.Filter(True, feedback.__file__), tracemalloc.Filter(True, __file__)]
    grown = after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename")
    per_response = sum(stat.size_diff for stat in grown) / n
    assert len(imp) == n
    assert per_response * 100_000 < 40 * 2**20, f"{per_response:.0f} bytes per response"


def test_impressions_held_for_the_interval_reach_the_counter_exactly() -> None:
    now = [0.0]
    counter = FakeCounter()
    m = FeedbackMetrics({"impressions": counter, "clicks": FakeCounter(),  # type: ignore[dict-item]
                         "add_to_cart": FakeCounter()}, flush_every_s=3600.0, clock=lambda: now[0])
    for _ in range(5):
        m.shown("v1", 3)
    m.shown("v2", 1)
    assert counter.counts == {}  # held: one increment per series, not one per response
    now[0] = 3600.0
    m.shown("v1", 2)  # the interval has passed: everything held goes out with this response
    assert counter.counts == {("v1", "1"): 6, ("v1", "2"): 6, ("v1", "3"): 5, ("v2", "1"): 1}
    m.shown("v1", 1)
    m.flush()
    assert counter.counts[("v1", "1")] == 7


def test_impressions_held_when_traffic_stops_are_flushed_by_the_thread() -> None:
    import time

    now = [0.0]
    counter = FakeCounter()
    m = FeedbackMetrics({"impressions": counter, "clicks": FakeCounter(),  # type: ignore[dict-item]
                         "add_to_cart": FakeCounter()}, flush_every_s=0.01, clock=lambda: now[0])
    m.shown("v1", 2)  # held (no time has passed), and no later response comes to flush it
    assert counter.counts == {}
    now[0] = 1.0
    deadline = time.monotonic() + 10.0
    while not counter.counts and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counter.counts == {("v1", "1"): 1, ("v1", "2"): 1}


async def _ask(book: feedback.ImpressionBook, rid: str,
               item: str | None) -> feedback.Attribution | None:
    return book.attribute(rid, item)


def _replica(book: feedback.ImpressionBook, calls: list[int], **kwargs: float) -> tuple[
        Feedback, dict[str, FakeCounter]]:
    """One ingress replica's feedback, sharing ``book`` (each batch sent is counted in calls)."""
    def send(rows: list[feedback.Shown]) -> None:
        calls.append(len(rows))
        book.record_many(rows)

    counters = {name: FakeCounter() for name in ("impressions", "clicks", "add_to_cart")}
    shared = feedback.SharedImpressions(send, lambda rid, item: _ask(book, rid, item), **kwargs)
    return Feedback(Impressions(100), FeedbackMetrics(counters),  # type: ignore[arg-type]
                    shared=shared), counters


def test_a_click_on_another_replica_is_credited_through_the_shared_book() -> None:
    book = feedback.ImpressionBook(capacity=100)
    calls: list[int] = []
    a, _ = _replica(book, calls, every_s=0)
    b, counts_b = _replica(book, calls, every_s=0)
    rid = a.served(response("v2", ["x", "y", "z"]))
    # Replica b never saw the answer: its own memory cannot credit the click.
    assert b.impressions.attribute(rid, "y") is None
    hit = asyncio.run(b.credit("click", "y", rid))
    assert hit == feedback.Attribution("v2", 2)
    assert asyncio.run(b.credit("add_to_cart", "nope", rid)) == \
        feedback.Attribution("v2", None)
    assert asyncio.run(b.credit("click", "y", new_request_id())) is None
    assert counts_b["clicks"].counts == {("unknown", "none"): 1, ("v2", "2"): 1}
    assert counts_b["add_to_cart"].counts == {("v2", "none"): 1}


def test_responses_reach_the_book_in_one_call_per_interval() -> None:
    book = feedback.ImpressionBook(capacity=100)
    calls: list[int] = []
    a, _ = _replica(book, calls, every_s=3600.0)  # the thread does not wake during the test
    b, _ = _replica(book, calls, every_s=3600.0)
    rids = [a.served(response("v1", [f"i{n}"])) for n in range(7)]
    assert calls == [] and book.size() == 0  # nothing sent on the request path
    assert asyncio.run(b.credit("click", "i0", rids[0])) is None  # not there yet
    a.shared.flush()  # type: ignore[union-attr]
    assert calls == [7] and book.size() == 7
    assert asyncio.run(b.credit("click", "i6", rids[6])) == feedback.Attribution("v1", 1)
    a.shared.flush()  # type: ignore[union-attr]
    assert calls == [7]  # an empty queue sends nothing


def test_a_book_that_is_down_or_slow_leaves_clicks_unknown_not_failed(
        caplog: pytest.LogCaptureFixture) -> None:
    def down(rows: list[feedback.Shown]) -> None:
        raise ConnectionError("book restarting")

    async def slow(rid: str, item: str | None) -> feedback.Attribution | None:
        await asyncio.sleep(10)
        return feedback.Attribution("never", 1)

    counters = {name: FakeCounter() for name in ("impressions", "clicks", "add_to_cart")}
    shared = feedback.SharedImpressions(down, slow, every_s=3600.0, timeout_s=0.05)
    fb = Feedback(Impressions(100), FeedbackMetrics(counters),  # type: ignore[arg-type]
                  shared=shared)
    rid = fb.served(response("v1", ["a"]))
    with caplog.at_level("WARNING", logger="intentrec.feedback"):
        shared.flush()  # the batch is dropped with one warning, the replica goes on
        assert asyncio.run(fb.credit("click", "a", rid)) == feedback.Attribution("v1", 1)
        assert asyncio.run(fb.credit("click", "a", new_request_id())) is None
    assert counters["clicks"].counts == {("v1", "1"): 1, ("unknown", "none"): 1}
    assert "shared impression book" in caplog.text


def test_the_book_keeps_the_newest_responses_of_all_replicas() -> None:
    book = feedback.ImpressionBook(capacity=3)
    rids = [new_request_id() for _ in range(5)]
    assert book.record_many([(r, "v1", "a") for r in rids]) == 3
    assert book.attribute(rids[0], "a") is None
    assert book.attribute(rids[4], "a") == feedback.Attribution("v1", 1)


def test_responses_given_on_an_event_loop_are_sent_by_a_timer_on_that_loop() -> None:
    book = feedback.ImpressionBook(capacity=100)
    calls: list[int] = []

    async def replica_loop() -> None:
        a, _ = _replica(book, calls, every_s=0.01)
        rids = [a.served(response("v1", ["a", "b"])) for _ in range(5)]
        assert calls == []  # queued: the send waits for the timer, not the request
        for _ in range(1000):  # up to 10 s
            if calls:
                break
            await asyncio.sleep(0.01)
        assert calls == [5]  # one call for the five
        assert book.attribute(rids[4], "b") == feedback.Attribution("v1", 2)

    asyncio.run(replica_loop())


def test_an_event_without_from_request_is_credited_to_nothing_and_counted_nowhere() -> None:
    fb, c = fake_feedback()
    fb.served(response("v1", ["a"]))
    assert asyncio.run(fb.credit("click", "a", None)) is None
    assert c["clicks"].counts == {}
