"""Session-state logic without Ray: windows, TTL, LRU, user history, the log, forget, idempotency."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
from pydantic import ValidationError

from actors.session_events import SessionEvent, default_session_key, shard_for, stable_hash
from actors.session_state import (
    ROLE_SESSION,
    ROLE_USER,
    Forgotten,
    SessionShard,
    SessionStateConfig,
    ShardState,
)
from graph.errors import BadRequestError

T0 = 1_700_000_000.0


class Clock:
    """A settable clock for TTL tests."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_config(tmp_path: Path, **kw: Any) -> SessionStateConfig:
    return SessionStateConfig(num_shards=1, wal_uri=str(tmp_path / "wal"), **kw)


def ev(session: str, item: str, ts: float, user: str | None = None, event: str = "view") -> SessionEvent:
    return SessionEvent.create(event, session_id=session, user_id=user, item_id=item, ts=ts)


def items(events: list[SessionEvent]) -> list[str | None]:
    return [e.item_id for e in events]


def disk_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((tmp_path / "wal").rglob("*")) if p.is_file())


# --- memory bounds --------------------------------------------------------------------------


def test_window_keeps_the_most_recent_events_in_time_order(tmp_path: Path) -> None:
    st = ShardState(make_config(tmp_path, window=3), 0, clock=Clock(T0 + 100))
    st.append([ev("s", f"i{k}", T0 + k) for k in range(5)])
    # A late event (older ts) lands in time order; one older than a full window is left out.
    st.append([ev("s", "late", T0 + 3.5), ev("s", "ancient", T0 - 50)])
    assert items(st.get_session("s")["events"]) == ["i3", "late", "i4"]


def test_ttl_drops_expired_events_then_evicts_the_session(tmp_path: Path) -> None:
    clock = Clock()
    st = ShardState(make_config(tmp_path, ttl_seconds=100), 0, clock=clock)
    st.append([ev("s", "old", T0), ev("s", "new", T0 + 50)])
    clock.now = T0 + 120
    assert items(st.get_session("s")["events"]) == ["new"]
    clock.now = T0 + 200
    assert st.get_session("s")["events"] == []
    assert st.stats()["sessions"] == 0 and st.stats()["evicted_ttl"] == 1


def test_idle_sessions_are_swept_on_append_without_being_read(tmp_path: Path) -> None:
    clock = Clock()
    st = ShardState(make_config(tmp_path, ttl_seconds=100), 0, clock=clock)
    st.append([ev("a", "x", T0), ev("b", "y", T0)])
    clock.now = T0 + 500
    st.append([ev("c", "z", T0 + 499)])
    assert st.stats()["sessions"] == 1


def test_lru_bound_evicts_the_least_recently_used_session(tmp_path: Path) -> None:
    st = ShardState(make_config(tmp_path, max_sessions_per_shard=2), 0, clock=Clock(T0 + 10))
    st.append([ev("s1", "a", T0), ev("s2", "b", T0)])
    st.get_session("s1")  # a read counts as use
    st.append([ev("s3", "c", T0)])
    assert items(st.get_session("s1")["events"]) == ["a"]
    assert st.get_session("s2")["events"] == []
    assert st.stats()["evicted_lru"] == 1


def test_user_history_spans_sessions_and_is_bounded(tmp_path: Path) -> None:
    st = ShardState(make_config(tmp_path, user_history=3), 0, clock=Clock(T0 + 10))
    st.append([ev("s1", "a", T0 + 1, "u"), ev("s1", "b", T0 + 2, "u"), ev("s2", "c", T0 + 3, "u")])
    st.append([ev("s2", "d", T0 + 4, "u"), ev("s2", "other", T0 + 5, "v")])
    out = st.get_session("s1", "u")
    assert items(out["events"]) == ["a", "b"]
    assert items(out["user_events"]) == ["b", "c", "d"]
    # Roles: a user-only copy does not enter the session window (the store routes it).
    st.append([ev("s9", "e", T0 + 6, "u")], roles=[ROLE_USER])
    assert st.get_session("s9")["events"] == [] and items(st.get_session(None, "u")["user_events"])[-1] == "e"
    st.append([ev("s8", "f", T0 + 7, "w")], roles=[ROLE_SESSION])
    assert st.get_session(None, "w")["user_events"] == []


# --- durability -----------------------------------------------------------------------------


def test_replay_restores_exactly_the_acknowledged_events_in_order(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, snapshot_every=4)  # forces a snapshot in the middle
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    seqs: list[int] = []
    for k in range(7):
        seqs += [seq for seq, _ in st.append([ev("s", f"i{k}", T0 + k, "u"), ev(f"t{k}", "x", T0 + k)])]
    before = st.get_session("s", "u")
    st.close()
    names = sorted(p.name for p in (tmp_path / "wal").rglob("*") if p.is_file())
    assert any(n.startswith("snapshot-") for n in names) and any(n.startswith("wal-") for n in names)

    again = ShardState(cfg, 0, clock=clock)
    after = again.get_session("s", "u")
    assert after["events"] == before["events"] and after["user_events"] == before["user_events"]
    assert items(after["events"]) == [f"i{k}" for k in range(7)]
    assert again.stats()["sessions"] == 8
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert again.append([ev("s", "next", T0 + 50)])[0][0] > max(seqs)


def test_torn_last_record_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(tmp_path)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    st.append([ev("s", "a", T0 + 1)])
    st.append([ev("s", "b", T0 + 2)])
    st.close()
    (wal,) = (tmp_path / "wal").rglob("wal-*.jsonl")
    with open(wal, "ab") as f:
        f.write(b'{"t":"append","events":[{"seq":3,"event_id":"x","user_')  # died mid-write

    with caplog.at_level(logging.WARNING, logger="actors.session_state"):
        again = ShardState(cfg, 0, clock=clock)
    assert "torn" in caplog.text
    assert again.stats()["torn_records"] == 1
    assert items(again.get_session("s")["events"]) == ["a", "b"]
    # The torn tail was cut off: later records are readable and no warning repeats.
    again.append([ev("s", "c", T0 + 3)])
    again.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actors.session_state"):
        third = ShardState(cfg, 0, clock=clock)
    assert "torn" not in caplog.text and third.stats()["corrupt_records"] == 0
    assert items(third.get_session("s")["events"]) == ["a", "b", "c"]


def test_object_store_log_writes_one_segment_per_commit(tmp_path: Path) -> None:
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    cfg = SessionStateConfig(num_shards=1, wal_uri="bucket/prefix", snapshot_every=5)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock, filesystem=fs)
    for k in range(3):
        st.append([ev("s", f"i{k}", T0 + k, "u")])
    shard_dir = tmp_path / "bucket" / "prefix" / "shard-0000-of-0001"
    assert len(list(shard_dir.glob("wal-*.jsonl"))) == 3
    st.append([ev("s", "i3", T0 + 3, "u"), ev("s", "i4", T0 + 4, "u")])  # reaches snapshot_every
    assert list(shard_dir.glob("wal-*.jsonl")) == [] and len(list(shard_dir.glob("snapshot-*"))) == 1
    st.append([ev("s", "i5", T0 + 5, "u")])
    again = ShardState(cfg, 0, clock=clock, filesystem=fs)
    assert items(again.get_session("s", "u")["events"]) == [f"i{k}" for k in range(6)]


# --- forget ---------------------------------------------------------------------------------


def _two_users(st: ShardState) -> None:
    st.append([ev("sess-alice", "p1", T0 + 1, "alice-7f3"), ev("sess-alice", "p2", T0 + 2, None)])
    st.append([ev("sess-bob", "p3", T0 + 3, "bob-1c9"), ev("sess-alice", "p4", T0 + 4, "alice-7f3")])


def test_forget_user_removes_memory_and_disk(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    _two_users(st)
    assert b"alice-7f3" in disk_bytes(tmp_path)

    removed = st.forget_user("alice-7f3")
    # The whole session (3 events, including an anonymous one); the 2 history events are copies
    # of two of them: 3 distinct events.
    assert (removed.sessions, removed.events) == (1, 3)
    assert st.get_session("sess-alice", "alice-7f3") == {
        "session_id": "sess-alice", "user_id": "alice-7f3", "events": [], "user_events": [],
    }  # fmt: skip
    assert b"alice-7f3" not in disk_bytes(tmp_path)
    assert b"bob-1c9" in disk_bytes(tmp_path)
    assert st.forget_user("alice-7f3").events == 0  # idempotent
    st.close()

    again = ShardState(cfg, 0, clock=clock)
    assert again.get_session("sess-alice", "alice-7f3")["events"] == []
    assert items(again.get_session("sess-bob", "bob-1c9")["user_events"]) == ["p3"]


def test_forget_survives_a_crash_before_compaction(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    _two_users(st)
    st.write([st.stage(("forget", "alice-7f3", None))])  # tombstone durable, then "crash"
    st.close()

    again = ShardState(cfg, 0, clock=clock)
    assert again.get_session("sess-alice", "alice-7f3")["user_events"] == []
    assert b"alice-7f3" not in disk_bytes(tmp_path)  # restore finished the compaction


def test_forget_reaches_events_already_evicted_from_memory(tmp_path: Path) -> None:
    st = ShardState(make_config(tmp_path, max_sessions_per_shard=1, user_history=0), 0, clock=Clock(T0 + 9))
    st.append([ev("s1", "a", T0, "alice-7f3")])
    st.append([ev("s2", "b", T0, "bob-1c9")])  # evicts s1 from memory; still in the log
    assert b"alice-7f3" in disk_bytes(tmp_path)
    st.forget_user("alice-7f3")
    assert b"alice-7f3" not in disk_bytes(tmp_path)


def test_ids_with_slashes_quotes_and_any_script_survive_the_log_and_snapshots(tmp_path: Path) -> None:
    """Ids reach the log and the snapshots only inside JSON strings, never in a file name: an id
    made of path and quoting characters is stored, restored and forgotten like any other."""
    cfg = make_config(tmp_path)
    clock = Clock(T0 + 100)
    user, session = '../shop/42 "ü\\', "s/../../etc"
    st = ShardState(cfg, 0, clock=clock)
    st.append([ev(session, "i/1", T0 + 1, user), ev("other", "i2", T0 + 2, "bob-1c9")])
    st.compact()  # a snapshot, then more log
    st.append([ev(session, "i/2", T0 + 3, user)])
    st.close()
    names = [p.name for p in (tmp_path / "wal").rglob("*") if p.is_file()]
    assert names and all(re.fullmatch(r"(wal|snapshot)-\d{20}\.jsonl", n) for n in names), names

    again = ShardState(cfg, 0, clock=clock)
    assert items(again.get_session(session, user)["user_events"]) == ["i/1", "i/2"]
    gone = again.forget_user(user)
    assert (gone.sessions, gone.events) == (1, 2)  # two events, in the window and the history
    again.close()
    assert ShardState(cfg, 0, clock=clock).get_session(session, user)["events"] == []


# --- idempotency and validation -------------------------------------------------------------


def test_re_append_is_idempotent_also_after_restart(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    batch = [ev("s", "a", T0 + 1, "u"), ev("s", "b", T0 + 2, "u")]
    first = st.append(batch)
    assert st.append(batch) == first
    assert st.append([batch[1], batch[1]]) == [first[1], first[1]]
    assert items(st.get_session("s")["events"]) == ["a", "b"]
    assert st.stats()["duplicates"] == 4
    st.close()
    again = ShardState(cfg, 0, clock=clock)
    assert again.append(batch) == first
    assert items(again.get_session("s", "u")["user_events"]) == ["a", "b"]
    # A client-supplied id wins over content: same content, new id, is a new event.
    again.append([SessionEvent.create("view", session_id="s", item_id="b", ts=T0 + 2, event_id="c-1")])
    assert items(again.get_session("s")["events"]) == ["a", "b", "b"]


def stamped(clock: Clock, session: str = "s", item: str = "a", user: str | None = "u",
            event: str = "add_to_cart") -> SessionEvent:
    """An event posted without ts and event_id: the server stamps it with its (injected) clock."""
    return SessionEvent.create(event, session_id=session, user_id=user, item_id=item, clock=clock)


def test_a_server_stamped_retry_within_the_window_is_stored_once(tmp_path: Path) -> None:
    """Events without ts and event_id get the server's time, so a retry used to get another time
    and another id and was stored twice. Within ``dedupe_window_s`` (on the injected clock, not
    the wall clock) it is the same event now; after it, a new one."""
    cfg = make_config(tmp_path, dedupe_window_s=10.0)
    clock = Clock(T0 + 9.5)  # near the end of a 10 s bucket: the retry lands in the next one
    st = ShardState(cfg, 0, clock=clock)
    (first,) = st.append([stamped(clock)])
    clock.now += 3.0
    assert st.append([stamped(clock)]) == [first]  # the retry: the original (seq, event_id)
    assert st.append([stamped(clock, item="b")]) != [first]  # other content: a new event
    clock.now += 6.9  # 9.9 s after the first
    assert st.append([stamped(clock)]) == [first]
    clock.now += 0.2  # 10.1 s after the first: outside the window, a genuine repeat
    (second,) = st.append([stamped(clock)])
    assert second != first
    assert items(st.get_session("s")["events"]) == ["a", "b", "a"]
    assert st.stats()["duplicates"] == 2
    st.close()

    # The window holds after a restart (the stored time is in the log).
    again = ShardState(cfg, 0, clock=clock)
    clock.now += 5.0
    assert again.append([stamped(clock)]) == [second]
    again.compact()  # ... and in a snapshot
    again.close()
    clock.now += 4.0
    assert ShardState(cfg, 0, clock=clock).append([stamped(clock)]) == [second]


def test_two_identical_stamped_events_in_one_batch_are_one_and_window_0_turns_it_off(
    tmp_path: Path,
) -> None:
    clock = Clock(T0)
    st = ShardState(make_config(tmp_path / "a"), 0, clock=clock)
    a, b = st.append([stamped(clock), stamped(clock)])
    assert a == b and len(st.get_session("s")["events"]) == 1
    off = ShardState(make_config(tmp_path / "b", dedupe_window_s=0), 0, clock=clock)
    (x,) = off.append([stamped(clock)])
    clock.now += 0.5
    assert off.append([stamped(clock)]) != [x]  # only the same time to the bit is the same event


def test_an_idempotency_key_is_claimed_once_per_body_and_durably(tmp_path: Path) -> None:
    from graph.errors import ConflictError

    cfg = make_config(tmp_path, snapshot_every=3)
    st = ShardState(cfg, 0, clock=Clock(T0))
    assert st.claim("key-1", "body-a") is False  # new
    assert st.claim("key-1", "body-a") is True  # a retry
    with pytest.raises(ConflictError) as info:
        st.claim("key-1", "body-b")
    assert info.value.http_status == 409 and info.value.field == "Idempotency-Key"
    assert "another request body" in info.value.message
    st.close()
    again = ShardState(cfg, 0, clock=Clock(T0))  # replayed from the log
    assert again.claim("key-1", "body-a") is True
    for k in range(4):  # past snapshot_every: the keys move into a snapshot
        again.claim(f"key-{k + 2}", "x")
    again.close()
    names = [p.name for p in (tmp_path / "wal").rglob("*") if p.is_file()]
    assert any(n.startswith("snapshot-") for n in names), names
    third = ShardState(cfg, 0, clock=Clock(T0))
    with pytest.raises(ConflictError):
        third.claim("key-1", "body-b")
    assert third.claim("key-5", "x") is True


def test_keyed_event_ids_ignore_the_server_time_but_not_the_position() -> None:
    def keyed(clock: Clock, key: str, index: int) -> str:
        return SessionEvent.create("view", session_id="s", item_id="i", clock=clock,
                                   idempotency_key=key, index=index).event_id

    assert keyed(Clock(T0), "k", 0) == keyed(Clock(T0 + 3600), "k", 0)  # a late retry
    assert keyed(Clock(T0), "k", 0) != keyed(Clock(T0), "k", 1)  # a repeat on purpose
    assert keyed(Clock(T0), "k", 0) != keyed(Clock(T0), "other", 0)
    # A client's event_id wins; an event with ts keeps its content-and-time id.
    assert SessionEvent.create("view", session_id="s", item_id="i", event_id="mine",
                               idempotency_key="k").event_id == "mine"
    with_ts = SessionEvent.create("view", session_id="s", item_id="i", ts=T0)
    assert with_ts.event_id and not with_ts.dedupe_key


def test_event_ids_and_routing_are_stable() -> None:
    a = SessionEvent.create("view", session_id="s", item_id="i", ts=T0)
    assert a.event_id == SessionEvent.create("view", session_id="s", item_id="i", ts=T0).event_id
    assert a.event_id != SessionEvent.create("click", session_id="s", item_id="i", ts=T0).event_id
    # Pinned: a different hash would route every session to another shard (state "lost").
    assert stable_hash("session-42") == 0x28BD467CBC4B1AAC
    assert [shard_for(f"session-{k}", 4) for k in range(8)] == [3, 0, 1, 0, 0, 3, 0, 2]
    # A user's implicit session is routed with the user's history.
    assert shard_for(default_session_key("u-9"), 8) == shard_for("u-9", 8)
    counts = [0] * 4
    for k in range(4000):
        counts[shard_for(f"session-{k}", 4)] += 1
    assert min(counts) > 800
    anon = SessionEvent.create("view", user_id="u-9", item_id="i", ts=T0)
    assert anon.session_id == "user:u-9"
    with pytest.raises(BadRequestError):
        SessionEvent.create("view", item_id="i")


def test_bad_events_are_rejected_naming_the_field_and_store_nothing(tmp_path: Path) -> None:
    st = ShardState(make_config(tmp_path), 0, clock=Clock(T0 + 100))
    good = ev("s", "a", T0)
    cases = {
        "events[1].event": SessionEvent("u", "s", "i", "teleport", T0),
        "events[1].item_id": SessionEvent("u", "s", None, "view", T0),
        "events[1].ts": SessionEvent("u", "s", "i", "view", T0 + 10_000),
        "events[1].session_id": SessionEvent("u", "", "i", "view", T0),
        "events[1].user_id": SessionEvent("a\nb", "s", "i", "view", T0),  # the one id rule
        "events[1].device": SessionEvent("u", "s", "i", "view", T0, device=""),
        "events[1].region": SessionEvent("u", "s", "i", "view", T0, region="r\n2"),
    }
    for field, bad in cases.items():
        with pytest.raises(BadRequestError) as info:
            st.append([good, bad])
        assert info.value.field == field, info.value.message
    st.append([SessionEvent("u", "s", None, "search", T0, query="cereal")])  # search needs no item
    assert items(st.get_session("s")["events"]) == [None]  # the good event of bad batches is absent


def test_config_errors_name_the_value_and_the_fix() -> None:
    with pytest.raises(ValidationError, match=r"window \(0\) must be between 1 and 10000"):
        SessionStateConfig(window=0)
    with pytest.raises(ValidationError, match="extra"):
        SessionStateConfig(windw=10)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="actor_prefix"):
        SessionStateConfig(actor_prefix="bad name!")
    rel = SessionStateConfig(wal_uri="state/x").resolved()
    assert Path(rel.wal_uri).is_absolute()
    assert SessionStateConfig(wal_uri="s3://b/p").resolved().wal_uri == "s3://b/p"


# --- the actor's group commit, driven without Ray ---------------------------------------------


def test_shard_stats_outside_ray_start_no_ray_cluster(tmp_path: Path) -> None:
    """A shard driven without Ray (the in-process bound, these tests) answers ``stats`` without
    initialising Ray: Ray's runtime context would start a local cluster of a dozen processes
    beside it. In a fresh interpreter, since this pytest process may hold a Ray session."""
    import subprocess
    import sys

    code = (
        "import asyncio, json, ray\n"
        "from actors.session_state import SessionShard, SessionStateConfig\n"
        f"cfg = SessionStateConfig(num_shards=1, wal_uri={str(tmp_path / 'wal')!r})\n"
        "stats = asyncio.run(SessionShard(cfg.model_dump(), 0).stats())\n"
        "print(json.dumps({'restarted': stats['restarted'], 'ray': ray.is_initialized()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == '{"restarted": false, "ray": false}', out.stdout


def test_actor_group_commits_concurrent_appends_in_arrival_order(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)

    async def scenario() -> tuple[list[list[tuple[int, str]]], int, Forgotten, list[SessionEvent]]:
        shard = SessionShard(cfg.model_dump(), 0)
        writes = 0
        real_write = shard._state.write

        def counting_write(staged: Any) -> None:
            nonlocal writes
            writes += 1
            real_write(staged)

        shard._state.write = counting_write  # type: ignore[method-assign]
        now = time.time()  # the actor validates ts against the real clock
        appends = [shard.append([ev("s", f"i{k}", now + k, "alice-7f3")]) for k in range(20)]
        results = await asyncio.gather(*appends)
        commits = writes
        forgot = await shard.forget_user("alice-7f3")
        # Queued behind a forget: deduplicated against the post-forget state, so it is stored.
        late = [shard.forget_user("alice-7f3"), shard.append([ev("s", "i0", now, "alice-7f3")])]
        await asyncio.gather(*late)
        got = await shard.get_session("s")
        return results, commits, forgot, got["events"]

    results, writes, forgot, events = asyncio.run(scenario())
    seqs = [r[0][0] for r in results]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20
    assert writes <= 2  # the 20 concurrent appends shared a commit (one fdatasync)
    assert forgot.events == 20 and forgot.sessions == 1  # the window's 20, copied in the history
    assert items(events) == ["i0"]


# --- coalescing client calls ------------------------------------------------------------------


def test_coalescer_sends_a_lone_item_at_once_and_batches_while_busy() -> None:
    from actors.session_state import Coalescer

    async def scenario() -> tuple[list[list[int]], list[Any], Coalescer]:
        calls: list[list[int]] = []
        release = asyncio.Event()

        async def send(batch: list[int]) -> list[Any]:
            calls.append(list(batch))
            if len(calls) == 1:
                await release.wait()  # the first call is "in flight" while more arrive
            return [BadRequestError(f"bad {x}", field="x") if x == 13 else x * 10 for x in batch]

        c = Coalescer(send)
        first = asyncio.create_task(c.submit(1))
        for _ in range(2):  # submit, then the pump: two loop turns, no timer
            await asyncio.sleep(0)
        assert calls == [[1]]
        rest = [asyncio.create_task(c.submit(x)) for x in (2, 13, 4)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert calls == [[1]]  # waiting for the call in flight
        release.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        return calls, results, c

    calls, results, c = asyncio.run(scenario())
    assert calls == [[1], [2, 13, 4]]
    assert results[0] == 10 and results[1] == 20 and results[3] == 40
    assert isinstance(results[2], BadRequestError)  # only the bad item fails
    assert (c.calls, c.items) == (2, 4)


def _gated_send() -> tuple[list[list[int]], list[asyncio.Event], Any]:
    """A ``send`` that records each call's batch and holds it until its gate (in call order) is
    set, then answers ten times each item."""
    calls: list[list[int]] = []
    gates: list[asyncio.Event] = []

    async def send(batch: list[int]) -> list[Any]:
        calls.append(list(batch))
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return [x * 10 for x in batch]

    return calls, gates, send


def test_coalescer_keeps_up_to_max_in_flight_calls_out_and_loses_no_item() -> None:
    """With ``max_in_flight=2`` the first two items each leave at once; what arrives while both
    are out goes together in the next call; an item submitted as a call ends is still sent."""
    from actors.session_state import Coalescer

    async def scenario() -> tuple[list[list[int]], list[Any], Coalescer]:
        calls, gates, send = _gated_send()

        c = Coalescer(send, max_in_flight=2)
        first = asyncio.create_task(c.submit(1))
        for _ in range(2):
            await asyncio.sleep(0)
        second = asyncio.create_task(c.submit(2))
        for _ in range(2):
            await asyncio.sleep(0)
        assert calls == [[1], [2]]  # two calls out at once
        rest = [asyncio.create_task(c.submit(x)) for x in (3, 4, 5)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert calls == [[1], [2]]  # both slots busy: the three wait
        gates[1].set()  # the second call answers; its pump takes the three together
        for _ in range(5):
            await asyncio.sleep(0)
        assert calls == [[1], [2], [3, 4, 5]]
        gates[0].set()
        gates[2].set()
        out = await asyncio.gather(first, second, *rest)
        # Every pump has ended; an item now starts a new call (the count of calls out is exact
        # even before the finished pumps' callbacks have run).
        late = asyncio.create_task(c.submit(6))
        for _ in range(2):
            await asyncio.sleep(0)
        gates[3].set()
        out.append(await late)
        return calls, out, c

    calls, out, c = asyncio.run(scenario())
    assert calls == [[1], [2], [3, 4, 5], [6]]
    assert out == [10, 20, 30, 40, 50, 60]
    assert (c.calls, c.items) == (4, 6)
    with pytest.raises(ValueError, match="max_in_flight"):
        asyncio.run(_coalescer_with(0))


def test_coalescer_sends_each_full_batch_at_once_so_calls_grow_with_the_load() -> None:
    """With ``max_batch``: a call carries at most that many items, and a full batch that finds
    every call busy goes out at once as one more call (what a callee that autoscales on its
    calls in flight must see); the rest wait for a call to end."""
    from actors.session_state import Coalescer

    async def scenario() -> tuple[list[list[int]], list[Any], Coalescer]:
        calls, gates, send = _gated_send()

        async def turns(n: int = 5) -> None:
            for _ in range(n):
                await asyncio.sleep(0)

        c = Coalescer(send, max_in_flight=1, max_batch=3)
        tasks = [asyncio.create_task(c.submit(1))]
        await turns()
        assert calls == [[1]]
        for x in range(2, 9):  # seven more while the first call is out
            tasks.append(asyncio.create_task(c.submit(x)))
            await turns()
        # two full batches went out at once, each as its own call; 8 waits
        assert calls == [[1], [2, 3, 4], [5, 6, 7]]
        gates[1].set()  # a call ends: its pump takes what waits
        await turns()
        assert calls == [[1], [2, 3, 4], [5, 6, 7], [8]]
        for g in gates:
            g.set()
        await turns()
        gates[-1].set()
        out = await asyncio.gather(*tasks)
        return calls, out, c

    calls, out, c = asyncio.run(scenario())
    assert calls == [[1], [2, 3, 4], [5, 6, 7], [8]]
    assert out == [10 * x for x in range(1, 9)]
    assert (c.calls, c.items) == (4, 8)
    with pytest.raises(ValueError, match="max_batch"):
        asyncio.run(_coalescer_with(1, max_batch=0))


async def _coalescer_with(max_in_flight: int, max_batch: int | None = None) -> Any:
    from actors.session_state import Coalescer

    return Coalescer(lambda batch: asyncio.sleep(0, result=batch), max_in_flight=max_in_flight,
                     max_batch=max_batch)


def test_coalescer_fails_the_whole_batch_when_the_call_fails() -> None:
    from actors.session_state import Coalescer
    from graph.errors import UnavailableError

    async def scenario() -> list[Any]:
        async def send(batch: list[int]) -> list[Any]:
            await asyncio.sleep(0)
            raise UnavailableError("shard down; retry")

        c = Coalescer(send)
        out = await asyncio.gather(*(c.submit(x) for x in range(3)), return_exceptions=True)
        # The coalescer recovers: the next item gets its own call.
        c._send = lambda batch: asyncio.sleep(0, result=batch)  # type: ignore[assignment]
        out.append(await c.submit(7))
        return out

    out = asyncio.run(scenario())
    assert all(isinstance(r, UnavailableError) for r in out[:3]) and out[3] == 7


def test_store_coalesces_concurrent_appends_and_reads_into_few_shard_calls(tmp_path: Path) -> None:
    """SessionStore over in-process shards: 40 concurrent one-event requests become a few calls
    per shard, every event is stored once in order, and a bad request fails alone."""
    from actors.session_state import SessionStore

    cfg = SessionStateConfig(num_shards=2, wal_uri=str(tmp_path / "wal"), window=100)

    class Handle:
        def __init__(self, shard: SessionShard) -> None:
            self.append_many = _Remote(shard.append_many)
            self.get_sessions = _Remote(shard.get_sessions)

    class _Remote:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def remote(self, *args: Any) -> Any:
            return self.fn(*args)

    async def scenario() -> tuple[list[Any], dict[str, dict[str, int]], list[list[str | None]]]:
        store = SessionStore.over(cfg, [Handle(SessionShard(cfg.model_dump(), i)) for i in range(2)])
        now = time.time()
        reqs = [[ev(f"s{k % 4}", f"i{k}", now + k * 1e-3, f"u{k % 3}")] for k in range(40)]
        reqs[7] = [ev("s-bad", "x", now + 10 * 86400.0)]  # from the future: rejected
        out = await asyncio.gather(*(store.append(r) for r in reqs), return_exceptions=True)
        snaps = await asyncio.gather(*(store.get(session_id=f"s{k}") for k in range(4)))
        return out, store.batching_stats(), [items(list(s.events)) for s in snaps]

    out, stats, windows = asyncio.run(scenario())
    assert isinstance(out[7], BadRequestError) and "ts" in (out[7].field or "")
    assert [len(o) for k, o in enumerate(out) if k != 7] == [1] * 39
    for s in range(4):
        assert windows[s] == [f"i{k}" for k in range(40) if k % 4 == s and k != 7]
    # 39 requests, each to its session's shard and maybe its user's: far fewer calls than that.
    assert stats["append"]["items"] >= 39 and stats["append"]["calls"] <= 8, stats
    assert stats["get"]["items"] == 4


def test_an_events_device_and_region_survive_the_log_snapshots_and_restart(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    st = ShardState(cfg, 0, clock=Clock(T0 + 100))
    st.append([SessionEvent.create("view", session_id="s", user_id="u", item_id="a", ts=T0,
                                   device="mobile", region="Texas"),
               SessionEvent.create("view", session_id="s", user_id="u", item_id="b", ts=T0 + 1)])
    st.compact()  # a snapshot record
    st.append([SessionEvent.create("click", session_id="s", user_id="u", item_id="c", ts=T0 + 2,
                                   device="app")])  # a log record
    restored = ShardState(cfg, 0, clock=Clock(T0 + 100))
    got = [(e.item_id, e.device, e.region) for e in restored.get_session("s")["events"]]
    assert got == [("a", "mobile", "Texas"), ("b", None, None), ("c", "app", None)]


def test_an_event_pickled_by_a_release_without_device_and_region_loads_whole() -> None:
    """Shards outlive a deploy and events cross between them and the ingress pickled: an event
    of the earlier release (nine fields) must load with the new fields at their defaults."""
    import pickle

    ev = SessionEvent.create("view", session_id="s", user_id="u", item_id="a", ts=T0,
                             device="tablet", region="Ohio")
    assert pickle.loads(pickle.dumps(ev)) == ev
    old_state = ev.__getstate__()[:9]  # what the earlier release's dataclass pickled
    old = SessionEvent.__new__(SessionEvent)
    old.__setstate__(old_state)
    assert old == replace(ev, device=None, region=None)
    newer = SessionEvent.__new__(SessionEvent)
    newer.__setstate__([*ev.__getstate__(), "a field of a later release"])
    assert newer == ev
