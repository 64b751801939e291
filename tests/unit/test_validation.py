"""Validation recall@20 of the embeddings per epoch (graph/validation.py) and its progress line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from graph import schema as S
from graph.interactions import build_interactions
from graph.train_loop import format_progress
from graph.validation import ValidationSample, embedding_recall, validation_sample

CUT = pd.Timestamp("2017-03-01")


def _data() -> tuple[pd.DataFrame, pd.DataFrame]:
    items = pd.DataFrame({S.ITEM_COL: [f"i{n}" for n in range(40)], S.TITLE_COL: "t",
                          S.CATEGORY_COL: "A > B > C", S.DEPARTMENT_COL: "A", S.BRAND_COL: "b",
                          S.PRICE_COL: 1.0})
    rows = []
    for u in range(30):
        for day, its in ((CUT - pd.Timedelta(days=10), (u % 40, (u + 1) % 40)),
                         (CUT + pd.Timedelta(days=2), ((u + 7) % 40,))):
            rows += [{S.USER_COL: f"u{u}", S.ITEM_COL: f"i{i}", S.TS_COL: day,
                      S.EVENT_COL: S.PURCHASE, S.SESSION_COL: f"u{u}-{day:%d}"} for i in its]
    rows.append({S.USER_COL: "only-before", S.ITEM_COL: "i3", S.TS_COL: CUT - pd.Timedelta(days=3),
                 S.EVENT_COL: S.PURCHASE, S.SESSION_COL: "x"})
    return pd.DataFrame(rows), items


def test_the_sample_is_seeded_and_holds_users_who_bought_on_both_sides_of_the_cut() -> None:
    events, items = _data()
    history, window = events[events[S.TS_COL] < CUT], events[events[S.TS_COL] >= CUT]
    inter = build_interactions(history, items)
    a = validation_sample(history, window, inter, CUT, max_users=10, seed=1)
    b = validation_sample(history, window, inter, CUT, max_users=10, seed=1)
    assert len(a) == 10 and np.array_equal(a.users, b.users)
    assert not np.array_equal(a.users, validation_sample(history, window, inter, CUT,
                                                         max_users=10, seed=2).users)
    assert inter.user_index()["only-before"] not in set(a.users.tolist())
    user_ids = inter.user_ids
    for u, t in zip(a.users.tolist(), a.targets, strict=True):
        n = int(str(user_ids[u])[1:])
        assert [str(inter.item_ids[i]) for i in t] == [f"i{(n + 7) % 40}"]


def test_recall_is_one_for_embeddings_that_rank_the_targets_first_and_zero_when_last() -> None:
    sample = ValidationSample(np.array([0, 2]), [np.array([3, 4]), np.array([9])])
    items = torch.eye(50)
    users = torch.zeros(3, 50)
    users[0, [3, 4]] = 1.0
    users[2, 9] = 1.0
    assert embedding_recall(users, items, sample) == 1.0
    assert embedding_recall(-users, items, sample) == 0.0  # targets ranked last
    half = users.clone()
    half[0, 4] = -1.0
    assert embedding_recall(half, items, sample) == 0.75  # (1/2 + 1) / 2
    assert np.isnan(embedding_recall(users, items, ValidationSample(np.array([], int), [])))


def test_the_progress_line_shows_validation_recall_and_its_cost() -> None:
    m = {"epoch": 2, "epochs": 8, "loss": 0.5, "epoch_seconds": 3.0, "edges_per_second": 1e5,
         "peak_rss_mb": 900.0}
    assert "val recall" not in format_progress(m)
    line = format_progress({**m, S.VAL_METRIC: 0.0812, "val_seconds": 0.21})
    assert line.endswith("val recall@20 0.0812 (0.21s)")
