"""The feedback loop's offline half: exporting accepted events from the session log
(actors/session_export.py) and adding them to the training data (graph/online_events.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actors.session_events import SessionEvent
from actors.session_export import export_online_events, read_online_events
from actors.session_state import SessionStateConfig, ShardState
from graph import schema as S
from graph.errors import ConfigError, DataError
from graph.online_events import merge_online
from graph.online_events import read_online_events as read_canonical
from graph.signals import attribute_lifts

T0 = 1_764_460_800.0  # 2025-11-30


def ev(n: int, session: str, user: str | None, item: str | None = None, event: str = "click",
       query: str | None = None) -> SessionEvent:
    return SessionEvent.create(event, session_id=session, user_id=user, item_id=item,
                               ts=T0 + n, query=query)


def shard_log(tmp_path: Path) -> tuple[SessionStateConfig, list[ShardState]]:
    cfg = SessionStateConfig(num_shards=2, wal_uri=str(tmp_path / "wal"), fsync=False)
    return cfg, [ShardState(cfg, i, clock=lambda: T0 + 100) for i in range(2)]


def test_export_reads_snapshots_and_logs_once_each_and_applies_forgets(tmp_path: Path) -> None:
    _, shards = shard_log(tmp_path)
    a, b = shards
    a.append([ev(1, "s1", "u1", "i1"), ev(2, "s1", "u1", "i2", "add_to_cart")])
    a.compact()  # these two are now in a snapshot, not in a log segment
    a.append([ev(3, "s1", "u1", "i3")])
    a.append([ev(3, "s1", "u1", "i3")])  # a retry: the same event id, stored once
    b.append([ev(5, "anon", None, "i4"), ev(6, "anon", None, None, "search", query="milk")])
    b.append([ev(7, "s9", "gone", "i5"), ev(8, "s9", None, "i6")])
    b.forget_user("gone")  # drops the user's session, anonymous events of it included
    b.append([ev(9, "s10", "gone", "i7")])  # a later event of the same id is a new one

    events, report = read_online_events(str(tmp_path / "wal"))
    got = [(e.user_id, e.session_id, e.item_id, e.event) for e in events]
    assert got == [("u1", "s1", "i1", "click"), ("u1", "s1", "i2", "add_to_cart"),
                   ("u1", "s1", "i3", "click"), (None, "anon", "i4", "click"),
                   (None, "anon", None, "search"), ("gone", "s10", "i7", "click")]
    # (the forget compacted shard 1 into a snapshot without the user: no forget record is left)
    assert report.shards == 2 and report.anonymous_events == 2

    out = tmp_path / "online.parquet"
    export_online_events(str(tmp_path / "wal"), str(out))
    df = read_canonical(out)  # the canonical schema, validated like --events
    assert set(df[S.USER_COL]) == {"u1", "session:anon", "gone"}
    assert df[S.TS_COL].min() == pd.Timestamp(T0 + 1, unit="s")
    assert df.loc[df[S.EVENT_COL] == S.SEARCH, S.QUERY_COL].tolist() == ["milk"]


def test_export_carries_the_events_device_and_region_as_the_context_columns(tmp_path: Path) -> None:
    _, shards = shard_log(tmp_path)
    shards[0].append([SessionEvent.create("view", session_id="s1", user_id="u1", item_id="i1",
                                          ts=T0 + 1, device="mobile", region="Texas"),
                      ev(2, "s1", "u1", "i2")])
    out = tmp_path / "online.parquet"
    export_online_events(str(tmp_path / "wal"), str(out))
    df = read_canonical(out).sort_values(S.TS_COL)
    assert df[S.DEVICE_COL].iloc[0] == "mobile" and pd.isna(df[S.DEVICE_COL].iloc[1])
    assert df[S.REGION_COL].iloc[0] == "Texas" and pd.isna(df[S.REGION_COL].iloc[1])
    # Without any device or region, the export has no such columns (as before).
    _, plain = shard_log(tmp_path / "plain")
    plain[0].append([ev(1, "s1", "u1", "i1")])
    export_online_events(str(tmp_path / "plain" / "wal"), str(out))
    assert not set(S.CONTEXT_ATTRIBUTES) & set(read_canonical(out).columns)


def test_export_skips_a_torn_last_record_without_changing_the_log(tmp_path: Path) -> None:
    _, shards = shard_log(tmp_path)
    shards[0].append([ev(1, "s1", "u1", "i1")])
    seg = next((tmp_path / "wal").glob("shard-0000-of-0002/wal-*.jsonl"))
    seg.write_bytes(seg.read_bytes() + b'{"t":"append","ev')  # a write cut short by a crash
    before = seg.read_bytes()
    events, _ = read_online_events(str(tmp_path / "wal"))
    assert [e.item_id for e in events] == ["i1"]
    assert seg.read_bytes() == before


def test_export_of_a_folder_without_shards_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        read_online_events(str(tmp_path))
    assert err.value.field == "online_events" and "wal_uri" in err.value.message


def _frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame({S.USER_COL: [r[0] for r in rows], S.ITEM_COL: [r[1] for r in rows],
                         S.TS_COL: pd.to_datetime([r[2] for r in rows]),
                         S.EVENT_COL: [S.PURCHASE] * len(rows)})


def test_merge_shifts_late_events_to_end_at_the_split_and_drops_the_unusable() -> None:
    items = pd.DataFrame({S.ITEM_COL: ["a", "b", "c"]})
    train = _frame([("u1", "a", "2017-01-01"), ("u2", "b", "2017-06-01")])
    online = _frame([("u1", "c", "2026-11-29 10:00"), ("new", "a", "2026-11-30 10:00"),
                     ("new", "zzz", "2026-11-30 11:00"), ("forgotten", "a", "2026-11-30 12:00")])
    split = pd.Timestamp("2017-12-01")
    merged, info = merge_online(train, online, items, split, forgotten={"forgotten"})
    assert (info.events, info.new_users, info.unknown_items, info.forgotten_events) == (2, 1, 1, 1)
    added = merged[merged[S.TS_COL] > "2017-07-01"]
    assert added[S.TS_COL].max() == split - pd.Timedelta(seconds=1)
    # Order and gaps are kept.
    assert added[S.TS_COL].diff().iloc[-1] == pd.Timedelta(days=1)
    assert merged[S.TS_COL].is_monotonic_increasing and len(merged) == 4
    with pytest.raises(DataError) as err:
        merge_online(train, online.iloc[2:3], items, split)
    assert err.value.field == "online_events"


def test_merge_keeps_the_online_device_column_the_base_data_lacks() -> None:
    """The built-in data has no device column: the online events' devices must still reach the
    signals, which fit one department lift per device from them."""
    items = pd.DataFrame({S.ITEM_COL: ["a", "b"]})
    train = _frame([("u1", "a", "2017-01-01"), ("u2", "b", "2017-06-01")])
    online = _frame([("u1", "b", "2017-11-01"), ("u3", "a", "2017-11-02")]).assign(
        **{S.DEVICE_COL: ["app", "desktop"]})
    merged, _ = merge_online(train, online, items, pd.Timestamp("2017-12-01"))
    assert merged[S.DEVICE_COL][:2].isna().all()
    assert merged[S.DEVICE_COL].tolist()[2:] == ["app", "desktop"]
    lifts = attribute_lifts(merged, np.array([0, 1, 1, 0]), 2, prior=1.0)
    assert set(lifts) == {S.DEVICE_COL} and set(lifts[S.DEVICE_COL]) == {"app", "desktop"}
