"""Top-k ranking metrics with binary relevance.

Definitions (one query = one ranked list ``r_1..r_k`` and a set ``T`` of relevant items):

- ``recall@k = |{r_1..r_k} ∩ T| / |T|`` — the standard definition (Microsoft Recommenders,
  RecBole, the next-basket literature). When ``|T| > k`` a perfect ranking scores ``k / |T|`` < 1;
  that is intended, it is what makes recall comparable across models with the same ``k``.
- ``ndcg@k = DCG / IDCG`` with ``DCG = sum_j [r_j in T] / log2(j + 1)`` and the ideal DCG of
  ``min(|T|, k)`` hits in the first positions, so a perfect ranking scores 1.
- ``hit@k = 1`` if any of the first ``k`` items is relevant, else 0.

Queries with an empty target set are undefined for all three and must be dropped before calling
these functions; ``ranked`` may contain ``-1`` padding (never relevant).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def hits_matrix(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Boolean relevance of each of the first ``k`` ranked items.

    Shapes:
        - **ranked** ``[B, >=k]`` int: item indices, best first (``-1`` = padding).
        - **targets**: ``B`` arrays of relevant item indices.
        - return ``[B, k]`` bool.
    """
    ranked = np.asarray(ranked)[:, :k]
    if ranked.shape[0] != len(targets):
        raise ValueError(f"{ranked.shape[0]} rankings but {len(targets)} target sets")
    out = np.zeros(ranked.shape, dtype=bool)
    for b, t in enumerate(targets):
        out[b] = np.isin(ranked[b], t) & (ranked[b] >= 0)
    return out


def _sizes(targets: Sequence[np.ndarray]) -> np.ndarray:
    sizes = np.array([len(np.unique(t)) for t in targets], dtype=np.float64)
    if (sizes == 0).any():
        raise ValueError("a query has no relevant item: drop empty target sets before scoring")
    return sizes


def recall_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Per-query recall@k = hits in the top k / number of relevant items.

    Shapes:
        - **ranked** ``[B, >=k]``, **targets** ``B`` arrays; return ``[B]`` float64.
    """
    return hits_matrix(ranked, targets, k).sum(axis=1) / _sizes(targets)


def ndcg_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Per-query NDCG@k with binary relevance, ideal DCG over ``min(|T|, k)`` hits.

    Shapes:
        - **ranked** ``[B, >=k]``, **targets** ``B`` arrays; return ``[B]`` float64.
    """
    hits = hits_matrix(ranked, targets, k)
    discount = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    dcg = (hits * discount).sum(axis=1)
    ideal_n = np.minimum(_sizes(targets), hits.shape[1]).astype(int)
    idcg = np.concatenate([[0.0], np.cumsum(discount)])[ideal_n]
    return dcg / idcg


def hit_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Per-query hit@k: 1.0 if at least one of the top k is relevant.

    Shapes:
        - **ranked** ``[B, >=k]``, **targets** ``B`` arrays; return ``[B]`` float64.
    """
    _sizes(targets)
    return np.asarray(hits_matrix(ranked, targets, k).any(axis=1), dtype=np.float64)


def summarize(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> dict[str, float]:
    """Mean recall, NDCG and hit rate at ``k`` over the queries, keyed ``"recall@k"`` etc.

    Shapes:
        - **ranked** ``[B, >=k]``, **targets** ``B`` arrays.
    """
    return {
        f"recall@{k}": float(recall_at_k(ranked, targets, k).mean()),
        f"ndcg@{k}": float(ndcg_at_k(ranked, targets, k).mean()),
        f"hit@{k}": float(hit_at_k(ranked, targets, k).mean()),
    }


def cluster_bootstrap(values: np.ndarray, clusters: np.ndarray, *, samples: int = 1000,
                      seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of per-query ``values``, resampling whole ``clusters``.

    The queries of one shopper (their next-basket request, their baskets) are not independent,
    so the shoppers are drawn with replacement, each with all their queries, and the mean over
    the drawn queries is taken ``samples`` times (Davison & Hinkley's cluster bootstrap). Pass
    the difference of two models' per-query values to get the interval of a paired lead.

    Args:
        values: One value per query (e.g. :func:`recall_at_k`).
        clusters: The cluster (shopper) of each query, any integer labels.
        samples: Bootstrap resamples.
        seed: Seed of the draws: the same inputs and seed give the same interval.
        level: Coverage of the interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` without queries.

    Shapes:
        - **values**, **clusters** ``[B]``.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    _, code = np.unique(np.asarray(clusters), return_inverse=True)
    n = int(code.max()) + 1
    sums = np.bincount(code, weights=values, minlength=n)
    counts = np.bincount(code, minlength=n).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for s in range(samples):
        w = np.bincount(rng.integers(0, n, n), minlength=n)
        means[s] = (w @ sums) / max(float(w @ counts), 1.0)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)
