"""Known answers for recall / NDCG / hit rate on hand-made rankings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graph.metrics import hit_at_k, ndcg_at_k, recall_at_k, summarize


def test_recall_is_hits_over_all_relevant_items() -> None:
    ranked = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    targets = [np.array([2, 4, 9]), np.array([0])]
    np.testing.assert_allclose(recall_at_k(ranked, targets, 4), [2 / 3, 0.0])
    # Only the first k count.
    np.testing.assert_allclose(recall_at_k(ranked, targets, 2), [1 / 3, 0.0])


def test_recall_does_not_cap_the_denominator_at_k() -> None:
    # 3 relevant items, k = 2, both slots hit: the standard recall is 2/3, not 1.
    ranked = np.array([[1, 2]])
    np.testing.assert_allclose(recall_at_k(ranked, [np.array([1, 2, 3])], 2), [2 / 3])


def test_ndcg_known_values() -> None:
    ranked = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    targets = [np.array([1]), np.array([6]), np.array([8, 9, 10, 11])]
    got = ndcg_at_k(ranked, targets, 3)
    d = [1.0, 1 / math.log2(3), 1 / math.log2(4)]
    assert got[0] == pytest.approx(1.0)  # the only relevant item first
    assert got[1] == pytest.approx(d[2] / d[0])  # found at rank 3; ideal: rank 1
    # 4 relevant, k=3: ideal DCG = three hits; actual hits at ranks 2 and 3.
    assert got[2] == pytest.approx((d[1] + d[2]) / sum(d))


def test_perfect_ranking_scores_one() -> None:
    ranked = np.array([[3, 1, 2, 0]])
    targets = [np.array([1, 2, 3])]
    assert ndcg_at_k(ranked, targets, 4)[0] == pytest.approx(1.0)
    assert recall_at_k(ranked, targets, 4)[0] == pytest.approx(1.0)
    assert hit_at_k(ranked, targets, 4)[0] == 1.0


def test_hit_rate_and_padding() -> None:
    ranked = np.array([[-1, -1, 5], [1, -1, -1]])
    targets = [np.array([5]), np.array([2])]
    np.testing.assert_allclose(hit_at_k(ranked, targets, 3), [1.0, 0.0])
    np.testing.assert_allclose(hit_at_k(ranked, targets, 2), [0.0, 0.0])


def test_duplicate_targets_count_once() -> None:
    ranked = np.array([[1, 2]])
    np.testing.assert_allclose(recall_at_k(ranked, [np.array([1, 1, 3])], 2), [0.5])


def test_empty_target_set_is_an_error() -> None:
    with pytest.raises(ValueError, match="no relevant item"):
        recall_at_k(np.array([[1, 2]]), [np.array([], dtype=int)], 2)


def test_summarize_means_over_queries() -> None:
    ranked = np.array([[1, 2], [3, 4]])
    targets = [np.array([1]), np.array([9])]
    out = summarize(ranked, targets, 2)
    assert out == {"recall@2": 0.5, "ndcg@2": 0.5, "hit@2": 0.5}
