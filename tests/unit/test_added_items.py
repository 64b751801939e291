"""The added-items folder (actors/added_items.py): one record per item, replaced whole, listed by
every replica, read again after a restart."""

from __future__ import annotations

from pathlib import Path

from actors.added_items import AddedItems
from graph.new_items import NewItem


def test_records_are_replaced_listed_and_read_after_a_restart(tmp_path: Path) -> None:
    folder = str(tmp_path / "state" / "items")
    store = AddedItems(folder)
    assert store.load() == [] and store.stamp() == ()
    a = NewItem("shop/42\u2028x", "Yuzu soda", "GROCERY > SOFT DRINKS", None, 2.5)
    store.put(a)
    first = store.stamp()
    other = AddedItems(folder)  # another replica, or this one after a restart
    assert other.load() == [a]
    store.put(NewItem(a.item_id, "Yuzu soda", "GROCERY > SOFT DRINKS", "Fizzco", 1.99))
    assert other.stamp() != first and len(other.stamp()) == 1  # replaced, not added
    assert other.load()[0].price == 1.99 and other.load()[0].brand == "Fizzco"
    store.put(NewItem("b", "Kombucha", "GROCERY > TEA", None, None))
    assert [it.item_id for it in other.load()] == ["b", a.item_id]
    assert not list(Path(folder).glob(".*"))  # no temporary file left behind


def test_a_damaged_record_is_skipped(tmp_path: Path) -> None:
    store = AddedItems(str(tmp_path))
    store.put(NewItem("a", "Yuzu soda", "GROCERY > SOFT DRINKS", None, 2.5))
    (tmp_path / "deadbeef.json").write_text('{"item_id": "x", "tit')
    assert [it.item_id for it in store.load()] == ["a"]


def test_without_a_folder_records_live_in_memory() -> None:
    store = AddedItems(None)
    store.put(NewItem("a", "Yuzu soda", "GROCERY > SOFT DRINKS", None, 2.5))
    assert [it.item_id for it in store.load()] == ["a"] and store.stamp()


def test_availability_is_kept_and_records_without_it_are_available(tmp_path: Path) -> None:
    store = AddedItems(str(tmp_path))
    store.put(NewItem("gone", "Yuzu soda", "GROCERY > SOFT DRINKS", None, 2.5, available=False))
    # A record written before items had an availability.
    (tmp_path / "0123abcd.json").write_text(
        '{"item_id": "old", "title": "Kombucha", "category": "GROCERY > TEA", "brand": null, '
        '"price": null}')
    assert {it.item_id: it.available for it in AddedItems(str(tmp_path)).load()} == {
        "gone": False, "old": True}
