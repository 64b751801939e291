"""Data loading, validation and the interaction graph."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from graph import schema as S
from graph.data import EXCLUDED_DEPARTMENTS, load_builtin, load_files, temporal_split
from graph.errors import DataError
from graph.interactions import build_interactions


def _items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "title": ["Apple", "Banana", "Cereal", "Dog food"],
            "category": ["PRODUCE > FRUIT > APPLES", "PRODUCE > FRUIT > BANANAS",
                         "GROCERY > CEREAL > KIDS", "PETS > DOG > DRY"],
            "brand": ["x", "y", "z", None],
            "price": [1.0, 0.5, 3.0, 20.0],
        }
    )


def _events() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u2", "u2", "u2"],
            "item_id": ["a", "b", None, "c", "a", "d"],
            "ts": pd.to_datetime(["2024-01-01 10:00", "2024-01-01 10:05", "2024-01-01 10:06",
                                  "2024-01-02 09:00", "2024-01-03 09:00", "2024-01-04 09:00"]),
            "event": ["view", "add_to_cart", "search", "purchase", "click", "purchase"],
            "query": [None, None, "milk", None, None, None],
        }
    )


def _write(tmp_path: Path, ev: pd.DataFrame, items: pd.DataFrame, fmt: str = "parquet") -> tuple[Path, Path]:
    e, i = tmp_path / f"events.{fmt}", tmp_path / f"items.{fmt}"
    if fmt == "parquet":
        ev.to_parquet(e)
        items.to_parquet(i)
    else:
        ev.to_csv(e, index=False)
        items.to_csv(i, index=False)
    return e, i


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_load_files_canonical(tmp_path: Path, fmt: str) -> None:
    e, i = _write(tmp_path, _events(), _items(), fmt)
    ds = load_files(e, i)
    assert list(ds.events.columns[:8]) == [S.USER_COL, S.ITEM_COL, S.TS_COL, S.EVENT_COL,
                                            S.SESSION_COL, S.QTY_COL, S.PRICE_COL, S.QUERY_COL]
    assert len(ds.events) == 6
    assert ds.events[S.TS_COL].is_monotonic_increasing
    # no session_id given: sessionised by a 30-minute inactivity gap
    u1 = ds.events[ds.events[S.USER_COL] == "u1"][S.SESSION_COL].unique()
    u2 = ds.events[ds.events[S.USER_COL] == "u2"][S.SESSION_COL].unique()
    assert len(u1) == 1 and len(u2) == 3
    assert ds.items.set_index("item_id").loc["a", "department"] == "PRODUCE"
    assert ds.items.set_index("item_id").loc["d", "brand"] == "unknown"


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    e, i = _write(tmp_path, _events().drop(columns=["event"]), _items())
    with pytest.raises(DataError, match=r"events.*lacks column.*'event'") as err:
        load_files(e, i)
    assert err.value.field == "event"
    assert str(e) in err.value.message


def test_unknown_event_type(tmp_path: Path) -> None:
    ev = _events()
    ev.loc[0, "event"] = "wishlist"
    e, i = _write(tmp_path, ev, _items())
    with pytest.raises(DataError, match=r"unknown value.*wishlist.*allowed") as err:
        load_files(e, i)
    assert err.value.field == "event"


def test_bad_timestamp(tmp_path: Path) -> None:
    ev = _events()
    ev["ts"] = ["yesterday"] * len(ev)
    e, i = _write(tmp_path, ev, _items())
    with pytest.raises(DataError, match="column 'ts' must be a timestamp") as err:
        load_files(e, i)
    assert err.value.field == "ts"


def test_empty_file(tmp_path: Path) -> None:
    e, i = _write(tmp_path, _events().iloc[:0], _items())
    with pytest.raises(DataError, match="is empty"):
        load_files(e, i)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_files(tmp_path / "nope.parquet", tmp_path / "items.parquet")


def test_non_search_event_without_item(tmp_path: Path) -> None:
    ev = _events()
    ev.loc[0, "item_id"] = None
    e, i = _write(tmp_path, ev, _items())
    with pytest.raises(DataError, match="only 'search' events may leave item_id empty"):
        load_files(e, i)


def test_items_not_in_catalogue_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ev = _events()
    ev.loc[3, "item_id"] = "zzz"
    e, i = _write(tmp_path, ev, _items())
    with caplog.at_level(logging.WARNING):
        ds = load_files(e, i)
    assert len(ds.events) == 5
    assert "1 events" in caplog.text and "zzz" in caplog.text


def test_devices_no_request_can_name_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ev = _events()
    ev["device"] = ["Mobile ", "app", None, "iOS", "android", "unknown"]
    e, i = _write(tmp_path, ev, _items())
    with caplog.at_level(logging.WARNING):
        ds = load_files(e, i)
    assert "2 value(s)" in caplog.text and "['android', 'ios']" in caplog.text, caplog.text
    assert ds.events["device"].notna().sum() == 5  # kept as they are: the lift is still learned
    caplog.clear()
    ev["device"] = "tablet"
    e, i = _write(tmp_path, ev, _items())
    with caplog.at_level(logging.WARNING):
        load_files(e, i)
    assert "device" not in caplog.text


def test_temporal_split_rejects_empty_side() -> None:
    ev = _events()
    ev["ts"] = pd.to_datetime(ev["ts"])
    with pytest.raises(DataError, match="pick --split-at"):
        temporal_split(ev, pd.Timestamp("2030-01-01"))
    train, test = temporal_split(ev, pd.Timestamp("2024-01-02"))
    assert (train["ts"] < "2024-01-02").all() and (test["ts"] >= "2024-01-02").all()


def test_builtin_slice_is_clean() -> None:
    ds = load_builtin(max_users=50, seed=1)
    ev, items = ds.events, ds.items
    assert ev[S.USER_COL].nunique() == 50
    assert (ev[S.EVENT_COL] == S.PURCHASE).all()
    assert (ev[S.QTY_COL] > 0).all() and (ev[S.PRICE_COL] > 0).all()
    assert not items[S.DEPARTMENT_COL].isin(EXCLUDED_DEPARTMENTS).any()
    assert ev[S.ITEM_COL].isin(items[S.ITEM_COL]).all()
    assert items[S.CATEGORY_COL].str.contains(" > ").mean() > 0.9
    assert ds.default_split_at == pd.Timestamp("2017-12-01")
    # the same seed gives the same slice
    assert load_builtin(max_users=50, seed=1).fingerprint() == ds.fingerprint()


def test_edge_weights_follow_event_strength_and_recency() -> None:
    items = _items()
    now = pd.Timestamp("2024-02-01")
    ev = pd.DataFrame(
        {
            "user_id": ["p", "c", "k", "v", "old", "new"],
            "item_id": ["a", "a", "a", "a", "b", "b"],
            "ts": [now] * 4 + [now - pd.Timedelta(days=180), now],
            "event": ["purchase", "add_to_cart", "click", "view", "purchase", "purchase"],
        }
    )
    g = build_interactions(ev, items, now=now, half_life_days=90)
    users = g.user_ids.tolist()
    w = {users[u]: float(x) for u, x in zip(g.edge_index[0].tolist(), g.edge_weight.tolist(), strict=True)}
    assert w["p"] > w["c"] > w["k"] > w["v"] > 0
    assert w["old"] == pytest.approx(w["new"] * 0.25, rel=1e-4)  # two half-lives
    assert g.num_items == 4 and g.item_features.shape == (4, len(g.feature_names))
    assert g.item_has_edges().tolist() == [True, True, False, False]
    # cold items still have feature indices (department etc. known)
    assert (g.item_features[2:, :3] > 0).all()
    assert all(int(g.item_features[:, j].max()) < c for j, c in enumerate(g.feature_cardinalities))


def test_fixed_user_index_drops_other_users() -> None:
    ev = _events()
    ev["ts"] = pd.to_datetime(ev["ts"])
    g = build_interactions(ev, _items(), user_ids=np.array(["u2", "zz"]))
    assert g.user_ids.tolist() == ["u2", "zz"]
    assert set(g.edge_index[0].tolist()) == {0}


@pytest.mark.parametrize("variant", ["minimal", "half_summer"])
def test_other_data_variants_load_as_canonical_files(tmp_path: Path, variant: str) -> None:
    """bench/other_data.py's retailers go through the path any other data takes."""
    from bench.other_data import VARIANTS

    ds = load_builtin(max_users=60, seed=2)
    ev, items, split = VARIANTS[variant](ds)
    ev.to_parquet(tmp_path / "events.parquet", index=False)
    items.to_parquet(tmp_path / "items.parquet", index=False)
    loaded = load_files(tmp_path / "events.parquet", tmp_path / "items.parquet")
    assert len(loaded.events) == len(ev) > 0
    before = loaded.events[S.TS_COL] < pd.Timestamp(split)
    assert before.any() and (~before).any()  # both sides of the split hold events
    if variant == "minimal":
        assert list(ev.columns) == [S.USER_COL, S.ITEM_COL, S.TS_COL, S.EVENT_COL]
        assert list(items.columns) == [S.ITEM_COL, S.CATEGORY_COL]
        # sessions from inactivity gaps, the title from the category, brand and price unknown
        e = loaded.events
        assert (e[S.SESSION_COL].str.rsplit(":", n=1).str[0] == e[S.USER_COL]).all()
        assert (loaded.items[S.TITLE_COL] == loaded.items[S.CATEGORY_COL]).all()
        assert (loaded.items[S.BRAND_COL] == "unknown").all()
        assert loaded.items[S.PRICE_COL].isna().all()
    else:
        assert loaded.events[S.USER_COL].nunique() <= ds.events[S.USER_COL].nunique() // 2 + 1
        assert loaded.events[S.TS_COL].max() < pd.Timestamp("2017-07-01")
