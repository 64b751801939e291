"""Non-parametric ranking signals fitted on training events only.

The GNN learns what a user tends to like; these signals carry what it cannot or should not learn:

- ``popularity`` ``[I]``: recency-decayed purchase counts (cold start, tie-breaks).
- user purchase history ``[U, I]`` (CSR): decayed frequency, basket count, first and last
  purchase time per (user, item) — the raw material of the "buy again" score. Grocery shoppers
  repeat themselves, and the best predictor of a repurchase is how large a share of the user's
  baskets held the item lately (see ``graph.ranking.repeat_scores``).
- ``item_sim`` ``[I, I]`` (CSR): item–item co-occurrence within sessions (a damped ``P(i | j)``,
  see ``item_cooccurrence``), top-k neighbours per item.
- ``item_line`` ``[I]``: the item's product line (category level 2 × brand); a session item raises
  the other items of its line (grocery baskets hold several flavours of one cat food).
- the known users' past baskets (CSR): which of your usual items you buy *together* — the raw
  material of the personal ``basket`` component (see ``graph.ranking.basket_scores``).
- ``peers`` (CSR ``[U, I]``): what each known user's most similar shoppers buy (user-kNN over the
  dampened, recency-decayed purchase vectors; the neighbourhood half of TIFU-KNN, Hu et al.,
  SIGIR 2020). It finds items a shopper has never bought that people who shop like them buy
  regularly: the main source of *discovery* candidates (see :func:`peer_items`).
- ``ease`` (CSR ``[U, I]``): each known user's best items by EASE (Steck, WWW 2019), a linear
  item-item model fitted in closed form on who bought what; it weighs each item against all the
  others at once instead of counting pairs (see :func:`ease_items`).
- ``context_lift`` ``[7, 24, D]`` and ``holiday_lift`` ``[D]``: log-lift of a department's share of
  purchases at a weekday/hour (and on public holidays) over its overall share, smoothed towards 0.
- ``attribute_lift``: the same log-lift for each value of the events' optional context columns
  (``device``, ``region``; :data:`graph.schema.CONTEXT_ATTRIBUTES`) where the data has them: a
  department's share of the purchases made on that device or in that region over its share among
  all purchases with a value. Empty when the events carry neither (the built-in data).

Everything is indexed like the ``Interactions`` it was fitted with: rows of the user arrays are
``inter.user_ids``, item positions are ``inter.item_ids`` (the whole catalogue).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import holidays
import numpy as np
import pandas as pd
import scipy.sparse as sp

from graph import schema as S
from graph.cooccurrence import item_cooccurrence
from graph.errors import ArtifactError, DataError
from graph.interactions import Interactions

COMPONENTS: tuple[str, ...] = (
    "gnn", "session", "repeat", "cooc", "line", "intent", "basket", "pop", "context",
)
SIGNALS_FORMAT = 1
_ARRAYS = "signals.npz"
_HISTORY = "user_history.npz"
_BASKETS = "user_baskets.npz"
_ITEM_SIM = "item_sim.npz"
_META = "signals.json"
_PEERS = "peers.npz"  # optional: models exported before it have none
_EASE = "ease.npz"  # optional: models exported before it have none
_ATTRIBUTES = "context_attributes.npz"  # optional: only data with device / region columns has it
# Values of one context column kept in its lift table: the most frequent ones (a request with
# another value gets no lift from that column). Bounds the table for free-text regions.
MAX_ATTRIBUTE_VALUES = 256
# EASE fitted by users where there are fewer shoppers than items (:func:`ease_items`): the same
# model to the seventh digit and 8x faster on the built-in data, but the ranker refitted on its
# scores kept more trees every time it was measured (271 instead of 196 in the default job,
# 225-234 instead of 167-183 on three held-out quarters, recall within the noise), and more
# trees cost every recommendation; so fitted by items unless this is set (read at call time).
EASE_BY_USERS = False


@dataclass
class SignalParams:
    """Hyper-parameters the signals were fitted with (kept for reproducibility)."""

    pop_half_life_days: float = 30.0
    history_half_life_days: float = 60.0
    sim_top_k: int = 100
    sim_shrink: float = 20.0
    sim_popularity_damping: float = 0.2
    sim_basket_power: float = 0.5
    context_smoothing: float = 20.0
    repeat_rate_prior: float = 5.0
    repeat_rate_power: float = 0.5
    peer_neighbours: int = 100
    peer_items: int = 200
    ease_items: int = 10_000
    ease_lambda: float = 500.0
    ease_user_items: int = 300
    country: str = "US"


@dataclass
class RankingSignals:
    """Non-parametric signals; see the module docstring.

    Shapes:
        - **popularity** ``[I]`` float32: decayed purchase weight per item.
        - **hist_indptr** ``[U+1]``, **hist_indices** ``[nnz]``: the CSR pattern of the user
          history; **hist_weight** (decayed event weight), **hist_count** (sessions holding the
          item), **hist_first** / **hist_last** (unix seconds of the first/last such session)
          ``[nnz]``.
        - **user_sessions** ``[U]`` (sessions with a positive event), **user_decayed_sessions**
          ``[U]`` (the same, recency-decayed), **user_last** ``[U]`` (unix seconds).
        - **basket_indptr** ``[NB+1]``, **basket_items** ``[nnz]``: the items of every training
          session (basket) of the known users, CSR rows grouped by user; user ``u``'s baskets are
          rows ``user_basket_indptr[u]:user_basket_indptr[u+1]`` (``[U+1]``).
        - **item_repeat_rate** ``[I]``: smoothed share of the item's buyers who bought it in at
          least two sessions (milk ≈ 0.6, a barbecue grill ≈ 0.05).
        - **item_sim** ``[I, I]`` CSR float32, row ``j`` = neighbours of item ``j``, at most
          ``sim_top_k`` entries per row, zero diagonal.
        - **item_department** ``[I]`` int: index into ``department_names`` (0 = unknown).
        - **item_line** ``[I]`` int: product line index (category level 2 × brand), in
          ``[0, num_lines)``.
        - **item_category** ``[I]`` int: category index (level 2 of the category path, the
          level the session's intent is shown at), in ``[0, num_categories)``.
        - **context_lift** ``[7, 24, D]``, **holiday_lift** ``[D]`` float32.
        - **attribute_lift**: ``{column: {value: [D] float32}}`` for the context columns the
          events carry (values as :func:`attribute_value` spells them); ``{}`` without any.
        - **peer_indptr** ``[U+1]``, **peer_indices** ``[nnz]`` (sorted within a row), **peer_score**
          ``[nnz]`` float32: the user's :func:`peer_items` (empty rows in models exported before
          them).
        - **ease_indptr**, **ease_indices**, **ease_score**: the same for :func:`ease_items`.
    """

    popularity: np.ndarray
    hist_indptr: np.ndarray
    hist_indices: np.ndarray
    hist_weight: np.ndarray
    hist_count: np.ndarray
    hist_first: np.ndarray
    hist_last: np.ndarray
    user_sessions: np.ndarray
    user_decayed_sessions: np.ndarray
    user_last: np.ndarray
    basket_indptr: np.ndarray
    basket_items: np.ndarray
    user_basket_indptr: np.ndarray
    item_repeat_rate: np.ndarray
    item_sim: sp.csr_matrix
    item_department: np.ndarray
    item_line: np.ndarray
    item_category: np.ndarray
    department_names: list[str]
    context_lift: np.ndarray
    holiday_lift: np.ndarray
    now: float
    params: SignalParams = field(default_factory=SignalParams)
    peer_indptr: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    peer_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    peer_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    ease_indptr: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ease_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    ease_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    attribute_lift: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.peer_indptr) == 0:  # a model exported before peers: every row empty
            self.peer_indptr = np.zeros(self.num_users + 1, dtype=np.int64)
        if len(self.ease_indptr) == 0:  # a model exported before EASE: every row empty
            self.ease_indptr = np.zeros(self.num_users + 1, dtype=np.int64)

    def peers_of(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's peer items (sorted indices) and their scores. Shapes: ``[n]`` each."""
        lo, hi = int(self.peer_indptr[user]), int(self.peer_indptr[user + 1])
        return self.peer_indices[lo:hi], self.peer_score[lo:hi]

    def ease_of(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's best :func:`ease_items` (sorted indices) and their scores. Shapes: ``[n]``."""
        lo, hi = int(self.ease_indptr[user]), int(self.ease_indptr[user + 1])
        return self.ease_indices[lo:hi], self.ease_score[lo:hi]

    @property
    def num_users(self) -> int:
        return len(self.hist_indptr) - 1

    @property
    def num_items(self) -> int:
        return len(self.popularity)

    def _hist(self, data: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix(
            (data, self.hist_indices, self.hist_indptr), shape=(self.num_users, self.num_items)
        )

    # Cached: a session's components ask for them on every request, and each is a pass over
    # the catalogue (the arrays are never changed in place; dataclasses.replace makes a new
    # instance, which computes its own).
    @functools.cached_property
    def num_lines(self) -> int:
        return int(self.item_line.max()) + 1 if len(self.item_line) else 0

    @functools.cached_property
    def num_categories(self) -> int:
        return int(self.item_category.max()) + 1 if len(self.item_category) else 0

    @property
    def user_history(self) -> sp.csr_matrix:
        """Decayed purchase weight per (user, item). Shapes: ``[U, I]`` CSR."""
        return self._hist(self.hist_weight)

    @property
    def user_counts(self) -> sp.csr_matrix:
        """Number of sessions in which the user bought the item. Shapes: ``[U, I]`` CSR."""
        return self._hist(self.hist_count)

    def user_items(self, user: int) -> np.ndarray:
        """Item indices the user has positive history with. Shapes: ``[n]``."""
        return self.hist_indices[self.hist_indptr[user]: self.hist_indptr[user + 1]]

    # ----------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> None:
        """Write the signals as ``.npz``/``.json`` files into ``directory`` (flat, no sub-folders)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(
            d / _ARRAYS,
            popularity=self.popularity,
            item_department=self.item_department,
            item_line=self.item_line,
            item_category=self.item_category,
            context_lift=self.context_lift,
            holiday_lift=self.holiday_lift,
            user_sessions=self.user_sessions,
            user_decayed_sessions=self.user_decayed_sessions,
            user_last=self.user_last,
            item_repeat_rate=self.item_repeat_rate,
        )
        np.savez(
            d / _BASKETS,
            indptr=self.basket_indptr,
            items=self.basket_items,
            user_indptr=self.user_basket_indptr,
        )
        np.savez(
            d / _HISTORY,
            indptr=self.hist_indptr,
            indices=self.hist_indices,
            weight=self.hist_weight,
            count=self.hist_count,
            first=self.hist_first,
            last=self.hist_last,
        )
        sp.save_npz(d / _ITEM_SIM, self.item_sim)
        np.savez(d / _PEERS, indptr=self.peer_indptr, indices=self.peer_indices,
                 score=self.peer_score)
        np.savez(d / _EASE, indptr=self.ease_indptr, indices=self.ease_indices,
                 score=self.ease_score)
        meta = {
            "format": SIGNALS_FORMAT,
            "now": self.now,
            "department_names": self.department_names,
            "params": self.params.__dict__,
        }
        if self.attribute_lift:
            # One [V, D] table per column; its values, in row order, go into the JSON (a region
            # name can be anything, so it is not an .npz key).
            meta["context_attributes"] = {c: list(v) for c, v in self.attribute_lift.items()}
            tables: dict[str, Any] = {
                c: np.stack(list(v.values())).astype(np.float32) if v
                else np.zeros((0, len(self.department_names)), np.float32)
                for c, v in self.attribute_lift.items()
            }
            np.savez(d / _ATTRIBUTES, allow_pickle=False, **tables)
        (d / _META).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> RankingSignals:
        """Read what ``save`` wrote.

        Raises:
            ArtifactError: if a file is missing or of an unknown format.
        """
        d = Path(directory)
        missing = [n for n in (_ARRAYS, _HISTORY, _BASKETS, _ITEM_SIM, _META)
                   if not (d / n).exists()]
        if missing:
            raise ArtifactError(f"ranking signals in {d} lack {missing}; re-export the model")
        meta = json.loads((d / _META).read_text())
        if meta.get("format") != SIGNALS_FORMAT:
            raise ArtifactError(
                f"ranking signals in {d} have format {meta.get('format')}, this code reads "
                f"{SIGNALS_FORMAT}; retrain with this version"
            )
        with np.load(d / _ARRAYS) as a, np.load(d / _HISTORY) as h, np.load(d / _BASKETS) as b:
            arrays = {k: a[k] for k in a.files}
            hist = {k: h[k] for k in h.files}
            baskets = {k: b[k] for k in b.files}
        peers: dict[str, np.ndarray] = {}
        if (d / _PEERS).exists():
            with np.load(d / _PEERS) as pz:
                peers = {"peer_indptr": pz["indptr"], "peer_indices": pz["indices"],
                         "peer_score": pz["score"]}
        if (d / _EASE).exists():
            with np.load(d / _EASE) as ez:
                peers.update(ease_indptr=ez["indptr"], ease_indices=ez["indices"],
                             ease_score=ez["score"])
        attribute_lift: dict[str, dict[str, np.ndarray]] = {}
        names = meta.get("context_attributes") or {}
        if names:
            if not (d / _ATTRIBUTES).exists():
                raise ArtifactError(f"ranking signals in {d} name context columns {list(names)} "
                                    f"but lack {_ATTRIBUTES}; re-export the model")
            with np.load(d / _ATTRIBUTES) as az:
                attribute_lift = {c: dict(zip(vals, az[c], strict=True)) for c, vals in names.items()}
        return cls(
            popularity=arrays["popularity"],
            hist_indptr=hist["indptr"],
            hist_indices=hist["indices"],
            hist_weight=hist["weight"],
            hist_count=hist["count"],
            hist_first=hist["first"],
            hist_last=hist["last"],
            user_sessions=arrays["user_sessions"],
            user_decayed_sessions=arrays["user_decayed_sessions"],
            user_last=arrays["user_last"],
            basket_indptr=baskets["indptr"],
            basket_items=baskets["items"],
            user_basket_indptr=baskets["user_indptr"],
            item_repeat_rate=arrays["item_repeat_rate"],
            item_sim=sp.csr_matrix(sp.load_npz(d / _ITEM_SIM)),
            item_department=arrays["item_department"],
            item_line=arrays["item_line"],
            item_category=arrays["item_category"],
            department_names=list(meta["department_names"]),
            context_lift=arrays["context_lift"],
            holiday_lift=arrays["holiday_lift"],
            now=float(meta["now"]),
            params=SignalParams(**meta["params"]),
            attribute_lift=attribute_lift,
            **peers,
        )


# --------------------------------------------------------------------------------- fitting
def to_unix_seconds(ts: pd.Series | pd.Timestamp) -> Any:
    """Naive-UTC timestamps → float unix seconds (a Series → ``np.ndarray``)."""
    if isinstance(ts, pd.Timestamp):
        return float(ts.value) / 1e9
    return ts.to_numpy(dtype="datetime64[ns]").astype(np.int64).astype(np.float64) / 1e9


def _decay(age_s: np.ndarray, half_life_days: float) -> np.ndarray:
    return np.power(0.5, np.clip(age_s, 0.0, None) / (half_life_days * 86400.0))


def product_lines(inter: Interactions) -> np.ndarray:
    """Product line of every item: its (category level 2, brand) pair, as dense indices.

    Falls back to whichever of those feature fields exist (all items share one line if none).

    Shapes:
        - return ``[num_items]`` int64.
    """
    cols = [inter.feature_names.index(f) for f in ("category", "brand") if f in inter.feature_names]
    if not cols:
        return np.zeros(inter.num_items, dtype=np.int64)
    keys = inter.item_features[:, cols].numpy()
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def item_categories(inter: Interactions) -> np.ndarray:
    """Category (level 2 of the path) of every item as dense indices; all 0 without the field.

    Shapes:
        - return ``[num_items]`` int64.
    """
    if "category" not in inter.feature_names:
        return np.zeros(inter.num_items, dtype=np.int64)
    col = inter.item_features[:, inter.feature_names.index("category")].numpy()
    return np.unique(col, return_inverse=True)[1].reshape(-1).astype(np.int64)


def peer_items(
    history: sp.csr_matrix, *, neighbours: int, top_items: int, block_bytes: int = 256 << 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each user's most similar shoppers buy: user-kNN collaborative filtering.

    Each user's history row is dampened (``log1p`` of the decayed weight, so one heavily repeated
    item does not define a shopper) and scaled to unit length; a user's ``neighbours`` nearest
    other users by cosine, weighted by that cosine, vote with their unit rows, and the
    ``top_items`` items with the most votes are kept (the user's own items included: that peers
    buy an item too says it is not one person's habit). Scores are the weighted mean of the
    neighbours' rows, in ``[0, 1]``.

    Cost: the similarities are computed a block of users at a time (``[block, U]`` dense, about
    ``block_bytes``), so time grows with ``U²`` and memory stays bounded; 2,461 users take under
    a second. Beyond a few hundred thousand users this wants an approximate neighbour index.

    Shapes:
        - history ``[U, I]`` CSR, non-negative.
        - return ``indptr`` ``[U+1]`` int64, ``indices`` ``[nnz]`` int32 (ascending within a
          row), ``score`` ``[nnz]`` float32.
    """
    num_users = history.shape[0]
    r = sp.csr_matrix(history, dtype=np.float64, copy=True)
    r.data = np.log1p(np.maximum(r.data, 0.0))
    norm = np.sqrt(np.asarray(r.multiply(r).sum(axis=1)).ravel())
    rn = sp.csr_matrix(sp.diags(1.0 / np.maximum(norm, 1e-12)) @ r)
    rn_t = sp.csr_matrix(rn.T)
    k = min(neighbours, num_users - 1)
    rows_per_block = max(1, block_bytes // (8 * max(num_users, 1)))
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    out_idx: list[np.ndarray] = []
    out_val: list[np.ndarray] = []
    for start in range(0, num_users, rows_per_block):
        stop = min(start + rows_per_block, num_users)
        block = np.asarray((rn[start:stop] @ rn_t).todense())  # [b, U] cosines
        block[np.arange(stop - start), np.arange(start, stop)] = 0.0  # not one's own peer
        if k <= 0:
            votes = sp.csr_matrix((stop - start, history.shape[1]))
        else:
            nb = np.argpartition(-block, k - 1, axis=1)[:, :k]
            w = np.maximum(np.take_along_axis(block, nb, axis=1), 0.0)
            w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
            rows = np.repeat(np.arange(stop - start), k)
            weights = sp.csr_matrix((w.ravel(), (rows, nb.ravel())), shape=(stop - start, num_users))
            votes = sp.csr_matrix(weights @ rn)
            votes.eliminate_zeros()
        for b in range(stop - start):
            lo, hi = votes.indptr[b], votes.indptr[b + 1]
            idx, val = votes.indices[lo:hi], votes.data[lo:hi]
            if len(idx) > top_items:
                keep = np.argpartition(-val, top_items - 1)[:top_items]
                idx, val = idx[keep], val[keep]
            order = np.argsort(idx, kind="stable")
            out_idx.append(idx[order].astype(np.int32))
            out_val.append(val[order].astype(np.float32))
            indptr[start + b + 1] = indptr[start + b] + len(idx)
    if not out_idx:
        return indptr, np.zeros(0, np.int32), np.zeros(0, np.float32)
    return indptr, np.concatenate(out_idx), np.concatenate(out_val)


def spd_inverse(a: np.ndarray, block: int = 1024) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix, as a C-ordered array.

    LAPACK's Cholesky factor (``potrf``) and then its inverse from the factor (``potri``): about
    ``2n³/3`` flops, against ``2n³`` for solving against the identity (``cho_solve(…, I)``), and
    no identity matrix to hold; 2.2× less time for a 10,000 × 10,000 matrix on two cores
    (``bench/ease_inverse.py``). ``potri`` writes one triangle; the other is copied from it in
    blocks of ``block`` columns (no index arrays the size of the matrix). ``a`` is overwritten
    where LAPACK can work in its memory.

    Shapes:
        - a ``[n, n]`` float32 or float64, symmetric positive definite.
        - return ``[n, n]``, the same dtype.

    Raises:
        numpy.linalg.LinAlgError: ``a`` is not positive definite.
    """
    import scipy.linalg as sla
    from scipy.linalg import lapack

    n = a.shape[0]
    c, lower = sla.cho_factor(a, lower=False, overwrite_a=True, check_finite=False)
    potri, = lapack.get_lapack_funcs(("potri",), (c,))
    p, info = potri(c, lower=lower, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK potri failed (info {info}): the matrix is singular")
    # p[i, j] holds the inverse for i <= j (numpy's indexing): fill i > j from it.
    for s in range(0, n, block):
        e = min(s + block, n)
        p[e:, s:e] = p[s:e, e:].T
        diag = p[s:e, s:e]
        below = np.tril_indices(e - s, -1)
        diag[below] = diag.T[below]
    # Symmetric now, so the transpose of a Fortran-ordered result is the same matrix in C order
    # (what sparse @ dense reads without a copy).
    return np.ascontiguousarray(p.T if p.flags.f_contiguous else p)


def ease_items(
    history: sp.csr_matrix, *, num_items: int, lam: float, top_items: int,
    block_users: int = 4096, dual: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What goes with each user's purchases: EASE (Steck, WWW 2019), a linear item-item model.

    ``B = argmin ||X - XB||² + lam ||B||²`` with a zero diagonal has the closed form
    ``B = I - P / diag(P)``, ``P = (XᵀX + lam I)⁻¹``, over the binary user-item matrix ``X``.
    Unlike co-occurrence counts it explains each item by all the others at once, so an item
    that merely rides along with a popular one gets little weight. Fitted on the ``num_items``
    items with the most buyers; each user's scores ``X_u B`` are computed for those items and
    the ``top_items`` best kept (the user's own items included).

    Two exact ways to the same scores, the cheaper chosen with ``dual=None``, by items with
    ``dual=False`` (what :func:`fit_signals` asks unless :data:`EASE_BY_USERS` is set), by users
    with ``dual=True``:

    - **items** (``N`` items ≤ ``U`` users): ``P`` itself (:func:`spd_inverse`, ``N³``), then
      ``X B`` by blocks of users;
    - **users** (``U < N``, the built-in data's 2,461 shoppers and 10,000 items): ``X B`` never
      needs ``P`` or ``B``, only ``X P = (XXᵀ + lam I)⁻¹ X`` (the push-through identity) and
      ``diag(P)_j = (1 - x_jᵀ (XXᵀ + lam I)⁻¹ x_j) / lam`` (Woodbury), where ``x_j`` is item
      ``j``'s column: ``X B = X - (X P) / diag(P)``. A ``U × U`` inverse instead of ``N × N``,
      in float64 (``1 - x_jᵀ…`` must not lose its digits), and no ``N × N`` matrix in memory:
      the whole fit 2.3 instead of 19.0 s for the built-in data on two cores, the same
      scores to 3.3e-6 (``bench/ease_inverse.py``).

    Shapes:
        - history ``[U, I]`` CSR; only its pattern is used.
        - return ``indptr`` ``[U+1]`` int64, ``indices`` ``[nnz]`` int32 (ascending within a
          row), ``score`` ``[nnz]`` float32.
    """
    num_users = history.shape[0]
    top, xt = ease_matrix(history, num_items)
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    if len(top) < 2 or top_items <= 0:
        return indptr, np.zeros(0, np.int32), np.zeros(0, np.float32)
    scores_of = (_ease_by_users(xt, lam) if (num_users < len(top) if dual is None else dual)
                 else _ease_by_items(xt, lam))
    k = min(top_items, len(top))
    out_idx: list[np.ndarray] = []
    out_val: list[np.ndarray] = []
    for start in range(0, num_users, block_users):
        stop = min(start + block_users, num_users)
        scores = scores_of(start, stop)  # [block, N]
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for r in range(stop - start):
            if xt.indptr[start + r + 1] == xt.indptr[start + r]:  # no purchase among the items
                indptr[start + r + 1] = indptr[start + r]
                continue
            cols = best[r][scores[r, best[r]] > 0]
            order = np.argsort(top[cols], kind="stable")
            out_idx.append(top[cols[order]].astype(np.int32))
            out_val.append(scores[r, cols[order]].astype(np.float32))
            indptr[start + r + 1] = indptr[start + r] + len(cols)
    if not out_idx:
        return indptr, np.zeros(0, np.int32), np.zeros(0, np.float32)
    return indptr, np.concatenate(out_idx), np.concatenate(out_val)


def ease_matrix(history: sp.csr_matrix, num_items: int) -> tuple[np.ndarray, sp.csr_matrix]:
    """EASE's items and its binary user-item matrix ``X`` over them (:func:`ease_items`).

    The items with two buyers or more, the ``num_items`` with the most buyers (ties by id),
    in ascending id order. Shared with ``bench/ease_inverse.py`` so the bench times the
    matrix the job fits.

    Shapes: history ``[U, I]`` CSR (only its pattern is used); return ``top`` ``[N]`` int64
    and ``X`` ``[U, N]`` float32 CSR.
    """
    x = sp.csr_matrix(history, dtype=np.float32, copy=True)
    x.data[:] = 1.0
    buyers = np.bincount(x.indices, minlength=history.shape[1])
    top = np.flatnonzero(buyers >= 2)
    top = top[np.argsort(-buyers[top], kind="stable")[:num_items]]
    top.sort()
    return top, sp.csc_matrix(x)[:, top].tocsr()


def ease_gram(xt: sp.csr_matrix, lam: float) -> np.ndarray:
    """``XᵀX + lam I`` of :func:`ease_matrix`'s ``X``, dense float32 ``[N, N]``."""
    g = (xt.T @ xt).toarray().astype(np.float32)
    g[np.diag_indices(xt.shape[1])] += np.float32(lam)
    return g


def _ease_by_items(xt: sp.csr_matrix, lam: float) -> Callable[[int, int], np.ndarray]:
    """EASE's ``X B`` for users ``start:stop`` from ``B`` itself (:func:`ease_items`)."""
    b = spd_inverse(ease_gram(xt, lam))
    b /= np.diag(b).copy()[None, :]  # in place: B = -P / diag(P), zero diagonal
    np.negative(b, out=b)
    np.fill_diagonal(b, 0.0)
    return lambda start, stop: np.asarray(xt[start:stop] @ b)


def _ease_by_users(xt: sp.csr_matrix, lam: float) -> Callable[[int, int], np.ndarray]:
    """EASE's ``X B = X - (X P) / diag(P)`` for users ``start:stop`` without ``P``
    (:func:`ease_items`)."""
    u, n = xt.shape
    x64 = xt.astype(np.float64)
    k = (x64 @ x64.T).toarray()
    k[np.diag_indices(u)] += lam
    xp = np.asarray((x64.T @ spd_inverse(k)).T)  # X P = K⁻¹ X, [U, N]
    rows, cols = xt.nonzero()
    diag = (1.0 - np.bincount(cols, weights=xp[rows, cols], minlength=n)) / lam
    xp = np.ascontiguousarray(xp / diag[None, :], dtype=np.float32)
    return lambda start, stop: xt[start:stop].toarray() - xp[start:stop]


def user_baskets(
    users: np.ndarray, sessions: np.ndarray, items: np.ndarray, num_users: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every user's past baskets as CSR rows of item indices, grouped by user.

    Shapes:
        - **users**, **sessions**, **items** ``[n]``: one row per (known user) event.
        - return ``(basket_indptr [NB+1], basket_items [nnz] int32, user_basket_indptr [U+1])``.
    """
    triples = np.unique(np.stack([users, sessions, items], axis=1), axis=0)  # sorted by (u, s)
    if len(triples) == 0:
        return (np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(num_users + 1, np.int64))
    new = np.ones(len(triples), dtype=bool)
    new[1:] = (triples[1:, 0] != triples[:-1, 0]) | (triples[1:, 1] != triples[:-1, 1])
    starts = np.flatnonzero(new)
    basket_indptr = np.append(starts, len(triples)).astype(np.int64)
    per_user = np.bincount(triples[starts, 0], minlength=num_users)
    user_indptr = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
    return basket_indptr, triples[:, 2].astype(np.int32), user_indptr


def item_repeat_rate(
    items: np.ndarray, counts: np.ndarray, num_items: int, prior: float
) -> np.ndarray:
    """Per item, the share of its buyers who bought it again, shrunk to the global share.

    ``(n2 + prior * g) / (n1 + prior)`` with ``n1`` users who bought the item, ``n2`` of them in
    at least two sessions and ``g`` the same share over all (user, item) pairs.

    Shapes:
        - **items**, **counts** ``[P]``: one entry per (user, item) pair; return ``[num_items]``.
    """
    n1 = np.bincount(items, minlength=num_items).astype(np.float64)
    n2 = np.bincount(items, weights=(counts >= 2).astype(np.float64), minlength=num_items)
    g = n2.sum() / max(n1.sum(), 1.0)
    return ((n2 + prior * g) / (n1 + prior)).astype(np.float32)


def _lift(counts: np.ndarray, base_share: np.ndarray, prior: float) -> np.ndarray:
    """Smoothed log-lift ``log((n + prior) / (E + prior))`` of department counts over expectation.

    ``E`` is the count the cell would have with the base shares; the pseudo-count ``prior`` pulls
    cells with little evidence (rare departments, quiet hours) towards a lift of 0.

    Shapes:
        - **counts** ``[..., D]``, **base_share** ``[D]``; return ``[..., D]``.
    """
    expected = counts.sum(axis=-1, keepdims=True) * base_share
    return np.clip(np.log((counts + prior) / (expected + prior)), -2.0, 2.0)


def attribute_value(value: Any) -> str | None:
    """A context column's value as the lift tables key it: trimmed and lower-cased (``Mobile``
    and ``mobile `` are one device), a whole number without its ``.0`` (a numeric region code
    read from a CSV column with gaps is a float, the request sends ``"12"``); None for a missing
    or empty value and for ``unknown`` (what the context enricher sends when a request names
    none)."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        value = int(value)
    s = str(value).strip().lower()
    return None if s in ("", "unknown", "nan", "none") else s


def attribute_lifts(ev: pd.DataFrame, dept: np.ndarray, num_depts: int,
                    prior: float) -> dict[str, dict[str, np.ndarray]]:
    """Per-department log-lift of each value of the events' context columns
    (:data:`graph.schema.CONTEXT_ATTRIBUTES`), against the department shares of all events with a
    value in that column; the :data:`MAX_ATTRIBUTE_VALUES` most frequent values of each.

    Shapes:
        - **ev** ``[n]`` rows, **dept** ``[n]`` (each row's item department); every value of the
          result ``[D]`` float32.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for col in S.CONTEXT_ATTRIBUTES:
        if col not in ev.columns:
            continue
        values = pd.Series([attribute_value(v) for v in ev[col].to_numpy()], dtype=object)
        counts = values.value_counts()
        if counts.empty:
            continue
        kept = list(counts.index[:MAX_ATTRIBUTE_VALUES])
        code = pd.Index(kept).get_indexer(values.to_numpy())
        has = code >= 0
        cells = np.bincount(code[has] * num_depts + dept[has], minlength=len(kept) * num_depts)
        cells = cells.reshape(len(kept), num_depts).astype(np.float64)
        known = np.bincount(dept[values.notna().to_numpy()], minlength=num_depts).astype(np.float64)
        base = np.maximum(known / max(known.sum(), 1.0), 1e-12)
        table = _lift(cells, base, prior).astype(np.float32)
        out[col] = {v: table[j] for j, v in enumerate(kept)}
    return out


def holiday_dates(country: str, years: range | list[int] | tuple[int, ...]) -> frozenset[Any]:
    """Public holiday dates of ``country`` (``holidays`` library) for ``years`` (cached).

    Raises:
        DataError: for a country the library does not know.
    """
    return _holiday_dates(country, tuple(int(y) for y in years))


@functools.lru_cache(maxsize=64)
def _holiday_dates(country: str, years: tuple[int, ...]) -> frozenset[Any]:
    try:
        cal = holidays.country_holidays(country, years=list(years))
    except NotImplementedError as exc:
        raise DataError(
            f"no public holiday calendar for country {country!r}; use an ISO 3166 code such as 'US'",
            field="country",
        ) from exc
    return frozenset(cal.keys())


def fit_signals(
    train_events: pd.DataFrame,
    inter: Interactions,
    now: pd.Timestamp | None = None,
    *,
    params: SignalParams | None = None,
) -> RankingSignals:
    """Fit every non-parametric signal on training events.

    Only events with an item and a positive ``EVENT_WEIGHTS`` weight count. Events of users outside
    ``inter.user_ids`` are left out of the user history but still count for popularity,
    co-occurrence and context; events of items outside the catalogue are ignored.

    Args:
        train_events: Canonical events, all before the split (the caller guarantees it; nothing
            here looks at a test window).
        inter: Fixes the user and item indexing (``inter.user_ids``, ``inter.item_ids``) and the
            item departments (feature field ``department``).
        now: Reference time of the recency decays (default: the last training event).
        params: Hyper-parameters (defaults: ``SignalParams()``).

    Raises:
        DataError: if no usable event is left.
    """
    params = params or SignalParams()
    ev = train_events[train_events[S.ITEM_COL].notna()]
    w = ev[S.EVENT_COL].map(S.EVENT_WEIGHTS).fillna(0.0).to_numpy(dtype=np.float64)
    items = pd.Index(inter.item_ids).get_indexer(ev[S.ITEM_COL].astype(str))
    keep = (w > 0) & (items >= 0)
    ev, w, items = ev[keep], w[keep], items[keep]
    if ev.empty:
        raise DataError("no training event with a catalogue item and a positive weight",
                        field=S.EVENT_COL)
    num_users, num_items = inter.num_users, inter.num_items
    now_ts = ev[S.TS_COL].max() if now is None else now
    now_s = to_unix_seconds(pd.Timestamp(now_ts))
    ts = to_unix_seconds(ev[S.TS_COL])
    age = now_s - ts

    popularity = np.bincount(
        items, weights=w * _decay(age, params.pop_half_life_days), minlength=num_items
    ).astype(np.float32)

    sessions = pd.factorize(ev[S.SESSION_COL].astype(str))[0].astype(np.int64)
    item_sim = item_cooccurrence(
        sessions, items, num_items, top_k=params.sim_top_k, shrink=params.sim_shrink,
        popularity_damping=params.sim_popularity_damping, basket_power=params.sim_basket_power,
    )

    # --- user history: one row per (user, item), "occasions" = distinct sessions -----------
    users = pd.Index(inter.user_ids).get_indexer(ev[S.USER_COL].astype(str))
    known = users >= 0
    df = pd.DataFrame({
        "u": users[known], "i": items[known], "s": sessions[known], "ts": ts[known],
        "w": (w * _decay(age, params.history_half_life_days))[known],
    })
    pair = df.groupby(["u", "i"], sort=True).agg(
        weight=("w", "sum"), count=("s", "nunique"), first=("ts", "min"), last=("ts", "max")
    )
    u_idx = pair.index.get_level_values(0).to_numpy()
    hist_indptr = np.concatenate([[0], np.cumsum(np.bincount(u_idx, minlength=num_users))])
    sess = df.groupby(["u", "s"], sort=False)["ts"].max().reset_index()
    user_sessions = np.bincount(sess["u"], minlength=num_users).astype(np.float32)
    user_decayed = np.bincount(
        sess["u"], weights=_decay(now_s - sess["ts"].to_numpy(), params.history_half_life_days),
        minlength=num_users,
    ).astype(np.float32)
    user_last = np.full(num_users, np.nan)
    last = df.groupby("u")["ts"].max()
    user_last[last.index.to_numpy()] = last.to_numpy()
    basket_indptr, basket_items, user_basket_indptr = user_baskets(
        df["u"].to_numpy(), df["s"].to_numpy(), df["i"].to_numpy(), num_users
    )

    # --- context: department share by weekday/hour and on holidays ----------------------------
    dept_col = inter.feature_names.index("department") if "department" in inter.feature_names else None
    if dept_col is None:
        item_department = np.zeros(num_items, dtype=np.int64)
        department_names = ["<unk>"]
    else:
        item_department = inter.item_features[:, dept_col].numpy().astype(np.int64)
        department_names = list(inter.feature_vocab.get("department", [])) or [
            str(i) for i in range(int(item_department.max()) + 1)
        ]
    num_depts = len(department_names)
    dept = item_department[items]
    dt = ev[S.TS_COL]
    wd, hr = dt.dt.weekday.to_numpy(), dt.dt.hour.to_numpy()
    cell = np.bincount((wd * 24 + hr) * num_depts + dept, minlength=7 * 24 * num_depts)
    cell = cell.reshape(7, 24, num_depts).astype(np.float64)
    overall = cell.sum(axis=(0, 1))
    base = np.maximum(overall / overall.sum(), 1e-12)
    context_lift = _lift(cell, base, params.context_smoothing).astype(np.float32)

    hol = holiday_dates(params.country, range(dt.min().year, dt.max().year + 2))
    is_hol = dt.dt.date.isin(hol).to_numpy()
    on = np.bincount(dept[is_hol], minlength=num_depts).astype(np.float64)
    off = np.bincount(dept[~is_hol], minlength=num_depts).astype(np.float64)
    off_share = np.maximum(off / max(off.sum(), 1.0), 1e-12)
    holiday_lift = _lift(on, off_share, params.context_smoothing).astype(np.float32)
    attribute_lift = attribute_lifts(ev, dept, num_depts, params.context_smoothing)

    peer_indptr, peer_indices, peer_score = peer_items(
        sp.csr_matrix((pair["weight"].to_numpy(np.float64), (u_idx, pair.index.get_level_values(1)
                                                               .to_numpy())),
                      shape=(num_users, num_items)),
        neighbours=params.peer_neighbours, top_items=params.peer_items,
    )
    ease_indptr, ease_indices, ease_score = ease_items(
        sp.csr_matrix((np.ones(len(u_idx)), (u_idx, pair.index.get_level_values(1).to_numpy())),
                      shape=(num_users, num_items)),
        num_items=params.ease_items, lam=params.ease_lambda, top_items=params.ease_user_items,
        dual=None if EASE_BY_USERS else False,
    )
    return RankingSignals(
        popularity=popularity,
        hist_indptr=hist_indptr.astype(np.int64),
        hist_indices=pair.index.get_level_values(1).to_numpy().astype(np.int32),
        hist_weight=pair["weight"].to_numpy(np.float32),
        hist_count=pair["count"].to_numpy(np.float32),
        hist_first=pair["first"].to_numpy(np.float64),
        hist_last=pair["last"].to_numpy(np.float64),
        user_sessions=user_sessions,
        user_decayed_sessions=user_decayed,
        user_last=user_last,
        basket_indptr=basket_indptr,
        basket_items=basket_items,
        user_basket_indptr=user_basket_indptr,
        item_repeat_rate=item_repeat_rate(
            pair.index.get_level_values(1).to_numpy(), pair["count"].to_numpy(), num_items,
            params.repeat_rate_prior,
        ),
        item_sim=item_sim,
        item_department=item_department,
        item_line=product_lines(inter),
        item_category=item_categories(inter),
        department_names=department_names,
        context_lift=context_lift,
        holiday_lift=holiday_lift,
        attribute_lift=attribute_lift,
        now=now_s,
        params=params,
        peer_indptr=peer_indptr,
        peer_indices=peer_indices,
        peer_score=peer_score,
        ease_indptr=ease_indptr,
        ease_indices=ease_indices,
        ease_score=ease_score,
    )
