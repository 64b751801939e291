"""Damaged session logs and snapshots: detected by a checksum per record, set aside in a
quarantine file, counted, and recovered from the last good state; never silently replayed or
skipped, and never keeping a shard down."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from actors.session_log import CorruptRecordError, frame, unframe
from actors.session_state import ShardState
from tests.unit.test_session_state import T0, Clock, disk_bytes, ev, items, make_config


def _shard_dir(tmp_path: Path) -> Path:
    (d,) = (tmp_path / "wal").glob("shard-*")
    return d


def _damage(path: Path, line_index: int, old: bytes, new: bytes) -> bytes:
    """Replace ``old`` by ``new`` in one line of ``path``; returns the damaged line."""
    lines = path.read_bytes().split(b"\n")
    assert old in lines[line_index], lines[line_index]
    lines[line_index] = lines[line_index].replace(old, new, 1)
    path.write_bytes(b"\n".join(lines))
    return lines[line_index]


def test_frame_and_unframe_detect_a_changed_byte() -> None:
    rec = b'{"t":"append","events":[]}'
    framed = frame(rec + b"\n")
    assert unframe(framed.rstrip(b"\n")) == rec
    assert unframe(rec) == rec  # a line written before checksums
    with pytest.raises(CorruptRecordError, match="checksum mismatch"):
        unframe(framed.rstrip(b"\n").replace(b"append", b"appenD"))
    with pytest.raises(CorruptRecordError):
        unframe(b"garbage")


@pytest.mark.parametrize(("old", "new"), [(b'"b"', b'"x"'), (b'"events"', b'"ev\xffnts')],
                         ids=["valid-json-but-changed", "unreadable"])
def test_a_damaged_middle_log_record_is_quarantined_and_every_good_record_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, old: bytes, new: bytes) -> None:
    cfg = make_config(tmp_path)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    for k, item in enumerate("abc"):
        st.append([ev("s", item, T0 + k)])
    st.close()
    (wal,) = _shard_dir(tmp_path).glob("wal-*.jsonl")
    bad = _damage(wal, 1, old, new)

    with caplog.at_level(logging.ERROR, logger="actors.session_state"):
        again = ShardState(cfg, 0, clock=clock)
    assert items(again.get_session("s")["events"]) == ["a", "c"]  # the record after it is kept
    stats = again.stats()
    assert stats["corrupt_records"] == 1 and stats["quarantined_bytes"] == len(bad)
    (q,) = _shard_dir(tmp_path).glob("quarantine-*.bad")
    assert q.read_bytes() == bad and q.name.endswith("-00000002.bad")
    assert "corrupt record" in caplog.text and q.name in caplog.text
    # The restore compacted the good state: the damage is out of the live log, and the shard
    # keeps working and restarting cleanly.
    again.append([ev("s", "d", T0 + 5)])
    again.close()
    third = ShardState(cfg, 0, clock=clock)
    assert items(third.get_session("s")["events"]) == ["a", "c", "d"]
    assert third.stats()["corrupt_records"] == 0


def test_a_damaged_latest_snapshot_falls_back_to_the_previous_one_and_the_log(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path, snapshot_every=2)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    for k in range(7):
        st.append([ev("s", f"i{k}", T0 + k, "u")])
    st.close()
    snapshots = sorted(_shard_dir(tmp_path).glob("snapshot-*.jsonl"))
    assert len(snapshots) == 2, "one older generation is kept as the fallback"
    _damage(snapshots[-1], 1, b'"i', b'"I')

    again = ShardState(cfg, 0, clock=clock)  # today: the shard does not start
    assert items(again.get_session("s", "u")["events"]) == [f"i{k}" for k in range(7)]
    assert items(again.get_session("s", "u")["user_events"]) == [f"i{k}" for k in range(7)]
    assert again.stats()["corrupt_snapshots"] == 1
    assert list(_shard_dir(tmp_path).glob(f"quarantine-{snapshots[-1].name}.bad"))
    again.close()
    third = ShardState(cfg, 0, clock=clock)
    assert items(third.get_session("s")["events"]) == [f"i{k}" for k in range(7)]
    assert third.stats()["corrupt_snapshots"] == 0


def test_an_unreadable_header_with_no_older_snapshot_restores_from_the_log(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, snapshot_every=2)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    for k in range(3):
        st.append([ev("s", f"i{k}", T0 + k)])
    st.close()
    (snap,) = _shard_dir(tmp_path).glob("snapshot-*.jsonl")
    snap.write_bytes(b"\x00" * 64)  # e.g. a disk that lost the file's blocks

    again = ShardState(cfg, 0, clock=clock)
    # The log before the first snapshot is gone (compacted), so only what followed it is back;
    # the loss is counted and logged, and the shard serves.
    assert items(again.get_session("s")["events"]) == ["i2"]
    assert again.stats()["corrupt_snapshots"] == 1


def test_a_damaged_snapshot_line_with_no_older_snapshot_keeps_the_other_lines(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path, snapshot_every=2)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    st.append([ev("s1", "a", T0), ev("s2", "b", T0 + 1)])
    st.close()
    (snap,) = _shard_dir(tmp_path).glob("snapshot-*.jsonl")
    _damage(snap, 1, b'"a"', b'"z"')

    again = ShardState(cfg, 0, clock=clock)
    assert again.get_session("s1")["events"] == []
    assert items(again.get_session("s2")["events"]) == ["b"]
    assert again.stats()["corrupt_records"] == 1


def test_forget_removes_the_user_from_the_older_generation_and_the_quarantine(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path, snapshot_every=2, max_sessions_per_shard=1, user_history=0)
    clock = Clock(T0 + 100)
    st = ShardState(cfg, 0, clock=clock)
    st.append([ev("s1", "a", T0, "alice-7f3"), ev("s1", "b", T0 + 1, "alice-7f3")])  # snapshot 1
    for k in range(4):  # evicts alice's session; two more snapshots
        st.append([ev(f"t{k}", "x", T0 + 2 + k, "bob-1c9")])
    st.close()
    (wal,) = sorted(_shard_dir(tmp_path).glob("wal-*.jsonl"))[-1:]
    wal.write_bytes(wal.read_bytes() + frame(b'{"t":"append","user":"alice-7f3"}\n')[:-5] + b"!!\n")
    again = ShardState(cfg, 0, clock=clock)
    assert again.stats()["corrupt_records"] == 1
    assert b"alice-7f3" in disk_bytes(tmp_path)

    again.forget_user("alice-7f3")
    assert b"alice-7f3" not in disk_bytes(tmp_path)
