"""Stage one of the two-stage recommender: the catalogue a request needs and its candidates.

:class:`Catalogue` holds, for one model version, what candidate generation and the response need
beyond the :class:`graph.ranking.Ranker`: a faiss inner-product index over the GNN item
embeddings, popularity orders (overall, per department, per category), the hybrid search index and the
item columns. :func:`candidates` returns a few hundred to a couple of thousand items for one
request, each with flags saying which sources proposed it (the ranker's ``src_*`` features, and
the per-source candidate recall that ``train_job.py`` reports):

========== ===================================================================================
source     items
========== ===================================================================================
popular    the best sellers overall (every request)
ann_user   nearest GNN item embeddings to the user's GNN embedding (faiss: :func:`ann_index`)
ann_sess   nearest GNN item embeddings to the session's weighted mean item embedding
buy_again  the user's most repeated purchases
cooc       item-item co-occurrence neighbours of the latest session items and of the user's
           most repeated purchases
intent     best sellers of the session's top intent categories
query      hybrid search hits (graph.search: BM25 + text embeddings, rank-fused) of the request's
           query and the session's last search
context    best sellers of the departments the request's weekday/hour/holiday favours
peers      what the user's most similar shoppers buy (user-kNN, ``RankingSignals.peers_of``)
ease       what goes with the user's purchases by the EASE item-item model
           (``RankingSignals.ease_of``)
========== ===================================================================================

Only the second stage (:mod:`graph.ltr`) orders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from graph import schema as S
from graph.kernels import any_member, is_member, union_sources
from graph.ranking import ContextSignal, Ranker, SessionSignal
from graph.search import QueryScores, SearchIndex
from graph.text import ItemText

SOURCES: tuple[str, ...] = (
    "popular", "ann_user", "ann_sess", "buy_again", "cooc", "intent", "query", "context", "peers",
    "ease",
)
# Per source, how many candidates to take.
POPULAR_K = 100
ANN_K = 100
BUY_AGAIN_K = 200
COOC_RECENT_ITEMS = 10
COOC_PER_ITEM = 50
COOC_HISTORY_ITEMS = 10
COOC_PER_HISTORY_ITEM = 20
INTENT_CATEGORIES = 2
INTENT_PER_CATEGORY = 30
QUERY_K = 200
SESSION_QUERY_K = 100
CATEGORY_K = 200
CONTEXT_DEPTS = 3
CONTEXT_PER_DEPT = 30
PEERS_K = 100
EASE_K = 100
USER_CACHE = 200_000
# A source's best items may be excluded from a request (the shopper's past purchases in a
# discovery request, the cart, the items a client asks to leave out). Each source then takes its
# quota from further down its own list, at most REFILL times as deep, instead of proposing fewer
# items: a filter never starves the ranker of a source.
REFILL = 4
# Catalogues this large get an inverted-file ANN index (faiss IndexIVFFlat: sqrt(I) lists, an
# eighth of them scanned per query) instead of the exact one. On the built-in data (91,689 items)
# it finds 94% of the exact top 100 at a fifth of the cost (0.34 vs 1.77 ms per query).
IVF_MIN_ITEMS = 50_000
IVF_PROBE_SHARE = 8
IVF_SEED = 1234  # k-means seed of the inverted file's lists


@dataclass
class Catalogue:
    """One model version's item side for serving and evaluation (immutable once built, its
    category-prefix cache aside).

    Shapes:
        - **item_ids**, **titles**, **categories**, **intent_labels** ``[I]`` object; **prices**
          ``[I]`` float64 (NaN = unknown); **popular** ``[POPULAR_K * REFILL]`` item indices,
          best seller first; **dept_popular**, **category_popular** the same per department and
          category (:data:`CONTEXT_PER_DEPT` and :data:`INTENT_PER_CATEGORY` times ``REFILL``).
    """

    item_ids: np.ndarray
    titles: np.ndarray
    categories: np.ndarray
    categories_lower: np.ndarray
    intent_labels: np.ndarray
    prices: np.ndarray
    popularity: np.ndarray
    popular: np.ndarray
    dept_popular: dict[int, np.ndarray]
    category_popular: dict[int, np.ndarray]
    search: SearchIndex
    index: Any  # faiss inner-product index over the ranker's item embeddings (ann_index())
    _prefix_cache: dict[str, np.ndarray] = field(default_factory=dict)
    _user_ann: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def build(cls, items: pd.DataFrame, ranker: Ranker, text: ItemText) -> Catalogue:
        """Everything from the catalogue table, the ranker's signals and item embeddings and the
        items' text embeddings."""
        index = ann_index(np.ascontiguousarray(ranker.item_emb, dtype=np.float32))
        titles = items[S.TITLE_COL].astype(str).to_numpy(dtype=object)
        categories = items[S.CATEGORY_COL].astype(str).to_numpy(dtype=object)
        label_of = {c: intent_label(c) for c in set(categories.tolist())}
        prices = items[S.PRICE_COL].astype("float64").to_numpy() if S.PRICE_COL in items else (
            np.full(len(items), np.nan))
        sig = ranker.signals
        popularity = np.asarray(sig.popularity, dtype=np.float64)
        order = np.argsort(-popularity, kind="stable")
        return cls(
            item_ids=items[S.ITEM_COL].astype(str).to_numpy(dtype=object),
            titles=titles,
            categories=categories,
            categories_lower=np.array([c.lower() for c in categories.tolist()], dtype=str),
            intent_labels=np.array([label_of[c] for c in categories.tolist()], dtype=object),
            prices=prices,
            popularity=popularity,
            popular=order[:POPULAR_K * REFILL],
            dept_popular=_top_per_group(order, np.asarray(sig.item_department),
                                        CONTEXT_PER_DEPT * REFILL),
            category_popular=_top_per_group(order, np.asarray(sig.item_category),
                                            INTENT_PER_CATEGORY * REFILL),
            search=SearchIndex(items, text),
            index=index,
        )

    def user_neighbours(self, ranker: Ranker, user: int,
                        excluded: np.ndarray | None = None) -> np.ndarray:
        """The :data:`ANN_K` items nearest to the user's GNN embedding that are not ``excluded``.

        The nearest ``2 * ANN_K`` are cached per user (int32: a user's long-term embedding does
        not change within a model version; the cache is bounded), so a few exclusions (a cart)
        cost no search; when exclusions leave fewer than ``ANN_K`` of them (a discovery request
        excludes the whole purchase history), a deeper search (``ANN_K * REFILL``) refills.
        """
        hit = self._user_ann.get(user)
        if hit is None:
            hit = self.nearest(ranker.user_emb[user], 2 * ANN_K).astype(np.int32)
            if len(self._user_ann) > USER_CACHE:
                self._user_ann.clear()
            self._user_ann[user] = hit
        near = first_allowed(hit, ANN_K, excluded).astype(np.int64)
        if len(near) < ANN_K <= len(hit) // 2:
            near = first_allowed(self.nearest(ranker.user_emb[user], ANN_K * REFILL), ANN_K,
                                 excluded)
        return near

    def nearest(self, vector: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` items with the largest inner product with ``vector``, nearest first."""
        _, ann = self.index.search(np.ascontiguousarray(vector[None, :], dtype=np.float32), k)
        return ann[0][ann[0] >= 0].astype(np.int64)

    def category_items(self, prefix: str) -> np.ndarray:
        """Item indices whose category path starts with ``prefix`` (case-insensitive), most
        popular first (cached per prefix; the cache is bounded)."""
        key = prefix.strip().lower()
        hit = self._prefix_cache.get(key)
        if hit is None:
            idx = np.flatnonzero(np.char.startswith(self.categories_lower, key))
            hit = idx[np.argsort(-self.popularity[idx], kind="stable")]
            if len(self._prefix_cache) > 1024:
                self._prefix_cache.clear()
            self._prefix_cache[key] = hit
        return hit


def intent_label(category: str) -> str:
    """The level at which a session's intent is shown: the first two levels of the path."""
    sep = S.CATEGORY_SEP.strip()
    return S.CATEGORY_SEP.join(p.strip() for p in category.split(sep)[:2])


def _top_per_group(order: np.ndarray, group: np.ndarray, k: int) -> dict[int, np.ndarray]:
    """The first ``k`` items of ``order`` in each group."""
    g = group[order]
    out: dict[int, np.ndarray] = {}
    for v in np.unique(g):
        out[int(v)] = order[g == v][:k]
    return out


@dataclass(frozen=True)
class CandidateSet:
    """The items one request scores and which sources proposed each.

    Shapes:
        - **items** ``[n]`` int64, sorted unique; **sources** ``[n, len(SOURCES)]`` bool.
    """

    items: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, keep: np.ndarray) -> CandidateSet:
        return CandidateSet(self.items[keep], self.sources[keep])


def session_embedding(ranker: Ranker, session: SessionSignal) -> np.ndarray:
    """The session's weighted mean GNN item embedding. Shapes: ``[d]``."""
    w = session.weights.astype(np.float32)
    return (w / max(float(np.abs(w).sum()), 1e-12)) @ ranker.item_emb[session.items]


def ann_index(emb: np.ndarray, cache: bool = True) -> Any:
    """A faiss inner-product index over item embeddings: exact (``IndexFlatIP``) below
    :data:`IVF_MIN_ITEMS` items, an inverted file above (k-means lists, seeded, one thread: the
    same embeddings always give the same index, so evaluation and serving agree).

    Training the inverted file's k-means takes over a second on the default model, at every
    replica start; with ``cache`` the index is kept in the machine's cache
    (:mod:`graph.cache`), named by the embeddings' bytes and the parameters, and the next
    process reads it (about 0.05 s).
    """
    import faiss

    faiss.omp_set_num_threads(1)
    n, dim = emb.shape
    index: Any
    if n < IVF_MIN_ITEMS:
        index = faiss.IndexFlatIP(dim)
        index.add(emb)
        return index
    nlist = int(np.sqrt(n))

    def build() -> Any:
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = IVF_SEED
        ivf.train(emb)
        ivf.add(emb)
        return ivf

    def load(path: Path) -> Any:
        ivf = faiss.read_index(str(path / "index.faiss"))
        if (ivf.ntotal, ivf.d, getattr(ivf, "nlist", None)) != (n, dim, nlist):
            raise ValueError(f"holds {ivf.ntotal} x {ivf.d} in {getattr(ivf, 'nlist', None)} "
                             f"lists, not {n} x {dim} in {nlist}")
        return ivf

    if cache:
        from graph.cache import cached, digest

        key = digest([f"ivfflat-ip-{nlist}-{IVF_SEED}", f"faiss{faiss.__version__}",
                      str(emb.shape), str(emb.dtype), np.ascontiguousarray(emb).data])
        index = cached("ann-index", key, build,
                       lambda ivf, path: faiss.write_index(ivf, str(path / "index.faiss")), load)
    else:
        index = build()
    index.nprobe = max(1, nlist // IVF_PROBE_SHARE)
    return index


def candidates(
    ranker: Ranker,
    cat: Catalogue,
    *,
    user: int | None,
    session: SessionSignal | None,
    item_events: Sequence[tuple[int, str, float]],
    context: ContextSignal | None,
    query: QueryScores | None = None,
    session_query: QueryScores | None = None,
    category: str | None = None,
    exclude: np.ndarray | None = None,
) -> CandidateSet:
    """The union of every source that applies to one request, minus ``exclude``, restricted to
    ``category`` (a category-path prefix) when given.

    A request with a ``query`` is a search: when some candidates are hits of it (a BM25 match or
    among the nearest texts), only those are kept (the ranker orders them). The session's latest
    search (``session_query``) only adds candidates and features.

    Args:
        ranker: Embeddings and signals of the model version.
        cat: Its catalogue.
        user: The user's row, if known (and not forgotten).
        session: The session signal, if the session has catalogue items.
        item_events: ``(item index, event, ts)`` of the session, oldest first.
        context: The request's context signal.
        query: Search scores of the request's search text.
        session_query: Search scores of the session's latest search.
        category: Category-path prefix the items must have.
        exclude: Item indices never to return.
    """
    sig = ranker.signals
    excluded = np.unique(np.asarray(exclude, dtype=np.int64)) if (
        exclude is not None and len(exclude)) else None
    parts: list[tuple[int, np.ndarray]] = [(0, first_allowed(cat.popular, POPULAR_K, excluded))]
    if user is not None:
        parts.append((1, cat.user_neighbours(ranker, user, excluded)))
        lo, hi = sig.hist_indptr[user], sig.hist_indptr[user + 1]
        hist = sig.hist_indices[lo:hi].astype(np.int64)
        order = np.argsort(-sig.hist_weight[lo:hi], kind="stable")
        parts.append((3, hist[order[:BUY_AGAIN_K]]))
        for i in hist[order[:COOC_HISTORY_ITEMS]].tolist():
            parts.append((4, _neighbours(ranker, i, COOC_PER_HISTORY_ITEM, excluded)))
        parts.append((8, _best_allowed(*sig.peers_of(user), PEERS_K, excluded)))
        if EASE_K > 0:
            parts.append((9, _best_allowed(*sig.ease_of(user), EASE_K, excluded)))
    if session is not None and not session.is_empty:
        near = cat.nearest(session_embedding(ranker, session), ANN_K if excluded is None
                          else min(ANN_K * REFILL, ANN_K + len(excluded)))
        parts.append((2, first_allowed(near, ANN_K, excluded)))
        recent: list[int] = []
        for i, ev, _ in reversed(item_events):
            if ev != S.REMOVE_FROM_CART and i not in recent:
                recent.append(i)
            if len(recent) >= COOC_RECENT_ITEMS:
                break
        for i in recent:
            parts.append((4, _neighbours(ranker, i, COOC_PER_ITEM, excluded)))
        mass = np.bincount(sig.item_category[session.items], weights=session.weights)
        for c in np.argsort(-mass)[:INTENT_CATEGORIES]:
            if mass[c] > 0:
                parts.append((5, first_allowed(cat.category_popular.get(int(c), _NONE),
                                               INTENT_PER_CATEGORY, excluded)))
    if query is not None:
        parts.append((6, query.hits(cat.popularity, QUERY_K)))
    if session_query is not None:
        parts.append((6, session_query.hits(cat.popularity, SESSION_QUERY_K)))
    if category:
        parts.append((6, cat.category_items(category)[:CATEGORY_K]))
    if context is not None:
        lift = context.department_lift(sig)
        for d in np.argsort(-lift)[:CONTEXT_DEPTS]:
            parts.append((7, first_allowed(cat.dept_popular.get(int(d), _NONE), CONTEXT_PER_DEPT,
                                           excluded)))
    source_of = np.repeat(np.array([j for j, _ in parts], dtype=np.int64),
                          [len(p) for _, p in parts])
    its = np.concatenate([p for _, p in parts]).astype(np.int64)
    items, flags = union_sources(its, source_of, len(SOURCES))
    out = CandidateSet(items, flags)
    keep = np.ones(len(items), dtype=bool)
    if excluded is not None:
        keep &= ~is_member(items, excluded)
    if category:
        keep &= np.char.startswith(cat.categories_lower[items], category.strip().lower())
    if query is not None:
        matches = query.fused_of(items) > 0
        if (matches & keep).any():
            keep &= matches
    return out if keep.all() else out.subset(keep)


_NONE = np.zeros(0, dtype=np.int64)


def _best_allowed(items: np.ndarray, scores: np.ndarray, k: int,
                  excluded: np.ndarray | None) -> np.ndarray:
    """The ``k`` best-scored of scored items (a user's peer or EASE items, an item's
    co-occurrence neighbours) that are not excluded."""
    if excluded is not None:
        ok = ~is_member(items, excluded)
        items, scores = items[ok], scores[ok]
    if len(items) > k:
        items = items[np.argpartition(-scores, k - 1)[:k]]
    return items.astype(np.int64)


def first_allowed(order: np.ndarray, k: int, excluded: np.ndarray | None) -> np.ndarray:
    """The first ``k`` items of ``order`` that are not ``excluded`` (sorted, unique; None:
    nothing is)."""
    head = order[:k]
    if excluded is None or not any_member(head, excluded):
        return head
    # At most len(excluded) of any prefix are excluded, so the first k allowed lie within the
    # first k + len(excluded): no need to test the rest of a long list (a department's items).
    window = order[:k + len(excluded)]
    return window[~is_member(window, excluded)][:k]


def _neighbours(ranker: Ranker, i: int, k: int, excluded: np.ndarray | None = None) -> np.ndarray:
    """Item ``i``'s ``k`` strongest co-occurrence neighbours that are not ``excluded``."""
    sim = ranker.signals.item_sim
    row = slice(sim.indptr[i], sim.indptr[i + 1])
    return _best_allowed(sim.indices[row], sim.data[row], k, excluded)


def exclusions(exclude: np.ndarray | None, item_events: Sequence[tuple[int, str, float]]) -> np.ndarray:
    """``exclude`` plus what the session's cart holds (added or bought, not taken out)."""
    cart: dict[int, int] = {}
    for i, ev, _ in item_events:
        if ev in (S.ADD_TO_CART, S.PURCHASE):
            cart[i] = cart.get(i, 0) + 1
        elif ev == S.REMOVE_FROM_CART:
            cart[i] = cart.get(i, 0) - 1
    held = np.fromiter((i for i, n in cart.items() if n > 0), dtype=np.int64)
    if exclude is None or len(exclude) == 0:
        return held
    return np.union1d(np.asarray(exclude, dtype=np.int64), held)
