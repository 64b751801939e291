"""The ranking components: the non-parametric and embedding scores the learned ranker's features
are made of (``graph.features``), shared by offline evaluation, benchmarks and serving.

Components of item ``i`` for one request (``Ranker.components``)::

    gnn      z-scored user embedding . item embedding (0 for an unknown user)
    session  z-scored (weighted mean of the session items' embeddings) . item embedding
    repeat   "buy again": share of the user's baskets that held the item, over all time and
             recency-decayed (see ``repeat_scores``)
    cooc     weighted mean item-item co-occurrence (``P(i | j)``-like, see
             ``graph.signals.item_cooccurrence``) of the item with the session items
    line     share of the session's weight on items of the item's product line (category x
             brand): shoppers take several flavours of one yoghurt or cat food
    intent   share of the session's weight on items of the item's category: the session's
             intent (what ``actors.context.infer_intent`` shows)
    basket   personal co-occurrence: share of the user's past baskets resembling the session
             that held the item (see ``basket_scores``)
    pop      log popularity scaled to [0, 1]
    context  department log-lift at the request's weekday/hour, plus the holiday lift

The two embedding components are z-scored per request against the whole catalogue (mean and
standard deviation of ``q . item_emb`` over all items, computed exactly from the item embedding
mean and covariance), so a value does not depend on which candidates are scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from graph import schema as S
from graph.errors import ArtifactError, BadRequestError
from graph.kernels import (
    csr_block_at,
    group_shares_at,
    rows_times_csr_at,
    sessions_times_dense,
)
from graph.signals import COMPONENTS, RankingSignals, attribute_value, holiday_dates

SESSION_HALF_LIFE_S = 1800.0
# Components that only a session can move (0 without one).
SESSION_COMPONENTS: tuple[str, ...] = ("session", "cooc", "line", "intent", "basket")
Users = Sequence[int | None] | np.ndarray


@dataclass(frozen=True)
class SessionSignal:
    """What the current session says about intent: items and their net weights.

    Shapes:
        - **items** ``[n]`` int64 item indices (unique), **weights** ``[n]`` float32 (negative for
          an item taken out of the cart).
    """

    items: np.ndarray
    weights: np.ndarray

    @property
    def is_empty(self) -> bool:
        return len(self.items) == 0


def session_signal(
    events: Sequence[tuple[int, str, float]], now: float, half_life_s: float = SESSION_HALF_LIFE_S
) -> SessionSignal:
    """Aggregate session events into per-item weights.

    Each event adds ``EVENT_WEIGHTS[event] * 0.5 ** (age / half_life_s)`` to its item, so a
    purchase counts more than a view, a recent click more than one twenty minutes ago, and a
    ``remove_from_cart`` subtracts. Items whose weights cancel out are dropped.

    Args:
        events: ``(item_index, event_type, ts)`` with ``ts`` in unix seconds; search events (no
            item) should not be passed.
        now: Request time, unix seconds (events from the future count as age 0).
        half_life_s: Half-life of an event's weight.

    Raises:
        BadRequestError: for an unknown event type or a negative item index.
    """
    if not events:
        return SessionSignal(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
    acc: dict[int, float] = {}
    for n, (item, event, ts) in enumerate(events):
        if event not in S.EVENT_WEIGHTS:
            raise BadRequestError(
                f"session event {n} has type {event!r}; allowed: {list(S.EVENT_TYPES)}",
                field=f"events[{n}].event",
            )
        if item < 0:
            raise BadRequestError(f"session event {n} has item index {item} < 0",
                                  field=f"events[{n}].item_id")
        decay = 0.5 ** (max(now - ts, 0.0) / half_life_s)
        acc[int(item)] = acc.get(int(item), 0.0) + S.EVENT_WEIGHTS[event] * decay
    kept = {i: w for i, w in acc.items() if abs(w) > 1e-9}
    items = np.fromiter(kept.keys(), dtype=np.int64, count=len(kept))
    weights = np.fromiter(kept.values(), dtype=np.float32, count=len(kept))
    return SessionSignal(items, weights)


@dataclass(frozen=True)
class ContextSignal:
    """When, and on what and where, the request happens.

    Args:
        weekday: 0 = Monday … 6 = Sunday, in the time convention of the training events.
        hour: 0–23, same convention.
        is_holiday: The day is a public holiday in the data's country.
        device: The request's device (``context.device``), or None.
        region: The request's region (``context.region``), or None. Either counts only where
            the training events had that column and the value (``RankingSignals.attribute_lift``).
    """

    weekday: int
    hour: int
    is_holiday: bool = False
    device: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.weekday <= 6:
            raise BadRequestError(f"weekday ({self.weekday}) must be in 0..6", field="weekday")
        if not 0 <= self.hour <= 23:
            raise BadRequestError(f"hour ({self.hour}) must be in 0..23", field="hour")

    @classmethod
    def from_timestamp(cls, ts: pd.Timestamp | float, country: str = "US", *,
                       device: str | None = None, region: str | None = None) -> ContextSignal:
        """Context of a naive-UTC timestamp (or unix seconds), with the country's holidays."""
        t = pd.Timestamp(ts, unit="s") if isinstance(ts, int | float) else pd.Timestamp(ts)
        if t.tzinfo is not None:
            t = t.tz_convert("UTC").tz_localize(None)
        hol = t.date() in holiday_dates(country, [t.year])
        return cls(weekday=t.weekday(), hour=t.hour, is_holiday=hol, device=device, region=region)

    def for_signals(self, signals: RankingSignals) -> ContextSignal:
        """This context with its device and region as ``signals`` key them where they have a
        lift for them, and None where not: it ranks exactly as this one, and two requests whose
        device or region makes no difference get one context (one cached answer for both)."""
        known = signals.attribute_lift
        if not known:  # most models (the built-in data's): no value has a lift, nothing to spell
            return self if self.device is None and self.region is None else dataclasses.replace(
                self, device=None, region=None)
        device, region = (
            v if v is not None and v in known.get(col, {}) else None
            for col, v in ((S.DEVICE_COL, attribute_value(self.device)),
                           (S.REGION_COL, attribute_value(self.region)))
        )
        if (device, region) == (self.device, self.region):
            return self
        return dataclasses.replace(self, device=device, region=region)

    def department_lift(self, signals: RankingSignals) -> np.ndarray:
        """Log-lift of each department in this context: the weekday × hour cell, plus the
        holiday lift on a holiday, plus the device's and the region's lift where the training
        events had them (a value they never had adds nothing). Shapes: return ``[D]``."""
        lift = signals.context_lift[self.weekday, self.hour]
        if self.is_holiday:
            lift = lift + signals.holiday_lift
        if signals.attribute_lift:
            for col, value in ((S.DEVICE_COL, self.device), (S.REGION_COL, self.region)):
                row = signals.attribute_lift.get(col, {}).get(attribute_value(value) or "")
                if row is not None:
                    lift = lift + row
        return lift


def repeat_scores(signals: RankingSignals, users: np.ndarray) -> sp.csr_matrix:
    """Buy-again score of every item a user has bought, in [0, 1].

    The mean of two shares of the user's sessions (baskets) that held the item — over the whole
    history (habit) and recency-decayed (``history_half_life_days``: current habit) — times
    ``item_repeat_rate ** repeat_rate_power``: milk bought once is likelier to come back than a
    grill bought once. A share is about the probability that the next basket holds the item, so
    scores compare across users, which matters when they are fused with other components.

    Chosen on the validation window (next-basket and in-session recall of this component alone);
    a "due" factor from the item's own repurchase interval was tried and lost recall: in grocery
    a recent purchase predicts another one better than an item's rhythm does.

    Shapes:
        - **users** ``[B]`` int (``-1`` = unknown user: an empty row).
        - return ``[B, I]`` CSR float32.
    """
    num_items = signals.num_items
    known = users >= 0
    rows = np.where(known, users, 0)
    starts = signals.hist_indptr[rows]
    lengths = np.where(known, signals.hist_indptr[rows + 1] - starts, 0)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    if indptr[-1] == 0:
        return sp.csr_matrix((len(users), num_items), dtype=np.float32)
    row_of = np.repeat(np.arange(len(users)), lengths)
    pos = np.arange(indptr[-1]) - indptr[row_of] + starts[row_of]
    return sp.csr_matrix(
        (_repeat_values(signals, rows[row_of], pos), signals.hist_indices[pos], indptr),
        shape=(len(users), num_items),
    )


def _repeat_values(signals: RankingSignals, user: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """:func:`repeat_scores` of history entries ``pos`` (rows of the history CSR) of ``user``.
    Shapes: ``[n]`` → ``[n]`` float32."""
    habit = signals.hist_count[pos] / np.maximum(signals.user_sessions[user], 1.0)
    recent = signals.hist_weight[pos] / np.maximum(signals.user_decayed_sessions[user], 1e-6)
    items = signals.hist_indices[pos]
    propensity = np.power(signals.item_repeat_rate[items], signals.params.repeat_rate_power)
    data = (0.5 * np.minimum(habit, 1.0) + 0.5 * np.minimum(recent, 1.0)) * propensity
    return np.asarray(data, dtype=np.float32)


def repeat_scores_of(signals: RankingSignals, users: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """:func:`repeat_scores` of the ``cand`` columns only, dense: a request's candidates are
    looked up in the user's sorted history row instead of scoring the whole history.

    Shapes: **users** ``[B]`` (``-1``: a row of 0), **cand** ``[n]`` → ``[B, n]`` float32.
    """
    out = np.zeros((len(users), len(cand)), dtype=np.float32)
    for b, u in enumerate(users.tolist()):
        if u < 0:
            continue
        lo, hi = int(signals.hist_indptr[u]), int(signals.hist_indptr[u + 1])
        if hi == lo:
            continue
        # Each history row is sorted and unique (the CSR is built from a sorted groupby).
        pos = np.minimum(np.searchsorted(signals.hist_indices[lo:hi], cand), hi - lo - 1)
        hit = signals.hist_indices[lo + pos] == cand
        p = lo + pos[hit]
        out[b, hit] = _repeat_values(signals, np.full(len(p), u), p)
    return out


def basket_scores(
    signals: RankingSignals, users: np.ndarray, sessions: sp.csr_matrix | SessionRows
) -> sp.csr_matrix:
    """Personal co-occurrence: what the user bought in their past baskets that resemble this one.

    Each past basket ``b`` of the user weighs ``overlap(b, session) / |b| ** 0.5`` (the session
    weight of its items; a small basket sharing two items with the cart is a better precedent than
    a 60-item stock-up that also held them), and an item scores the weighted share of those
    baskets that held it, in [0, 1]. It reorders the user's own repertoire by what usually goes
    with the cart, which the global co-occurrence (``cooc``) cannot do.

    Shapes:
        - **users** ``[B]`` (``-1`` = unknown: empty row), **sessions** ``[B, I]`` session weights.
        - return ``[B, I]`` CSR float32.
    """
    indptr, cols, vals = [0], [], []
    for b, u in enumerate(users):
        got = _basket_weights(signals, int(u), sessions, b)
        if got is None:
            indptr.append(indptr[-1])
            continue
        items, entry_weight, total = got
        uniq, inv = np.unique(items, return_inverse=True)
        cols.append(uniq)
        vals.append(np.bincount(inv, weights=entry_weight) / total)
        indptr.append(indptr[-1] + len(uniq))
    if not cols:
        return sp.csr_matrix((len(users), signals.num_items), dtype=np.float32)
    return sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), np.concatenate(cols), np.array(indptr)),
        shape=(len(users), signals.num_items),
    )


def basket_scores_of(signals: RankingSignals, users: np.ndarray,
                     sessions: sp.csr_matrix | SessionRows,
                     cand: np.ndarray) -> np.ndarray:
    """:func:`basket_scores` of the ``cand`` columns only, dense (the same sums, in the same
    order, without collecting every item of the user's past baskets).

    Shapes: ``[B]``, ``[B, I]``, ``[n]`` → ``[B, n]`` float32.
    """
    out = np.zeros((len(users), len(cand)), dtype=np.float32)
    if len(cand) == 0:
        return out
    order = np.argsort(cand, kind="stable")
    sorted_cand = cand[order]
    leftmost = np.searchsorted(sorted_cand, sorted_cand)  # a repeated candidate reads its first
    for b, u in enumerate(users):
        got = _basket_weights(signals, int(u), sessions, b)
        if got is None:
            continue
        items, entry_weight, total = got
        pos = np.minimum(np.searchsorted(sorted_cand, items), len(cand) - 1)
        hit = sorted_cand[pos] == items
        score = np.bincount(pos[hit], weights=entry_weight[hit], minlength=len(cand)) / total
        out[b, order] = score[leftmost].astype(np.float32)
    return out


def _basket_weights(signals: RankingSignals, u: int, sessions: sp.csr_matrix | SessionRows,
                    b: int,
                    ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The items of user ``u``'s past baskets (one entry per basket and item), each entry's
    basket weight, and the weights' total (an item's :func:`basket_scores` is the sum of its
    entries' weights over the total); None when the session row ``b`` is empty, the user has no
    baskets or no basket overlaps the session."""
    lo, hi = sessions.indptr[b], sessions.indptr[b + 1]
    first, last = (signals.user_basket_indptr[u], signals.user_basket_indptr[u + 1]) if u >= 0 \
        else (0, 0)
    if lo == hi or first == last:
        return None
    bounds = signals.basket_indptr[first: last + 1]
    items = signals.basket_items[bounds[0]: bounds[-1]]
    sizes = np.diff(bounds)
    order = np.argsort(sessions.indices[lo:hi])
    s_items, s_w = sessions.indices[lo:hi][order], sessions.data[lo:hi][order]
    pos = np.minimum(np.searchsorted(s_items, items), len(s_items) - 1)
    entry_w = np.where(s_items[pos] == items, s_w[pos], 0.0)
    basket_of = np.repeat(np.arange(len(sizes)), sizes)
    overlap = np.bincount(basket_of, weights=entry_w, minlength=len(sizes))
    weight = np.maximum(overlap, 0.0) / np.sqrt(sizes)
    total = weight.sum()
    if total <= 0:
        return None
    return items, weight[basket_of], float(total)


def _as_users(users: Users) -> np.ndarray:
    return np.array([-1 if u is None else int(u) for u in users], dtype=np.int64)


def top_k_from_scores(
    scores: np.ndarray,
    k: int,
    exclude: Sequence[np.ndarray | None] | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items per row, after removing excluded items.

    The single top-k path of the project: the Ranker and every evaluation baseline go through it,
    so exclusion and tie handling are the same for all.

    Shapes:
        - **scores** ``[B, n]`` (columns = ``candidates``, or all items when None).
        - **exclude**: ``B`` arrays of item indices (or None) never to return.
        - return ``(indices [B, min(k, n)] int64 item indices, scores [B, min(k, n)])``; rows with
          fewer than ``k`` allowed items are padded with index ``-1`` and score ``-inf``.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    if exclude is not None:
        for b, ex in enumerate(exclude):
            if ex is None or len(ex) == 0:
                continue
            if candidates is None:
                scores[b, ex] = -np.inf
            else:
                scores[b, np.isin(candidates, ex)] = -np.inf
    k = min(k, scores.shape[1])
    vals, pos = torch.topk(torch.from_numpy(scores), k, dim=1)
    idx = pos.numpy().astype(np.int64)
    if candidates is not None:
        idx = np.asarray(candidates, dtype=np.int64)[idx]
    v = vals.numpy()
    idx[~np.isfinite(v)] = -1
    return idx, v


def _dense(m: sp.spmatrix, cand: np.ndarray | None) -> np.ndarray:
    """Dense float32 rows of a sparse ``[B, I]`` matrix, restricted to ``cand`` columns.

    The column gather looks the matrix's entries up in the sorted candidates instead of using
    scipy's fancy column indexing (a fresh matrix per call) or a catalogue-sized position table
    (an ``[I]`` array per call): this runs once per component per request.
    """
    if not isinstance(m, sp.csr_matrix):
        m = sp.csr_matrix(m)
    if cand is None:
        return np.asarray(m.toarray(), dtype=np.float32)
    m.sum_duplicates()
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    return _gather_sorted(m.shape[0], rows, m.indices, m.data, np.asarray(cand))


def _gather_sorted(num_rows: int, rows: np.ndarray, cols: np.ndarray, data: np.ndarray,
                   cand: np.ndarray) -> np.ndarray:
    """``out[r, j] = data`` of the entry ``(r, cand[j])``: the sparse entries ``(rows, cols,
    data)`` (no repeated ``(row, col)``) as dense float32 ``[num_rows, len(cand)]`` columns.
    Candidates already sorted and unique (a ``CandidateSet``'s) are searched as they are; others
    through their unique values, so a repeated candidate gets its value in every position."""
    if len(cand) == 0 or len(cols) == 0:
        return np.zeros((num_rows, len(cand)), dtype=np.float32)
    inv = None
    keys = cand
    if len(cand) > 1 and not bool((cand[1:] > cand[:-1]).all()):
        keys, inv = np.unique(cand, return_inverse=True)
    at = np.minimum(np.searchsorted(keys, cols), len(keys) - 1)
    hit = keys[at] == cols
    out = np.zeros((num_rows, len(keys)), dtype=np.float32)
    out[rows[hit], at[hit]] = data[hit]
    return out if inv is None else out[:, inv.reshape(-1)]


def csr_block(m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``m[rows][:, cols].toarray()`` as float32, reading only the given rows of ``m``
    (:func:`graph.kernels.csr_block_at`).

    For the reasons of a response (a session's few items against the top k): scipy's fancy
    row and column indexing builds two sparse matrices per call, several times this.

    Shapes:
        - **m** ``[R, C]`` CSR without repeated entries in a row, **rows** ``[r]``, **cols**
          ``[c]``; return ``[r, c]``.
    """
    return csr_block_at(m.indptr, m.indices, m.data, rows, cols)


def _group_shares(smat: sp.csr_matrix | SessionRows, group_of: np.ndarray,
                  num_groups: int) -> np.ndarray:
    """Each session row's summed weight per item group (product line, category).

    Shapes:
        - **smat** ``[B, I]``, **group_of** ``[I]``; return ``[B, num_groups]`` float32.
    """
    out = np.zeros((smat.shape[0], num_groups), dtype=np.float32)
    rows = np.repeat(np.arange(smat.shape[0]), np.diff(smat.indptr))
    np.add.at(out, (rows, group_of[smat.indices]), smat.data)
    return out


def _rows_times_csr(smat: sp.csr_matrix | SessionRows, m: sp.csr_matrix,
                    cand: np.ndarray) -> np.ndarray:
    """``(smat @ m)[:, cand]`` as dense float32, touching only the rows of ``m`` that the
    sessions hold (a request's few items), not a sparse product of the whole matrix
    (:func:`graph.kernels.rows_times_csr_at`).

    Shapes:
        - **smat** ``[B, I]``, **m** ``[I, I]`` CSR, **cand** ``[n]``; return ``[B, n]``.
    """
    return rows_times_csr_at(smat.indptr, smat.indices, smat.data, m.indptr, m.indices, m.data,
                             cand)


@dataclass(frozen=True)
class SessionRows:
    """Sessions' item weights as CSR arrays, without a scipy matrix (whose constructor checks
    cost a request more than the arithmetic on its few entries); :meth:`csr` makes one where a
    product over the whole catalogue needs it.

    Shapes:
        - **indptr** ``[B + 1]`` int64, **indices** ``[nnz]`` int64 (sorted within a row),
          **data** ``[nnz]`` float32; ``shape`` ``(B, I)``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def csr(self) -> sp.csr_matrix:
        """The same rows as a scipy CSR matrix."""
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)


class Ranker:
    """Ranking components for batches of requests from embeddings and ``RankingSignals``.

    Args:
        user_emb: GNN user embeddings, row = ``inter.user_ids`` index.
        item_emb: GNN item embeddings, row = catalogue index.
        signals: Non-parametric signals fitted with the same indexing.
        chunk_size: Requests scored at once over the full catalogue (bounds memory at about
            ``chunk_size * num_items * 4`` bytes per component).

    Shapes:
        - **user_emb** ``[U, d]``, **item_emb** ``[I, d]``.

    Raises:
        ArtifactError: if shapes disagree with the signals.
    """

    def __init__(
        self,
        user_emb: np.ndarray,
        item_emb: np.ndarray,
        signals: RankingSignals,
        *,
        chunk_size: int = 256,
    ) -> None:
        if item_emb.shape[0] != signals.num_items or user_emb.shape[0] != signals.num_users:
            raise ArtifactError(
                f"embeddings ({user_emb.shape[0]} users, {item_emb.shape[0]} items) do not match "
                f"the ranking signals ({signals.num_users} users, {signals.num_items} items)"
            )
        if user_emb.ndim != 2 or item_emb.ndim != 2 or user_emb.shape[1] != item_emb.shape[1]:
            raise ArtifactError(f"embedding shapes {user_emb.shape} and {item_emb.shape} differ in d")
        self.user_emb = np.ascontiguousarray(user_emb, dtype=np.float32)
        self.item_emb = np.ascontiguousarray(item_emb, dtype=np.float32)
        self.signals = signals
        self.chunk_size = chunk_size
        ie = self.item_emb.astype(np.float64)
        self._item_mean = ie.mean(axis=0)
        self._item_cov = np.cov(ie, rowvar=False).reshape(ie.shape[1], ie.shape[1])
        pop = np.log1p(np.maximum(signals.popularity.astype(np.float64), 0.0))
        self._pop = (pop / max(pop.max(), 1e-12)).astype(np.float32)

    @property
    def num_items(self) -> int:
        return self.signals.num_items

    # --------------------------------------------------------------------------- components
    def _zdot(self, q: np.ndarray, cand: np.ndarray | None,
              emb: np.ndarray | None = None) -> np.ndarray:
        """``(q . item - mean) / std`` over the catalogue for each query row; 0 where q is 0.
        ``emb``: the candidates' rows of ``item_emb`` when the caller already gathered them."""
        q64 = q.astype(np.float64)
        mean = q64 @ self._item_mean
        var = np.einsum("bd,de,be->b", q64, self._item_cov, q64)
        std = np.sqrt(np.maximum(var, 0.0))
        if emb is None:
            emb = self.item_emb if cand is None else self.item_emb[cand]
        out = q @ emb.T
        ok = std > 1e-9
        if ok.all():  # in place: the same float32 operations without copying the rows out
            out -= mean[:, None].astype(np.float32)
            out /= std[:, None].astype(np.float32)
            return out
        out[ok] = (out[ok] - mean[ok, None].astype(np.float32)) / std[ok, None].astype(np.float32)
        out[~ok] = 0.0
        return out

    def _session_matrix(self, sessions: Sequence[SessionSignal | None]) -> SessionRows:
        """Row ``b`` = session ``b``'s item weights normalised to sum(|w|) = 1. Shapes: ``[B, I]``."""
        indptr, cols, vals = [0], [], []
        for s in sessions:
            if s is None or s.is_empty:
                indptr.append(indptr[-1])
                continue
            # A session's items are unique; CSR wants each row's columns sorted.
            order = np.argsort(s.items, kind="stable")
            w = s.weights.astype(np.float64)
            cols.append(s.items[order])
            vals.append((w / max(np.abs(w).sum(), 1e-12))[order])
            indptr.append(indptr[-1] + len(order))
        shape = (len(sessions), self.num_items)
        if not cols:
            return SessionRows(np.zeros(len(sessions) + 1, dtype=np.int64),
                               np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), shape)
        return SessionRows(np.asarray(indptr, dtype=np.int64),
                           np.concatenate(cols).astype(np.int64),
                           np.concatenate(vals).astype(np.float32), shape)

    def _chunk_components(
        self,
        users: np.ndarray,
        sessions: Sequence[SessionSignal | None],
        contexts: Sequence[ContextSignal | None],
        cand: np.ndarray | None,
        needed: Collection[str] = COMPONENTS,
    ) -> dict[str, np.ndarray]:
        """The ``needed`` components of one chunk (the fused score skips those it would multiply
        by 0, so a next-basket chunk never builds session matrices)."""
        b = len(users)
        n = self.num_items if cand is None else len(cand)
        out: dict[str, np.ndarray] = {}
        known = users >= 0
        # The candidates' embeddings, gathered once for the user's and the session's dot.
        emb = (self.item_emb if cand is None or not {"gnn", "session"} & set(needed)
               else self.item_emb[cand])
        if "gnn" in needed:
            u = np.zeros((b, self.user_emb.shape[1]), dtype=np.float32)
            u[known] = self.user_emb[users[known]]
            out["gnn"] = self._zdot(u, cand, emb)
        session_needed = [name for name in SESSION_COMPONENTS if name in needed]
        if session_needed and all(s is None or s.is_empty for s in sessions):
            # No session in the chunk (most requests without a cart): every session component
            # is 0, as the matrices below would give, without building them.
            for name in session_needed:
                out[name] = np.zeros((b, n), dtype=np.float32)
        elif session_needed:
            smat = self._session_matrix(sessions)
            if "session" in needed:
                q = sessions_times_dense(smat.indptr, smat.indices, smat.data, self.item_emb)
                out["session"] = self._zdot(q, cand, emb)
            if "cooc" in needed:
                out["cooc"] = (_dense(smat.csr() @ self.signals.item_sim, None) if cand is None
                               else _rows_times_csr(smat, self.signals.item_sim, cand))
            for name, group_of, num_groups in (
                    ("line", self.signals.item_line, self.signals.num_lines),
                    ("intent", self.signals.item_category, self.signals.num_categories)):
                if name not in needed:
                    continue
                # A request's candidates read their groups' shares directly; the whole
                # catalogue (offline) gathers them from the [B, groups] table.
                out[name] = (_group_shares(smat, group_of, num_groups)[:, group_of]
                             if cand is None else
                             group_shares_at(smat.indptr, smat.indices, smat.data, group_of,
                                             group_of[cand]))
            if "basket" in needed:
                out["basket"] = (_dense(basket_scores(self.signals, users, smat), None)
                                 if cand is None
                                 else basket_scores_of(self.signals, users, smat, cand))
        if "repeat" in needed:
            out["repeat"] = (_dense(repeat_scores(self.signals, users), None) if cand is None
                             else repeat_scores_of(self.signals, users, cand))
        if "pop" in needed:
            pop = self._pop if cand is None else self._pop[cand]
            out["pop"] = np.broadcast_to(pop, (b, n)).copy()
        if "context" in needed:
            dept = self.signals.item_department if cand is None else self.signals.item_department[cand]
            ctx = np.zeros((b, n), dtype=np.float32)
            for r, c in enumerate(contexts):
                if c is None:
                    continue
                ctx[r] = c.department_lift(self.signals)[dept]
            out["context"] = ctx
        return out

    def _check(
        self, users: Users, sessions: Sequence[SessionSignal | None] | None,
        contexts: Sequence[ContextSignal | None] | None, candidates: np.ndarray | None,
    ) -> tuple[np.ndarray, list[SessionSignal | None], list[ContextSignal | None], np.ndarray | None]:
        u = _as_users(users)
        b = len(u)
        sess: list[SessionSignal | None] = [None] * b if sessions is None else list(sessions)
        ctx: list[ContextSignal | None] = [None] * b if contexts is None else list(contexts)
        if len(sess) != b or len(ctx) != b:
            raise BadRequestError(f"{b} users but {len(sess)} sessions and {len(ctx)} contexts")
        if (u >= self.signals.num_users).any():
            raise BadRequestError(f"user index {int(u.max())} >= {self.signals.num_users} users")
        for s in sess:
            if s is not None and len(s.items) and int(s.items.max()) >= self.num_items:
                raise BadRequestError(f"session item index {int(s.items.max())} out of range")
        cand = None
        if candidates is not None:
            cand = np.asarray(candidates, dtype=np.int64)
            if len(cand) and (cand.min() < 0 or cand.max() >= self.num_items):
                raise BadRequestError(f"candidate indices must be in [0, {self.num_items})",
                                      field="candidates")
        return u, sess, ctx, cand

    def components(
        self,
        users: Users,
        sessions: Sequence[SessionSignal | None] | None,
        contexts: Sequence[ContextSignal | None] | None,
        candidates: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Every normalised component, unweighted.

        Args:
            users: User indices (``None`` or ``-1`` = unknown user: no gnn, no repeat).
            sessions: One ``SessionSignal`` (or None) per request; None = all None.
            contexts: One ``ContextSignal`` (or None) per request; None = all None.
            candidates: Item indices to score; None = the whole catalogue.

        Shapes:
            - return ``{component: [B, n_candidates]}`` float32, keys ``COMPONENTS``.
        """
        u, sess, ctx, cand = self._check(users, sessions, contexts, candidates)
        parts = [
            self._chunk_components(u[s: s + self.chunk_size], sess[s: s + self.chunk_size],
                                   ctx[s: s + self.chunk_size], cand)
            for s in range(0, max(len(u), 1), self.chunk_size)
        ]
        return {c: np.concatenate([p[c] for p in parts]) for c in COMPONENTS}
