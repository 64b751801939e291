"""The ranking components on tiny hand-made data: components, exclusion, candidate subsets and
the signals' save/load round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from graph import schema as S
from graph.errors import BadRequestError
from graph.interactions import Interactions, build_interactions
from graph.ranking import (
    ContextSignal,
    Ranker,
    session_signal,
    top_k_from_scores,
)
from graph.signals import COMPONENTS, RankingSignals, attribute_value, fit_signals

CATEGORIES = [
    "DAIRY > MILK > WHOLE",      # 0 milk: user a buys it every week
    "DAIRY > CHEESE > CHEDDAR",  # 1
    "BAKERY > BREAD > WHITE",    # 2 bread pair: 2 and 3 are always bought together
    "BAKERY > BREAD > RYE",      # 3
    "PRODUCE > FRUIT > BANANA",  # 4 produce pair: 4 and 5 together
    "PRODUCE > VEG > CARROT",    # 5
    "DAIRY > YOGURT > PLAIN",    # 6
    "PRODUCE > FRUIT > APPLE",   # 7 never bought (cold)
]


def tiny_items() -> pd.DataFrame:
    return pd.DataFrame({
        S.ITEM_COL: [f"i{n}" for n in range(len(CATEGORIES))],
        S.TITLE_COL: CATEGORIES,
        S.CATEGORY_COL: CATEGORIES,
        S.DEPARTMENT_COL: [c.split(" > ")[0] for c in CATEGORIES],
        S.BRAND_COL: "b",
        S.PRICE_COL: 1.0,
    })


def events_from_baskets(baskets: list[tuple[str, str, list[int]]]) -> pd.DataFrame:
    """``(user, iso time, item numbers)`` per basket → canonical purchase events."""
    rows = []
    for n, (user, when, items) in enumerate(baskets):
        for it in items:
            rows.append({S.USER_COL: user, S.ITEM_COL: f"i{it}", S.TS_COL: pd.Timestamp(when),
                         S.EVENT_COL: S.PURCHASE, S.SESSION_COL: f"s{n}", S.QTY_COL: 1.0,
                         S.PRICE_COL: 1.0, S.QUERY_COL: None})
    return pd.DataFrame(rows).sort_values(S.TS_COL, kind="stable").reset_index(drop=True)


TRAIN_BASKETS: list[tuple[str, str, list[int]]] = [
    ("a", "2017-01-02 10:00", [0, 2, 3]),
    ("a", "2017-01-09 10:00", [0, 1]),
    ("a", "2017-01-16 10:00", [0, 4, 5]),
    ("a", "2017-01-23 10:00", [0, 6]),
    ("b", "2017-01-03 18:00", [2, 3, 6]),
    ("b", "2017-01-10 18:00", [4, 5]),
    ("b", "2017-01-17 18:00", [2, 3, 1]),
    ("c", "2017-01-05 12:00", [4, 5, 1]),
    ("c", "2017-01-12 12:00", [2, 3]),
    ("c", "2017-01-19 12:00", [4, 5, 6]),
]


def tiny_setup() -> tuple[pd.DataFrame, Interactions, RankingSignals]:
    train = events_from_baskets(TRAIN_BASKETS)
    inter = build_interactions(train, tiny_items())
    return train, inter, fit_signals(train, inter)


def tiny_ranker() -> tuple[Ranker, Interactions]:
    _, inter, signals = tiny_setup()
    rng = np.random.default_rng(0)
    user_emb = rng.normal(size=(inter.num_users, 4)).astype(np.float32)
    item_emb = rng.normal(size=(inter.num_items, 4)).astype(np.float32)
    return Ranker(user_emb, item_emb, signals, chunk_size=2), inter


def test_session_signal_weights_decay_and_removals() -> None:
    now = 10_000.0
    s = session_signal(
        [(3, S.VIEW, now), (3, S.ADD_TO_CART, now), (5, S.ADD_TO_CART, now - 1800.0),
         (5, S.REMOVE_FROM_CART, now), (7, S.VIEW, now), (7, S.REMOVE_FROM_CART, now)],
        now=now, half_life_s=1800.0,
    )
    got = dict(zip(s.items.tolist(), s.weights.tolist(), strict=True))
    assert got[3] == pytest.approx(0.2 + 0.7)
    assert got[5] == pytest.approx(0.7 * 0.5 - 0.5)  # removed after adding: net negative
    assert got[7] == pytest.approx(0.2 - 0.5)
    assert session_signal([], now).is_empty
    with pytest.raises(BadRequestError, match="teleport"):
        session_signal([(1, "teleport", now)], now)


def test_context_signal_from_timestamp_and_validation() -> None:
    c = ContextSignal.from_timestamp(pd.Timestamp("2017-12-25 15:30"), "US")
    assert (c.weekday, c.hour, c.is_holiday) == (0, 15, True)
    assert not ContextSignal.from_timestamp(pd.Timestamp("2017-12-26 15:30")).is_holiday
    with pytest.raises(BadRequestError, match="hour"):
        ContextSignal(weekday=1, hour=24)


def test_components_shapes_and_keys() -> None:
    ranker, inter = tiny_ranker()
    sess = session_signal([(2, S.ADD_TO_CART, 0.0)], now=0.0)
    comps = ranker.components([0, 1, None], [sess, None, sess],
                              [ContextSignal(0, 10), None, ContextSignal(5, 20, True)])
    assert list(comps) == list(COMPONENTS)
    for values in comps.values():
        assert values.shape == (3, inter.num_items)
        assert values.dtype == np.float32
        assert np.isfinite(values).all()


def test_a_request_without_session_alone_equals_its_row_in_a_mixed_batch() -> None:
    """A chunk without any session skips the session matrices: its components must equal what
    the matrices give for a session-less row next to one with a cart."""
    ranker, _ = tiny_ranker()
    cart = session_signal([(4, S.ADD_TO_CART, 0.0)], now=0.0)
    cand = np.array([5, 0, 3, 6])
    mixed = ranker.components([1, 1], [cart, None], None, candidates=cand)
    alone = ranker.components([1], [None], None, candidates=cand)
    for c in COMPONENTS:
        np.testing.assert_allclose(alone[c][0], mixed[c][1], rtol=1e-6, atol=1e-6, err_msg=c)
        assert alone[c].dtype == np.float32 and alone[c].shape == (1, len(cand))


def test_unknown_user_gets_session_context_and_popularity_only() -> None:
    ranker, _ = tiny_ranker()
    sess = session_signal([(2, S.ADD_TO_CART, 0.0)], now=0.0)
    comps = ranker.components([None], [sess], [ContextSignal(0, 10)])
    assert not comps["gnn"].any()
    assert not comps["repeat"].any()
    for c in ("session", "cooc", "pop", "context"):
        assert comps[c].any(), c
    # Without a session an unknown user still has popularity to go by.
    alone = ranker.components([None], None, None)
    assert alone["pop"].any() and not alone["session"].any()


def test_repeat_favours_what_the_user_keeps_buying() -> None:
    ranker, inter = tiny_ranker()
    a = inter.user_index()["a"]
    rep = ranker.components([a], None, None)["repeat"][0]
    assert rep.argmax() == 0  # milk, in each of a's baskets
    # In every one of a's baskets (both shares are 1), damped by milk's repeat rate.
    rate = float(ranker.signals.item_repeat_rate[0])
    assert 0.0 < rate < 1.0
    assert rep[0] == pytest.approx(rate ** ranker.signals.params.repeat_rate_power, rel=1e-5)
    assert rep[7] == 0.0  # never bought


def test_session_item_raises_its_cooccurring_neighbour() -> None:
    ranker, _ = tiny_ranker()
    cart = session_signal([(4, S.ADD_TO_CART, 0.0)], now=0.0)  # banana
    cooc = ranker.components([None], [cart], None)["cooc"][0]
    assert not ranker.components([None], [None], None)["cooc"].any()
    assert cooc[5] > cooc[[0, 1, 2, 3, 6, 7]].max()  # carrot is banana's neighbour


def test_session_item_raises_its_product_line() -> None:
    ranker, _ = tiny_ranker()
    # Apple (7) was never bought but shares banana's line (PRODUCE > FRUIT, same brand).
    assert ranker.signals.item_line[7] == ranker.signals.item_line[4]
    assert ranker.signals.item_line[5] != ranker.signals.item_line[4]
    cart = session_signal([(4, S.ADD_TO_CART, 0.0)], now=0.0)
    line = ranker.components([None], [cart], None)["line"][0]
    assert line[7] == pytest.approx(1.0) and line[4] == pytest.approx(1.0)
    assert not line[[0, 1, 2, 3, 5, 6]].any()


def test_basket_follows_the_users_own_past_baskets() -> None:
    ranker, inter = tiny_ranker()
    a = inter.user_index()["a"]
    cart = session_signal([(4, S.ADD_TO_CART, 0.0)], now=0.0)
    basket = ranker.components([a, None], [cart, cart], None)["basket"]
    # a bought banana (4) once, in basket [0, 4, 5]: milk and carrot came with it.
    np.testing.assert_allclose(basket[0, [0, 4, 5]], 1.0, rtol=1e-6)
    assert not basket[0, [1, 2, 3, 6, 7]].any()
    assert not basket[1].any()  # unknown user: no past baskets
    # An item a never bought with anything in the cart scores 0.
    other = session_signal([(7, S.ADD_TO_CART, 0.0)], now=0.0)
    assert not ranker.components([a], [other], None)["basket"].any()


def test_exclusion_removes_items_and_pads() -> None:
    ranker, inter = tiny_ranker()
    excl = np.array([0, 2, 3])
    pop = ranker.components([0, 1], None, None)["pop"]
    idx, scores = top_k_from_scores(pop, inter.num_items, [excl, None])
    assert not np.isin(idx[0][idx[0] >= 0], excl).any()
    assert (idx[0] == -1).sum() == len(excl)
    assert np.isneginf(scores[0][idx[0] == -1]).all()
    assert set(idx[1].tolist()) == set(range(inter.num_items))


def test_candidate_subset_matches_full_ranking() -> None:
    ranker, _ = tiny_ranker()
    users = [0, None, 2]
    sess = [session_signal([(2, S.ADD_TO_CART, 0.0), (4, S.VIEW, 0.0)], now=0.0), None,
            session_signal([(6, S.CLICK, 0.0)], now=0.0)]
    ctx = [ContextSignal(0, 10), ContextSignal(6, 3, True), None]
    cand = np.array([6, 1, 5, 0])
    comps_full = ranker.components(users, sess, ctx)
    comps_cand = ranker.components(users, sess, ctx, candidates=cand)
    for c in COMPONENTS:
        np.testing.assert_allclose(comps_cand[c], comps_full[c][:, cand], rtol=1e-5, atol=1e-6)


def test_repeat_of_candidates_equals_the_whole_history_row_exactly() -> None:
    from graph.ranking import _dense, repeat_scores, repeat_scores_of

    ranker, inter = tiny_ranker()
    sig = ranker.signals
    users = np.array([0, -1, 1, 2, 0])
    rng = np.random.default_rng(0)
    for cand in (np.array([6, 1, 5, 0]), rng.permutation(inter.num_items),
                 np.array([7, 7, 0]), np.zeros(0, dtype=np.int64)):
        got = repeat_scores_of(sig, users, cand)
        assert got.dtype == np.float32 and got.shape == (len(users), len(cand))
        np.testing.assert_array_equal(got, _dense(repeat_scores(sig, users), cand))
    assert repeat_scores_of(sig, users, np.arange(inter.num_items))[0].any()


def test_basket_of_candidates_equals_the_whole_basket_row_exactly() -> None:
    from graph.ranking import _dense, basket_scores, basket_scores_of

    ranker, inter = tiny_ranker()
    sig = ranker.signals
    users = np.array([0, -1, 1, 2, 2])
    sessions = ranker._session_matrix([
        session_signal([(2, S.ADD_TO_CART, 0.0), (4, S.VIEW, 0.0)], now=0.0),
        session_signal([(2, S.ADD_TO_CART, 0.0)], now=0.0),
        session_signal([(3, S.VIEW, 0.0)], now=0.0),
        None,
        session_signal([(6, S.CLICK, 0.0), (7, S.VIEW, 0.0)], now=0.0),
    ])
    rng = np.random.default_rng(0)
    for cand in (np.array([6, 1, 5, 0]), rng.permutation(inter.num_items),
                 np.array([3, 7, 3, 0]), np.zeros(0, dtype=np.int64)):
        got = basket_scores_of(sig, users, sessions, cand)
        assert got.dtype == np.float32 and got.shape == (len(users), len(cand))
        np.testing.assert_array_equal(got, _dense(basket_scores(sig, users, sessions), cand))
    assert basket_scores_of(sig, users, sessions, np.arange(inter.num_items))[0].any()


def test_shape_mismatch_is_rejected() -> None:
    _, inter, signals = tiny_setup()
    from graph.errors import ArtifactError

    with pytest.raises(ArtifactError, match="do not match"):
        Ranker(np.zeros((inter.num_users, 4)), np.zeros((inter.num_items + 1, 4)), signals)


def test_signals_save_load_round_trip(tmp_path: Path) -> None:
    _, _, signals = tiny_setup()
    signals.save(tmp_path)
    assert all(p.is_file() for p in tmp_path.iterdir())  # flat folder: artifacts copy files
    back = RankingSignals.load(tmp_path)
    for name in ("popularity", "hist_indptr", "hist_indices", "hist_weight", "hist_count",
                 "hist_first", "hist_last", "user_sessions", "user_decayed_sessions",
                 "user_last", "basket_indptr", "basket_items", "user_basket_indptr",
                 "item_repeat_rate", "item_department", "item_line", "item_category", "context_lift",
                 "holiday_lift", "peer_indptr", "peer_indices", "peer_score", "ease_indptr",
                 "ease_indices", "ease_score"):
        np.testing.assert_array_equal(getattr(back, name), getattr(signals, name), err_msg=name)
    assert (back.item_sim != signals.item_sim).nnz == 0
    assert back.department_names == signals.department_names
    assert back.params == signals.params
    assert back.now == signals.now


def test_signals_saved_before_peers_load_with_empty_peer_rows(tmp_path: Path) -> None:
    _, _, signals = tiny_setup()
    signals.save(tmp_path)
    (tmp_path / "peers.npz").unlink()  # what a model exported before peers holds
    (tmp_path / "ease.npz").unlink()  # ... and before EASE
    back = RankingSignals.load(tmp_path)
    assert len(back.peer_indptr) == back.num_users + 1
    assert len(back.ease_indptr) == back.num_users + 1
    for u in range(back.num_users):
        assert len(back.peers_of(u)[0]) == 0
        assert len(back.ease_of(u)[0]) == 0


def test_peer_items_vote_with_the_most_similar_shoppers() -> None:
    from scipy import sparse

    from graph.signals import peer_items

    # Users 0 and 1 share items 0-2; user 1 also buys item 3. User 2 buys only items 5 and 6.
    hist = sparse.csr_matrix(np.array([
        [2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        [2.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0],
    ]))
    indptr, indices, score = peer_items(hist, neighbours=1, top_items=10)
    row0 = indices[indptr[0]:indptr[1]].tolist()
    assert row0 == [0, 1, 2, 3]  # user 1 is user 0's peer: item 3 is a discovery for user 0
    assert 5 not in row0 and 6 not in row0  # user 2 shares nothing with user 0
    assert np.all(np.diff(indices[indptr[0]:indptr[1]]) > 0)  # sorted for searchsorted lookups
    assert np.all((score >= 0) & (score <= 1 + 1e-6))
    # top_items keeps the strongest votes only; a blocked computation gives the same answer
    i2, x2, _ = peer_items(hist, neighbours=1, top_items=2, block_bytes=1)
    assert np.diff(i2).tolist() == [2, 2, 0]  # user 2 has no one alike: no peer items
    j0 = x2[i2[0]:i2[1]].tolist()
    assert 0 in j0  # the peer's heaviest item
    i3, x3, s3 = peer_items(hist, neighbours=1, top_items=10, block_bytes=1)
    np.testing.assert_array_equal(i3, indptr)
    np.testing.assert_array_equal(x3, indices)
    np.testing.assert_allclose(s3, score, rtol=1e-6)


@pytest.mark.parametrize(("users", "dual"), [
    (40, None), (40, True), (8, None), (8, False),  # None: by items for 40 users, users for 8
])
def test_ease_items_match_the_closed_form(users: int, dual: bool | None) -> None:
    """Both ways to EASE's scores (by items: ``P`` itself; by users: the push-through and
    Woodbury identities) give the closed form, with more users than items and with fewer."""
    from scipy import sparse

    from graph.signals import ease_items

    rng = np.random.default_rng(3)
    dense = (rng.random((users, 12)) < (0.3 if users > 20 else 0.6)).astype(np.float64)
    dense[:, 11] = 0.0
    dense[0, 11] = 1.0  # one buyer only: left out of the model
    dense[5] = 0.0  # a user without purchases gets an empty row
    hist = sparse.csr_matrix(dense * 3.0)  # counts: only the pattern is used
    lam = 2.0
    indptr, indices, score = ease_items(hist, num_items=12, lam=lam, top_items=4, block_users=7,
                                        dual=dual)
    # B = I - P / diag(P) with P = (XᵀX + lam I)⁻¹ over the items with two buyers or more
    x = dense[:, :11]
    assert (dense[:, :11] > 0).sum(axis=0).min() >= 2  # every other item is in the model
    p = np.linalg.inv(x.T @ x + lam * np.eye(11))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    want = x @ b
    assert indptr[6] == indptr[5]
    for u in range(users):
        idx, sc = indices[indptr[u]:indptr[u + 1]], score[indptr[u]:indptr[u + 1]]
        if u == 5:
            continue
        assert np.all(np.diff(idx) > 0) and 11 not in idx and len(idx) <= 4
        best = np.sort(want[u])[::-1]
        np.testing.assert_allclose(sc, want[u, idx], rtol=1e-4, atol=1e-5)
        assert np.all(sc > 0) and sc.min() >= best[min(4, len(best)) - 1] - 1e-5
    # the item model is capped: only the most bought items take part
    _, x2, _ = ease_items(hist, num_items=3, lam=lam, top_items=10)
    buyers = (dense > 0).sum(axis=0)
    assert set(x2.tolist()) <= set(np.argsort(-buyers, kind="stable")[:3].tolist())


def test_ease_matrix_takes_the_most_bought_items_with_two_buyers() -> None:
    """EASE's items (shared by ``ease_items`` and ``bench/ease_inverse.py``): two buyers or
    more, the ``num_items`` with the most buyers (ties by the lower id), in ascending id order;
    ``X`` is their 0/1 pattern, and ``ease_gram`` is ``XᵀX + lam I`` of it."""
    from scipy import sparse

    from graph.signals import ease_gram, ease_matrix

    # buyers per item: 0: 3, 1: 1, 2: 2, 3: 4, 4: 2, 5: 0
    dense = np.array([[1, 0, 1, 1, 0, 0],
                      [1, 1, 0, 1, 1, 0],
                      [2, 0, 5, 1, 1, 0],
                      [0, 0, 0, 1, 0, 0]], dtype=np.float64)
    hist = sparse.csr_matrix(dense)
    top, x = ease_matrix(hist, num_items=10)
    assert top.tolist() == [0, 2, 3, 4]  # items 1 and 5 have fewer than two buyers
    np.testing.assert_array_equal(x.toarray(), (dense[:, top] > 0).astype(np.float32))
    assert x.dtype == np.float32 and x.shape == (4, 4)
    top3, _ = ease_matrix(hist, num_items=3)
    assert top3.tolist() == [0, 2, 3]  # 3 (4 buyers), 0 (3), then 2 before 4 (2 each)
    g = ease_gram(x, 2.5)
    b = (dense[:, top] > 0).astype(np.float64)
    np.testing.assert_allclose(g, b.T @ b + 2.5 * np.eye(4), rtol=0, atol=0)
    assert g.dtype == np.float32


def test_fit_signals_fits_ease_by_items_unless_by_users_is_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny data has fewer shoppers (3) than EASE items (6), where fitting by users is the
    cheaper way; the job still fits by items (graph.signals.EASE_BY_USERS) unless asked."""
    import graph.signals as G

    train = events_from_baskets(TRAIN_BASKETS)
    inter = build_interactions(train, tiny_items())
    calls: list[int] = []
    by_users = G._ease_by_users
    monkeypatch.setattr(G, "_ease_by_users", lambda *a: calls.append(1) or by_users(*a))
    items_way = fit_signals(train, inter)
    assert calls == [] and len(items_way.ease_score) > 0
    monkeypatch.setattr(G, "EASE_BY_USERS", True)
    users_way = fit_signals(train, inter)
    assert calls == [1]
    np.testing.assert_array_equal(users_way.ease_indptr, items_way.ease_indptr)
    np.testing.assert_array_equal(users_way.ease_indices, items_way.ease_indices)
    np.testing.assert_allclose(users_way.ease_score, items_way.ease_score, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_spd_inverse_is_the_whole_symmetric_inverse(dtype: type, order: str) -> None:
    from graph.signals import spd_inverse

    rng = np.random.default_rng(5)
    m = rng.standard_normal((60, 37))
    a = (m.T @ m + 3.0 * np.eye(37)).astype(dtype)
    want = np.linalg.inv(a.astype(np.float64))
    # blocks of 8 columns: the copied triangle crosses several blocks and a partial last one
    got = spd_inverse(np.array(a, order=order), block=8)
    assert got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_array_equal(got, got.T)


def test_spd_inverse_refuses_a_matrix_that_is_not_positive_definite() -> None:
    from graph.signals import spd_inverse

    with pytest.raises(np.linalg.LinAlgError):
        spd_inverse(np.array([[1.0, 2.0], [2.0, 1.0]]))


def test_peers_feature_and_candidates_for_a_known_user() -> None:
    from graph.features import FEATURES

    ranker, _ = tiny_ranker()
    sig = ranker.signals
    assert "peers" in FEATURES and "src_peers" in FEATURES
    # every tiny user has peers; their items come back sorted with scores in (0, 1]
    for u in range(sig.num_users):
        idx, sc = sig.peers_of(u)
        assert len(idx) > 0 and np.all(np.diff(idx) > 0) and np.all(sc > 0)
    assert "ease" in FEATURES and "src_ease" in FEATURES
    assert len(sig.ease_indptr) == sig.num_users + 1


def test_load_reports_missing_files(tmp_path: Path) -> None:
    from graph.errors import ArtifactError

    with pytest.raises(ArtifactError, match="lack"):
        RankingSignals.load(tmp_path)


def test_adoption_and_exploration_features() -> None:
    from graph.features import ITEM_FEATURES, _exploration, item_features

    baskets: list[tuple[str, str, list[int]]] = [
        ("a", "2017-01-02 10:00", [0, 1]),  # a buys item 0 every few weeks, item 1 once long ago
        ("a", "2017-02-06 10:00", [0]),
        ("a", "2017-03-06 10:00", [0]),
        ("a", "2017-03-20 10:00", [0]),      # the signals' reference time; window from 02-20
        ("b", "2017-01-03 10:00", [2]),
        ("b", "2017-03-10 10:00", [3, 4]),   # b tries two items in the last 28 days
    ]
    train = events_from_baskets(baskets)
    inter = build_interactions(train, tiny_items())
    sig = fit_signals(train, inter)
    rng = np.random.default_rng(0)
    ranker = Ranker(rng.normal(size=(inter.num_users, 4)).astype(np.float32),
                    rng.normal(size=(inter.num_items, 4)).astype(np.float32), sig)
    static = item_features(train, tiny_items(), ranker)
    item = {name: static[:, j] for j, name in enumerate(ITEM_FEATURES)}
    # item 0: one recent buyer, not new; items 3 and 4: one new buyer each; item 2: none recent
    np.testing.assert_allclose(item["new_buyers"][[0, 3, 4]], [0.0, np.log(2), np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(item["new_share"][[0, 3, 4]], [0.0, 1.0, 1.0])
    assert np.isnan(item["new_share"][2]) and np.isnan(item["new_share"][7])
    users = list(inter.user_ids)
    span = {u: (int(sig.hist_indptr[users.index(u)]), int(sig.hist_indptr[users.index(u) + 1]))
            for u in ("a", "b")}
    assert _exploration(sig, *span["a"]) == (0.0, 0.5)  # staple buyer; item 1 bought once
    assert _exploration(sig, *span["b"]) == (1.0, 1.0)  # everything recent is new to b
    assert all(np.isnan(v) for v in _exploration(sig, 3, 3))


def _with_devices(train: pd.DataFrame) -> pd.DataFrame:
    """The tiny baskets with a device per event: user b's baskets (bread-heavy BAKERY) on
    "Mobile " (spelled as a client might), the others' on desktop, and one event with none."""
    out = train.copy()
    out[S.DEVICE_COL] = np.where(out[S.USER_COL] == "b", "Mobile ", "desktop")
    out.loc[out.index[0], S.DEVICE_COL] = None
    return out


def test_device_lift_is_fitted_from_the_events_context_column_and_used_by_the_ranker() -> None:
    train, inter, plain = tiny_setup()
    assert plain.attribute_lift == {}  # no device or region column: time and holiday only
    sig = fit_signals(_with_devices(train), inter)
    assert set(sig.attribute_lift) == {S.DEVICE_COL}
    assert set(sig.attribute_lift[S.DEVICE_COL]) == {"mobile", "desktop"}  # trimmed, lower-cased
    dept = {n: j for j, n in enumerate(sig.department_names)}
    mobile = sig.attribute_lift[S.DEVICE_COL]["mobile"]
    # b's mobile baskets hold 4 BAKERY items of 8; all events with a device 8 of 25.
    assert mobile[dept["BAKERY"]] > 0 > mobile[dept["PRODUCE"]]

    at = dict(weekday=1, hour=18)
    base = ContextSignal(**at).department_lift(sig)
    np.testing.assert_array_equal(base, sig.context_lift[1, 18])
    on_mobile = ContextSignal(**at, device="MOBILE").department_lift(sig)
    np.testing.assert_allclose(on_mobile, base + mobile)
    # A value the training events never had, and a region the data has no column for, add nothing.
    np.testing.assert_array_equal(ContextSignal(**at, device="tv", region="TX").department_lift(sig),
                                  base)
    # Reduced to what the signals know: the same lift, one context for "MOBILE" and "mobile ".
    known = ContextSignal(**at, device="MOBILE", region="TX").for_signals(sig)
    assert (known.device, known.region) == ("mobile", None)
    np.testing.assert_array_equal(known.department_lift(sig), on_mobile)
    assert ContextSignal(**at, device=" mobile").for_signals(sig) == known
    assert ContextSignal(**at, device="tv").for_signals(sig) == ContextSignal(**at)
    assert ContextSignal(**at, device="tv").for_signals(plain) == ContextSignal(**at)
    # The ranker's context component reads the same lift: bread is raised on mobile.
    ranker = Ranker(np.zeros((inter.num_users, 4), np.float32),
                    np.zeros((inter.num_items, 4), np.float32), sig)
    ctx = ranker.components([None, None], None, [ContextSignal(**at), ContextSignal(**at, device="mobile")])
    bread = list(inter.item_ids).index("i2")
    assert ctx["context"][1, bread] > ctx["context"][0, bread]


def test_context_attribute_values_are_compared_as_clients_send_them() -> None:
    assert attribute_value(" Mobile ") == "mobile"
    assert attribute_value(12.0) == "12" == attribute_value("12")  # a CSV code column with gaps
    assert attribute_value(np.float64(12.5)) == "12.5"
    for missing in (None, np.nan, pd.NA, "", "  ", "unknown", "Unknown"):
        assert attribute_value(missing) is None, missing


def test_context_attribute_lifts_survive_save_and_load(tmp_path: Path) -> None:
    train, inter, _ = tiny_setup()
    ev = _with_devices(train)
    ev[S.REGION_COL] = np.where(ev[S.USER_COL] == "c", "Rhein/Main", "TX")  # not an .npz key
    sig = fit_signals(ev, inter)
    sig.save(tmp_path)
    back = RankingSignals.load(tmp_path)
    assert set(back.attribute_lift) == {S.DEVICE_COL, S.REGION_COL}
    for col, table in sig.attribute_lift.items():
        assert list(back.attribute_lift[col]) == list(table)
        for value, row in table.items():
            np.testing.assert_array_equal(back.attribute_lift[col][value], row, err_msg=value)
    c = ContextSignal(weekday=2, hour=12, region="rhein/main")
    np.testing.assert_array_equal(c.department_lift(back), c.department_lift(sig))
    assert not np.array_equal(c.department_lift(sig), sig.context_lift[2, 12])
