"""Compiled per-request loops of the ranking (numba), each the exact twin of a numpy/scipy step.

A ranker replica computes a request's session components from a handful of sparse rows: the
session's few items against a few hundred candidates. In numpy each such step is a dozen calls
on tiny arrays (and scipy's constructor checks), so their fixed cost, not the arithmetic, is
what a request pays. The loops here do the same arithmetic in the same order, so their results
are the same bits as the steps they replace (unit tests compare them with scipy's products):

- :func:`sessions_times_dense`: ``smat @ emb`` (the sessions' weighted embeddings);
- :func:`rows_times_csr_at`: ``(smat @ m)[:, cand]`` (co-occurrence with the session);
- :func:`group_shares_at`: each session's weight on each candidate's group (product line,
  category);
- :func:`csr_block_at`: ``m[rows][:, cols]`` (the co-occurrence behind a response's reasons);
- :func:`union_sources`: the sorted union of a request's candidate sources, with each item's
  source flags (``np.unique`` with its inverse, then a scatter);
- :func:`history_of`: a shopper's purchase count, days since the last purchase and typical
  interval of each candidate (the repeat-purchase features);
- :func:`is_member`, :func:`any_member`: which candidates a request excludes (a binary search
  per item; the numpy version was four calls, made about thirty times per request).

Sessions are CSR arrays (``indptr``, ``indices``, ``data``) of ``[B, I]`` weights
(:class:`graph.ranking.SessionRows`). Compiled once per process and cached next to this file
where it is writable (``numba``'s ``cache=True``), like :mod:`graph.forest`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit


def jit(fn: Any) -> Any:
    """``numba.njit`` with an on-disk cache, or without one where no cache directory is
    writable (compiled at each process start then)."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:
        return njit(nogil=True)(fn)


@jit
def _lower_bound(sorted_arr: np.ndarray, v: Any) -> int:  # pragma: no cover - compiled
    """The leftmost position of ``v`` in ``sorted_arr`` (``np.searchsorted(..., side="left")``);
    numba inlines it into the loops below."""
    lo, hi = 0, len(sorted_arr)
    while lo < hi:
        mid = (lo + hi) >> 1
        if sorted_arr[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def _sessions_times_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                          dense: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    for b in range(len(indptr) - 1):
        for e in range(indptr[b], indptr[b + 1]):
            w = data[e]
            row = indices[e]
            for j in range(dense.shape[1]):
                out[b, j] += w * dense[row, j]


def sessions_times_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                         dense: np.ndarray) -> np.ndarray:
    """The CSR rows times a dense matrix, each row's entries added in order (scipy's
    ``csr @ dense`` loop). Shapes: ``[B, I]`` CSR, ``dense`` ``[I, d]`` float32 → ``[B, d]``
    float32."""
    out = np.zeros((len(indptr) - 1, dense.shape[1]), dtype=np.float32)
    if len(indices):
        _sessions_times_dense(indptr, indices, data.astype(np.float32, copy=False),
                              np.ascontiguousarray(dense, dtype=np.float32), out)
    return out


@jit
def _rows_times_csr_at(s_indptr: np.ndarray, s_indices: np.ndarray, s_data: np.ndarray,
                       m_indptr: np.ndarray, m_indices: np.ndarray, m_data: np.ndarray,
                       sorted_cand: np.ndarray, order: np.ndarray,
                       out: np.ndarray) -> None:  # pragma: no cover - compiled
    n = len(sorted_cand)
    for b in range(len(s_indptr) - 1):
        for e in range(s_indptr[b], s_indptr[b + 1]):
            w = s_data[e]
            i = s_indices[e]
            for p in range(m_indptr[i], m_indptr[i + 1]):
                col = m_indices[p]
                lo = _lower_bound(sorted_cand, col)
                if lo < n and sorted_cand[lo] == col:
                    out[b, order[lo]] += np.float32(w * m_data[p])


def rows_times_csr_at(s_indptr: np.ndarray, s_indices: np.ndarray, s_data: np.ndarray,
                      m_indptr: np.ndarray, m_indices: np.ndarray, m_data: np.ndarray,
                      cand: np.ndarray) -> np.ndarray:
    """``(S @ M)[:, cand]`` of CSR sessions ``S`` ``[B, I]`` and a CSR matrix ``M`` ``[I, C]``,
    reading only the sessions' rows of ``M``; products added in the order of the sessions'
    entries, then of each row of ``M`` (a repeated candidate gets its first position's value
    and the others 0, as the numpy step did). Shapes: ``cand`` ``[n]`` → ``[B, n]`` float32."""
    out = np.zeros((len(s_indptr) - 1, len(cand)), dtype=np.float32)
    if len(s_indices) == 0 or len(cand) == 0:
        return out
    cand = np.asarray(cand, dtype=np.int64)
    order = np.argsort(cand, kind="stable")
    _rows_times_csr_at(s_indptr, s_indices, s_data, m_indptr, m_indices, m_data, cand[order],
                       order, out)
    return out


@jit
def _group_shares_at(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                     group_of: np.ndarray, cand_group: np.ndarray,
                     out: np.ndarray) -> None:  # pragma: no cover - compiled
    for b in range(len(indptr) - 1):
        for j in range(len(cand_group)):
            g = cand_group[j]
            acc = np.float32(0.0)
            for e in range(indptr[b], indptr[b + 1]):
                if group_of[indices[e]] == g:
                    acc = np.float32(acc + data[e])
            out[b, j] = acc


def group_shares_at(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                    group_of: np.ndarray, cand_group: np.ndarray) -> np.ndarray:
    """Each session's summed weight on the group of each candidate: ``shares[:, cand_group]``
    of :func:`graph.ranking._group_shares`, the entries added in the same order. Shapes: CSR
    ``[B, I]``, ``group_of`` ``[I]``, ``cand_group`` ``[n]`` → ``[B, n]`` float32."""
    out = np.zeros((len(indptr) - 1, len(cand_group)), dtype=np.float32)
    if len(indices) and len(cand_group):
        _group_shares_at(indptr, indices, data.astype(np.float32, copy=False), group_of,
                         np.asarray(cand_group), out)
    return out


@jit
def _member(items: np.ndarray, sorted_set: np.ndarray, out: np.ndarray,
            first_only: bool) -> bool:  # pragma: no cover - compiled
    n = len(sorted_set)
    found = False
    for i in range(len(items)):
        v = items[i]
        lo = _lower_bound(sorted_set, v)
        hit = lo < n and sorted_set[lo] == v
        if hit:
            found = True
            if first_only:
                return True
        if not first_only:
            out[i] = hit
    return found


_NO_FLAGS = np.zeros(0, dtype=np.bool_)


def is_member(items: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Row mask of ``items`` found in ``sorted_set`` (sorted, unique). Shapes: ``[n]`` bool."""
    out = np.zeros(len(items), dtype=np.bool_)
    if len(sorted_set) and len(items):
        _member(items, sorted_set, out, False)
    return out


def any_member(items: np.ndarray, sorted_set: np.ndarray) -> bool:
    """Whether any of ``items`` is in ``sorted_set`` (sorted, unique); stops at the first."""
    return bool(len(sorted_set) and len(items) and _member(items, sorted_set, _NO_FLAGS, True))


@jit
def _csr_block_at(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray,
                  sorted_cols: np.ndarray, order: np.ndarray,
                  out: np.ndarray) -> None:  # pragma: no cover - compiled
    n = len(sorted_cols)
    for r in range(len(rows)):
        i = rows[r]
        for p in range(indptr[i], indptr[i + 1]):
            col = indices[p]
            lo = _lower_bound(sorted_cols, col)
            while lo < n and sorted_cols[lo] == col:  # every position of a repeated column
                out[r, order[lo]] = data[p]
                lo += 1


def csr_block_at(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray,
                 cols: np.ndarray) -> np.ndarray:
    """``m[rows][:, cols].toarray()`` of a CSR matrix without repeated entries in a row, as
    float32, reading only the given rows. Shapes: ``rows`` ``[r]``, ``cols`` ``[c]`` →
    ``[r, c]``."""
    out = np.zeros((len(rows), len(cols)), dtype=np.float32)
    if len(rows) and len(cols):
        cols = np.asarray(cols, dtype=np.int64)
        order = np.argsort(cols, kind="stable")
        _csr_block_at(indptr, indices, data, np.asarray(rows, dtype=np.int64), cols[order],
                      order, out)
    return out


@jit
def _union_sources(its: np.ndarray, source_of: np.ndarray, num_sources: int,
                   shift: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    # One sort of (item, source) packed into an integer: 3x faster than np.unique with its
    # inverse, where sorting indices (argsort) is most of the work.
    keys = np.sort((its << shift) | source_of)
    items = np.empty(len(keys), dtype=np.int64)
    flags = np.zeros((len(keys), num_sources), dtype=np.bool_)
    mask = (1 << shift) - 1
    u = -1
    for key in keys:
        v = key >> shift
        if u < 0 or items[u] != v:
            u += 1
            items[u] = v
        flags[u, key & mask] = True
    return items[:u + 1].copy(), flags[:u + 1].copy()


def union_sources(its: np.ndarray, source_of: np.ndarray,
                  num_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted unique items of ``its`` and, per item, which sources proposed it
    (``source_of[i]`` is the source of ``its[i]``). Shapes: ``[m]``, ``[m]`` → ``[n]`` int64,
    ``[n, num_sources]`` bool."""
    its = np.asarray(its, dtype=np.int64)
    if len(its) and int(its.min()) < 0:
        raise ValueError("candidate item indices must be >= 0")
    return _union_sources(its, np.asarray(source_of, dtype=np.int64), num_sources,
                          max(int(num_sources - 1).bit_length(), 1))


@jit
def _history_of(row: np.ndarray, lo: int, hist_count: np.ndarray, hist_first: np.ndarray,
                hist_last: np.ndarray, items: np.ndarray, now: float, day_s: float,
                count: np.ndarray, since: np.ndarray,
                interval: np.ndarray) -> None:  # pragma: no cover - compiled
    n = len(row)
    for j in range(len(items)):
        v = items[j]
        a = _lower_bound(row, v)
        if a < n and row[a] == v:
            p = lo + a
            c = np.float64(hist_count[p])
            count[j] = c
            age = now - hist_last[p]
            since[j] = (age if age > 0.0 else 0.0) / day_s
            if c >= 2:
                interval[j] = (hist_last[p] - hist_first[p]) / day_s / max(c - 1.0, 1.0)


def history_of(row: np.ndarray, lo: int, hist_count: np.ndarray, hist_first: np.ndarray,
               hist_last: np.ndarray, items: np.ndarray, now: float,
               day_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``items``, from one shopper's history row (``row``: their items, sorted;
    ``lo``: its first position in the history arrays): the purchase count (0 if never bought),
    the days since the last purchase and the mean days between purchases (NaN if never bought,
    and the interval also NaN with fewer than two purchases). Shapes: ``[n]`` float64 each."""
    n = len(items)
    count, since, interval = np.zeros(n), np.full(n, np.nan), np.full(n, np.nan)
    if len(row) and n:
        _history_of(row, lo, hist_count, hist_first, hist_last, items, float(now), float(day_s),
                    count, since, interval)
    return count, since, interval
