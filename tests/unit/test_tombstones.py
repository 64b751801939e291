"""The forgotten-users file (actors/tombstones.py): one id per record, whatever the id holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.tombstones import Tombstones


@pytest.mark.parametrize("user_id", ["a\nb", "a\rb", "a\u2028b", "a\x85b", 'a"\\b', "shop/42"])
def test_an_id_is_one_record_whatever_it_holds(tmp_path: Path, user_id: str) -> None:
    path = str(tmp_path / "forgotten_users.txt")
    Tombstones(path).add(user_id)
    fresh = Tombstones(path)  # another replica, or this one after a restart
    assert user_id in fresh
    assert "a" not in fresh and "b" not in fresh and "shop" not in fresh
    assert len(Path(path).read_text().splitlines()) == 1


def test_lines_of_the_earlier_plain_format_are_still_honoured(tmp_path: Path) -> None:
    path = tmp_path / "forgotten_users.txt"
    path.write_text("old-user-1\nold-user-2\n")
    t = Tombstones(str(path))
    t.add("new\nuser")
    again = Tombstones(str(path))
    assert all(u in again for u in ("old-user-1", "old-user-2", "new\nuser"))
    assert "new" not in again and "user" not in again


def test_a_torn_last_record_does_not_swallow_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "forgotten_users.txt"
    path.write_text('"half-writ')  # the process died mid-write: never acknowledged
    Tombstones(str(path)).add("next-user")
    assert "next-user" in Tombstones(str(path))
