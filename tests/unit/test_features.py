"""Stage two's feature rows (graph/features.py): the basket-recency features of the repeat
component, computed from real fitted signals."""

from __future__ import annotations

import numpy as np
import pandas as pd

from graph import schema as S
from graph.features import RECENT_BASKETS, _basket_recency
from graph.interactions import build_interactions
from graph.signals import fit_signals

ITEMS = pd.DataFrame({
    S.ITEM_COL: [f"i{n}" for n in range(10)],
    S.TITLE_COL: [f"item {n}" for n in range(10)],
    S.CATEGORY_COL: "A > B > C",
    S.DEPARTMENT_COL: "A",
    S.BRAND_COL: "b",
    S.PRICE_COL: 1.0,
})

# User a's baskets, oldest first (one a week); user b has two, user c none in training.
A_BASKETS = [[1, 2], [2, 3], [4], [2], [5], [5, 2], [6], [5]]
B_BASKETS = [[7], [7, 8]]


def _events() -> pd.DataFrame:
    rows = []
    for user, baskets in (("a", A_BASKETS), ("b", B_BASKETS), ("c", [[9]])):
        for week, items in enumerate(baskets):
            for it in items:
                rows.append({S.USER_COL: user, S.ITEM_COL: f"i{it}", S.EVENT_COL: S.PURCHASE,
                             S.TS_COL: pd.Timestamp("2017-01-02") + pd.Timedelta(weeks=week),
                             # Session names that sort against time: the order must come from ts.
                             S.SESSION_COL: f"{user}-{99 - week}", S.QTY_COL: 1.0,
                             S.PRICE_COL: 1.0, S.QUERY_COL: None})
    # Rows shuffled: fit_signals must put the baskets in time order itself.
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_recent_share_and_baskets_since_last_follow_the_users_baskets_in_time_order() -> None:
    ev = _events()
    inter = build_interactions(ev, ITEMS)
    sig = fit_signals(ev, inter)
    item = inter.item_index()
    user = inter.user_index()
    assert RECENT_BASKETS == 5
    cand = np.array([item[f"i{n}"] for n in (5, 2, 1, 9, 4)])
    share, since = _basket_recency(sig, user["a"], cand)
    # a's last five baskets: [2], [5], [5, 2], [6], [5].
    np.testing.assert_allclose(share, [3 / 5, 2 / 5, 0.0, 0.0, 0.0])
    # 5 was in the latest basket; 2 two baskets before it; 1 in the first of 8; 9 never.
    np.testing.assert_allclose(since, [0.0, 2.0, 7.0, np.nan, 5.0])
    # Fewer baskets than the window: the share is over the baskets there are.
    share_b, since_b = _basket_recency(sig, user["b"], np.array([item["i8"], item["i7"]]))
    np.testing.assert_allclose(share_b, [0.5, 1.0])
    np.testing.assert_allclose(since_b, [0.0, 0.0])
