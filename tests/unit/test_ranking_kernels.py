"""The hand-rolled sparse kernels of the ranker and the ANN index switch, checked against the
plain scipy / exact faiss results they replace."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from graph import retrieval
from graph.ranking import SessionSignal, _dense, _group_shares, _rows_times_csr, csr_block

pytestmark = pytest.mark.unit


def _random_csr(rng: np.random.Generator, rows: int, cols: int, density: float) -> sp.csr_matrix:
    m = sp.random(rows, cols, density=density, format="csr", random_state=rng, dtype=np.float32)
    m.sum_duplicates()
    return m.tocsr()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_times_csr_equals_the_sparse_product_restricted_to_candidates(seed: int) -> None:
    rng = np.random.default_rng(seed)
    items = 300
    smat = _random_csr(rng, 5, items, 0.02)       # five sessions holding a few items each
    m = _random_csr(rng, items, items, 0.05)      # item-item co-occurrence
    cand = rng.choice(items, size=60, replace=False)
    expected = (smat @ m).toarray()[:, cand]
    np.testing.assert_allclose(_rows_times_csr(smat, m, cand), expected, rtol=1e-5, atol=1e-6)


def test_rows_times_csr_handles_empty_sessions_and_no_candidates() -> None:
    rng = np.random.default_rng(3)
    m = _random_csr(rng, 50, 50, 0.1)
    empty = sp.csr_matrix((2, 50), dtype=np.float32)
    cand = np.array([3, 7, 9])
    assert not _rows_times_csr(empty, m, cand).any()
    smat = _random_csr(rng, 2, 50, 0.2)
    assert _rows_times_csr(smat, m, np.array([], dtype=np.int64)).shape == (2, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_equals_scipy_column_indexing_for_any_candidates(seed: int) -> None:
    """Sorted unique candidates (a CandidateSet's), shuffled ones and repeated ones alike."""
    rng = np.random.default_rng(seed)
    m = _random_csr(rng, 4, 500, 0.03)
    m.data[m.indptr[1]:m.indptr[2]] = 0.0  # an empty row
    m.eliminate_zeros()
    for cand in (np.sort(rng.choice(500, size=80, replace=False)),
                 rng.choice(500, size=80, replace=False),
                 rng.choice(500, size=80, replace=True)):
        np.testing.assert_array_equal(_dense(m, cand), m.toarray()[:, cand].astype(np.float32))
    np.testing.assert_array_equal(_dense(m, None), m.toarray())
    assert _dense(m, np.array([], dtype=np.int64)).shape == (4, 0)
    assert not _dense(sp.csr_matrix((2, 500), dtype=np.float32), np.arange(5)).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_csr_block_equals_scipy_fancy_indexing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = _random_csr(rng, 300, 300, 0.05)
    rows = rng.choice(300, size=4, replace=False)
    for cols in (rng.choice(300, size=20, replace=False), rng.choice(300, size=20, replace=True)):
        np.testing.assert_array_equal(csr_block(m, rows, cols), m[rows][:, cols].toarray())
    assert csr_block(m, rows, np.array([], dtype=np.int64)).shape == (4, 0)
    assert csr_block(m, np.array([], dtype=np.int64), cols).shape == (0, 20)


def test_session_matrix_rows_are_the_normalised_session_weights() -> None:
    """The ranker's session matrix, built row by row, equals the COO construction it replaced."""
    from graph.ranking import Ranker

    sessions = [SessionSignal(np.array([40, 3, 17]), np.array([1.0, -0.5, 2.0], np.float32)),
                None, SessionSignal(np.zeros(0, np.int64), np.zeros(0, np.float32)),
                SessionSignal(np.array([5]), np.array([0.25], np.float32))]
    fake = type("R", (), {"num_items": 50})()
    rows_ = Ranker._session_matrix(fake, sessions)  # type: ignore[arg-type]
    got = rows_.csr()
    rows, cols, vals = [], [], []
    for b, s in enumerate(sessions):
        if s is None or s.is_empty:
            continue
        w = s.weights.astype(np.float64)
        rows += [b] * len(w)
        cols += s.items.tolist()
        vals += (w / np.abs(w).sum()).tolist()
    expected = sp.csr_matrix((vals, (rows, cols)), shape=(4, 50), dtype=np.float32)
    assert got.has_sorted_indices
    for b in range(len(sessions)):  # the arrays themselves, not only scipy's reading of them
        assert (np.diff(rows_.indices[rows_.indptr[b]:rows_.indptr[b + 1]]) > 0).all()
    np.testing.assert_array_equal(got.toarray(), expected.toarray())
    assert Ranker._session_matrix(fake, [None, None]).nnz == 0  # type: ignore[arg-type]


def test_group_shares_equals_the_product_with_a_one_hot_group_matrix() -> None:
    rng = np.random.default_rng(4)
    items, groups = 200, 17
    smat = _random_csr(rng, 6, items, 0.05)
    group_of = rng.integers(0, groups, size=items)
    onehot = sp.csr_matrix((np.ones(items), (np.arange(items), group_of)), shape=(items, groups))
    np.testing.assert_allclose(_group_shares(smat, group_of, groups), (smat @ onehot).toarray(),
                               rtol=1e-5, atol=1e-6)


def _sessions_of(rng: np.random.Generator, items: int) -> tuple[object, sp.csr_matrix]:
    """The ranker's own session rows (an empty session included) and the same as scipy CSR."""
    from graph.ranking import Ranker

    fake = type("R", (), {"num_items": items})()
    sessions = [SessionSignal(rng.choice(items, size=n, replace=False),
                              rng.normal(size=n).astype(np.float32)) if n else None
                for n in (3, 0, 1, 7, 2)]
    rows = Ranker._session_matrix(fake, sessions)  # type: ignore[arg-type]
    return rows, rows.csr()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_session_kernels_give_the_same_bits_as_the_numpy_steps(seed: int) -> None:
    """graph.kernels: the sessions' weighted embeddings, co-occurrence and group shares, bit for
    bit what scipy's product, the add.at loop and the [B, groups] table gave."""
    from graph.kernels import group_shares_at, sessions_times_dense

    rng = np.random.default_rng(seed)
    items, groups = 300, 23
    rows, smat = _sessions_of(rng, items)
    emb = rng.normal(size=(items, 16)).astype(np.float32)
    np.testing.assert_array_equal(
        sessions_times_dense(rows.indptr, rows.indices, rows.data, emb),
        np.asarray(smat @ emb, dtype=np.float32))
    m = _random_csr(rng, items, items, 0.05)
    for cand in (np.sort(rng.choice(items, size=60, replace=False)),
                 rng.choice(items, size=60, replace=False)):
        # The numpy step it replaces: every (session entry, row entry) product, added in order.
        expected = np.zeros((smat.shape[0], len(cand)), dtype=np.float32)
        first = {int(c): j for j, c in reversed(list(enumerate(cand)))}
        for b in range(smat.shape[0]):
            for e in range(smat.indptr[b], smat.indptr[b + 1]):
                i = smat.indices[e]
                for p in range(m.indptr[i], m.indptr[i + 1]):
                    j = first.get(int(m.indices[p]))
                    if j is not None:
                        expected[b, j] += np.float32(smat.data[e] * m.data[p])
        np.testing.assert_array_equal(_rows_times_csr(rows, m, cand), expected)
        np.testing.assert_allclose(_rows_times_csr(rows, m, cand), (smat @ m).toarray()[:, cand],
                                   rtol=1e-5, atol=1e-6)
        group_of = rng.integers(0, groups, size=items)
        np.testing.assert_array_equal(
            group_shares_at(rows.indptr, rows.indices, rows.data, group_of, group_of[cand]),
            _group_shares(smat, group_of, groups)[:, group_of[cand]])
    empty = np.zeros(3, dtype=np.int64)
    assert not sessions_times_dense(empty, empty[:0], np.zeros(0, np.float32), emb).any()
    assert group_shares_at(rows.indptr, rows.indices, rows.data, np.zeros(items, np.int64),
                           np.zeros(0, np.int64)).shape == (5, 0)


def test_large_catalogues_get_an_inverted_file_index_that_finds_most_exact_neighbours(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the size threshold the index is IVF (checked with a lowered threshold so the test
    stays small); it must still find most of the exact top 20 and be deterministic."""
    import faiss

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(40, 16)).astype(np.float32)
    emb = (centres[rng.integers(0, 40, size=4000)]
           + 0.3 * rng.normal(size=(4000, 16))).astype(np.float32)
    queries = emb[rng.choice(4000, size=50, replace=False)] + 0.05
    flat = faiss.IndexFlatIP(16)
    flat.add(emb)
    _, exact = flat.search(queries, 20)

    assert isinstance(retrieval.ann_index(emb), faiss.IndexFlatIP)  # below the threshold: exact
    monkeypatch.setattr(retrieval, "IVF_MIN_ITEMS", 1000)
    ivf = retrieval.ann_index(emb)
    assert isinstance(ivf, faiss.IndexIVFFlat)
    _, approx = ivf.search(queries, 20)
    overlap = np.mean([len(set(a) & set(e)) / 20 for a, e in zip(approx, exact, strict=True)])
    assert overlap >= 0.8, f"IVF found only {overlap:.0%} of the exact top 20"
    _, again = retrieval.ann_index(emb).search(queries, 20)
    np.testing.assert_array_equal(approx, again)  # seeded: the same embeddings, the same index


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_first_allowed_equals_filtering_the_whole_list(seed: int) -> None:
    # first_allowed only tests the first k + len(excluded) items of a long list; the answer must
    # be the one of filtering all of it, whether the exclusions sit in the head, past it or both.
    rng = np.random.default_rng(seed)
    order = rng.permutation(5_000)
    for k in (1, 5, 20):
        for excluded in (None, np.array([], dtype=np.int64), np.unique(order[:3]),
                         np.unique(order[: k + 4]), np.unique(rng.choice(5_000, 40, replace=False)),
                         np.unique(np.concatenate([order[:2], order[k: k + 3]]))):
            got = retrieval.first_allowed(order, k, excluded)
            keep = (np.ones(len(order), dtype=bool) if excluded is None
                    else ~np.isin(order, excluded))
            np.testing.assert_array_equal(got, order[keep][:k])
    # A list shorter than k plus the exclusions keeps everything allowed.
    short = np.array([4, 9, 2])
    np.testing.assert_array_equal(retrieval.first_allowed(short, 5, np.array([9])), [4, 2])


@pytest.mark.parametrize("seed", [0, 1])
def test_membership_in_the_exclusions_equals_numpy_isin(seed: int) -> None:
    """graph.kernels.is_member / any_member (candidate exclusions) against np.isin, for item
    arrays of either index type, empty arrays and sets, and members at both ends."""
    from graph.kernels import any_member, is_member

    rng = np.random.default_rng(seed)
    excluded = np.unique(rng.choice(1000, size=7, replace=False)).astype(np.int64)
    for items in (rng.integers(0, 1000, size=300), rng.integers(0, 1000, size=300).astype(np.int32),
                  np.concatenate([excluded[:1], np.arange(5), excluded[-1:]]),
                  np.zeros(0, dtype=np.int64)):
        expected = np.isin(items, excluded)
        np.testing.assert_array_equal(is_member(items, excluded), expected)
        assert any_member(items, excluded) == bool(expected.any())
        assert not is_member(items, excluded[:0]).any() and not any_member(items, excluded[:0])
    assert not any_member(np.array([1001, 2000]), excluded)


@pytest.mark.parametrize("seed", [0, 1])
def test_union_of_candidate_sources_equals_numpy_unique_and_scatter(seed: int) -> None:
    """graph.kernels.union_sources: the sorted unique items and each one's source flags, as
    np.unique with its inverse and a scatter of the flags gave."""
    from graph.kernels import union_sources

    rng = np.random.default_rng(seed)
    its = rng.integers(0, 400, size=900)
    source_of = rng.integers(0, 10, size=900)
    items, inv = np.unique(its, return_inverse=True)
    flags = np.zeros((len(items), 10), dtype=bool)
    flags[inv, source_of] = True
    got_items, got_flags = union_sources(its.astype(np.int32), source_of, 10)
    np.testing.assert_array_equal(got_items, items)
    np.testing.assert_array_equal(got_flags, flags)
    empty_items, empty_flags = union_sources(np.zeros(0, np.int64), np.zeros(0, np.int64), 10)
    assert empty_items.shape == (0,) and empty_flags.shape == (0, 10)
    with pytest.raises(ValueError, match=">= 0"):
        union_sources(np.array([3, -1]), np.array([0, 1]), 10)
    one_source = union_sources(np.array([5, 2, 5]), np.zeros(3, np.int64), 1)
    np.testing.assert_array_equal(one_source[0], [2, 5])
    assert one_source[1].all() and one_source[1].shape == (2, 1)


def test_history_of_candidates_equals_the_numpy_formulas() -> None:
    """graph.kernels.history_of (the repeat-purchase features): count, days since the last
    purchase and mean interval of each candidate, the same bits as the vectorised formulas it
    replaced; never-bought candidates get 0 / NaN / NaN, single purchases no interval."""
    from graph.kernels import history_of

    rng = np.random.default_rng(6)
    day = 86400.0
    hist_items = np.sort(rng.choice(500, size=40, replace=False)).astype(np.int32)
    lo = 7  # the shopper's row starts inside the history arrays
    total = lo + len(hist_items) + 5
    count = rng.integers(1, 6, size=total).astype(np.float32)
    first = rng.uniform(1.5e9, 1.51e9, size=total)
    last = first + rng.uniform(0, 90 * day, size=total)
    now = 1.5105e9  # some last purchases after it: their age is 0
    items = np.concatenate([hist_items[::3], rng.integers(0, 600, size=30), [hist_items[-1], 999]])
    got = history_of(hist_items, lo, count, first, last, items, now, day)
    pos = np.minimum(np.searchsorted(hist_items, items), len(hist_items) - 1)
    hit = hist_items[pos] == items
    p = lo + pos[hit]
    c = count[p].astype(np.float64)
    expected = (np.zeros(len(items)), np.full(len(items), np.nan), np.full(len(items), np.nan))
    expected[0][hit] = c
    expected[1][hit] = np.maximum(now - last[p], 0.0) / day
    expected[2][hit] = np.where(c >= 2, (last[p] - first[p]) / day / np.maximum(c - 1, 1), np.nan)
    assert hit.sum() > 10 and (~hit).sum() > 10 and (c == 1).any() and (now < last[p]).any()
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    none = history_of(hist_items[:0], 0, count, first, last, items, now, day)
    assert not none[0].any() and np.isnan(none[1]).all() and np.isnan(none[2]).all()
