"""Stage two's input: one feature row per (request, candidate item).

The learned ranker (:mod:`graph.ltr`) scores these rows. Every feature belongs to a *component*
(:data:`COMPONENT_OF`), the unit a reason sentence is written for: an item's reasons come from the
summed TreeSHAP contributions of its features, per component.

Features (see :data:`FEATURES`):

- **GNN**: ``gnn`` (z-scored user · item), ``session`` (z-scored session embedding · item),
  ``sess_sim_max`` / ``sess_sim_mean`` (cosine similarity of the item's GNN vector to the
  session items' vectors);
- **repeat purchase**: ``repeat`` (the buy-again share), ``hist_count`` (sessions in which the
  user bought the item), ``days_since_last``, ``interval_days`` (typical time between two of the
  user's purchases of it), ``due`` (their ratio), ``user_sessions``;
- **co-occurrence and session**: ``cooc``, ``line`` (product line share), ``intent`` (the
  session's weight on the item's category), ``basket`` (personal co-occurrence),
  ``session_items``;
- **peers**: ``peers`` (how strongly the user's most similar shoppers buy the item:
  ``RankingSignals.peers_of``; 0 outside the user's peer items, NaN for an unknown user);
- **EASE**: ``ease`` (the user's EASE score of the item, ``RankingSignals.ease_of``; 0 outside
  the user's best EASE items, NaN for an unknown user);
- **popularity**: ``pop`` (log, decayed), ``pop_trend`` (last 7 days vs last 28), ``repeat_rate``;
- **context**: ``context`` (department lift at the request's weekday × hour, plus the holiday
  lift, plus the device's and the region's lift where the training events carry ``device`` /
  ``region`` columns: :meth:`graph.ranking.ContextSignal.department_lift`), ``hour``,
  ``weekday``, ``holiday`` (no data set we ship has device or region, so there the lift is
  time and holiday only);
- **item**: ``department`` (its index, split like a number), ``price``, ``price_band`` (price
  percentile inside the item's category), ``brand_pop``;
- **query** (:mod:`graph.search`): ``query_lex`` (BM25 over the query's best), ``query_sem``
  (cosine of the query's and the item's text vectors), ``query_rrf`` (their reciprocal-rank
  fusion), and the same three for the session's latest search (``session_query_*``); NaN
  without one;
- **candidate sources**: ``src_<source>`` for each of :data:`graph.retrieval.SOURCES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from graph import schema as S
from graph.kernels import history_of
from graph.ranking import ContextSignal, Ranker, SessionSignal
from graph.retrieval import SOURCES, CandidateSet, Catalogue
from graph.search import QueryScores
from graph.signals import RankingSignals, to_unix_seconds

DAY_S = 86400.0
# Columns are only ever appended (a model version keeps its item_features.npy; an older one,
# with fewer columns, is padded with NaN when loaded: graph.artifacts.read_artifact).
ITEM_FEATURES: tuple[str, ...] = ("pop_trend", "repeat_rate", "price", "price_band", "brand_pop",
                                  "new_buyers", "new_share")
# Days before the signals' reference time in which a first purchase counts as adoption
# (``new_buyers``, ``new_share``, ``explore``).
ADOPTION_DAYS = 28.0
USE_EASE = True  # read at call time (bench/ranker_holdout.py --set turns it off)
FEATURES: tuple[str, ...] = (
    "gnn", "session", "sess_sim_max", "sess_sim_mean",
    "repeat", "hist_count", "days_since_last", "interval_days", "due", "user_sessions",
    "explore", "one_off",
    "cooc", "line", "intent", "basket", "session_items",
    "pop", "pop_trend", "repeat_rate", "new_buyers", "new_share",
    "peers", "ease",
    "context", "hour", "weekday", "holiday",
    "department", "price", "price_band", "brand_pop",
    "query_lex", "query_sem", "query_rrf",
    "session_query_lex", "session_query_sem", "session_query_rrf",
    *(f"src_{s}" for s in SOURCES),
)
# The reason component of each feature (actors/explain.py has a sentence per component).
COMPONENT_OF: dict[str, str] = {
    "gnn": "gnn", "src_ann_user": "gnn",
    "session": "session", "sess_sim_max": "session", "sess_sim_mean": "session",
    "src_ann_sess": "session",
    "repeat": "repeat", "hist_count": "repeat", "days_since_last": "repeat",
    "interval_days": "repeat", "due": "repeat", "user_sessions": "repeat", "src_buy_again": "repeat",
    "explore": "explore", "one_off": "explore",
    "cooc": "cooc", "src_cooc": "cooc", "line": "line", "intent": "intent", "src_intent": "intent",
    "session_items": "intent", "basket": "basket",
    "pop": "pop", "pop_trend": "pop", "repeat_rate": "pop", "src_popular": "pop",
    "new_buyers": "pop", "new_share": "pop",
    "peers": "peers", "src_peers": "peers",
    "ease": "ease", "src_ease": "ease",
    "context": "context", "hour": "context", "weekday": "context", "holiday": "context",
    "src_context": "context",
    "department": "item", "price": "item", "price_band": "item", "brand_pop": "item",
    "query_lex": "query", "query_sem": "query", "query_rrf": "query",
    "session_query_lex": "query", "session_query_sem": "query", "session_query_rrf": "query",
    "src_query": "query",
}
assert set(COMPONENT_OF) == set(FEATURES), set(FEATURES) ^ set(COMPONENT_OF)
# The source flags are the last columns, in SOURCES order (build_features writes them as one block).
_SOURCE_COLUMNS = len(FEATURES) - len(SOURCES)
assert FEATURES[_SOURCE_COLUMNS:] == tuple(f"src_{s}" for s in SOURCES)


def item_features(train_events: pd.DataFrame, items: pd.DataFrame, ranker: Ranker) -> np.ndarray:
    """Per-item features fitted on training events (:data:`ITEM_FEATURES` order).

    ``pop_trend`` compares the item's purchases of the last 7 days before the signals' reference
    time with a quarter of those of the last 28 (log ratio, smoothed); ``price_band`` is the
    price's percentile among items of the same category; ``brand_pop`` the log of the brand's
    decayed purchases (NaN without a brand column).

    Shapes:
        - return ``[I, len(ITEM_FEATURES)]`` float32 (NaN = unknown).
    """
    sig = ranker.signals
    n = sig.num_items
    ev = train_events[train_events[S.ITEM_COL].notna()]
    ev = ev[ev[S.EVENT_COL].map(S.EVENT_WEIGHTS).fillna(0.0) > 0]
    idx = pd.Index(items[S.ITEM_COL].astype(str)).get_indexer(pd.Index(ev[S.ITEM_COL].astype(str)))
    age = sig.now - to_unix_seconds(ev[S.TS_COL])
    ok = idx >= 0
    last7 = np.bincount(idx[ok & (age <= 7 * DAY_S)], minlength=n).astype(np.float64)
    last28 = np.bincount(idx[ok & (age <= 28 * DAY_S)], minlength=n).astype(np.float64)
    trend = np.log1p(last7) - np.log1p(last28 / 4.0)
    price = (items[S.PRICE_COL].astype("float64").to_numpy() if S.PRICE_COL in items
             else np.full(n, np.nan))
    band = (pd.Series(price).groupby(np.asarray(sig.item_category)).rank(pct=True)
            .to_numpy(dtype=np.float64))
    if S.BRAND_COL in items:
        brand = items[S.BRAND_COL].astype(str).to_numpy()
        totals = pd.Series(sig.popularity.astype(np.float64)).groupby(brand).transform("sum")
        brand_pop = np.log1p(totals.to_numpy(dtype=np.float64))
    else:
        brand_pop = np.full(n, np.nan)
    new_buyers, new_share = _adoption(sig)
    out = np.stack([trend, sig.item_repeat_rate.astype(np.float64), price, band, brand_pop,
                    new_buyers, new_share], axis=1)
    return out.astype(np.float32)


def _adoption(sig: RankingSignals) -> tuple[np.ndarray, np.ndarray]:
    """How many shoppers took an item up lately: the log of the users whose first purchase of
    it fell in the last :data:`ADOPTION_DAYS` before the signals' reference time
    (``new_buyers``), and their share of that period's buyers of it (``new_share``, NaN for an
    item nobody bought in it). A seasonal or newly launched item has many new buyers; a staple
    of the same popularity has few (its buyers come back)."""
    n = sig.num_items
    since = sig.now - ADOPTION_DAYS * DAY_S
    first = np.bincount(sig.hist_indices[sig.hist_first >= since], minlength=n).astype(np.float64)
    recent = np.bincount(sig.hist_indices[sig.hist_last >= since], minlength=n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(recent > 0, first / recent, np.nan)
    return np.log1p(first), share


@dataclass(frozen=True)
class FeatureRequest:
    """What the features of one request depend on.

    Args:
        user: The user's row (None: unknown or forgotten).
        session: The session signal (None or empty: no session).
        context: The request's context (None: unknown).
        now: Request time, unix seconds.
        query: Search scores of the request's search text (None: no search).
        session_query: Search scores of the session's latest search.
    """

    user: int | None
    session: SessionSignal | None
    context: ContextSignal | None
    now: float
    query: QueryScores | None = None
    session_query: QueryScores | None = None


def build_features(
    ranker: Ranker, cat: Catalogue, item_static: np.ndarray, req: FeatureRequest,
    cand: CandidateSet, item_unit: np.ndarray,
) -> np.ndarray:
    """The feature matrix of one request's candidates.

    Args:
        ranker: Embeddings and signals of the model version.
        cat: Its catalogue (search index).
        item_static: :func:`item_features` of the version.
        req: The request.
        cand: Its candidates.
        item_unit: The ranker's item embeddings scaled to unit length.

    Shapes:
        - return ``[len(cand), len(FEATURES)]`` float32 in :data:`FEATURES` order.
    """
    items = cand.items
    n = len(items)
    col: dict[str, np.ndarray | float] = {}
    comps = ranker.components([req.user], [req.session], [req.context], candidates=items)
    for c, v in comps.items():
        col[c] = v[0]
    s = req.session
    if s is not None and not s.is_empty:
        sims = item_unit[items] @ item_unit[s.items].T  # [n, m]
        w = np.maximum(s.weights, 0.0)
        col["sess_sim_max"] = sims.max(axis=1)
        col["sess_sim_mean"] = sims @ w / max(float(w.sum()), 1e-12)
        col["session_items"] = float(len(s.items))
    else:
        col["sess_sim_max"] = col["sess_sim_mean"] = np.nan
        col["session_items"] = 0.0
    _repeat_stats(ranker, req, items, col)
    col["peers"] = _peer_scores(ranker, req.user, items)
    col["ease"] = _ease_scores(ranker, req.user, items) if USE_EASE else np.nan
    static = item_static[items]  # one gather of the candidates' rows, then its columns
    for j, name in enumerate(ITEM_FEATURES):
        col[name] = static[:, j]
    ctx = req.context
    col["hour"] = np.nan if ctx is None else float(ctx.hour)
    col["weekday"] = np.nan if ctx is None else float(ctx.weekday)
    col["holiday"] = np.nan if ctx is None else float(ctx.is_holiday)
    col["department"] = ranker.signals.item_department[items].astype(np.float32)
    for prefix, qs in (("query", req.query), ("session_query", req.session_query)):
        col[f"{prefix}_lex"] = np.nan if qs is None else qs.lexical_of(items)
        col[f"{prefix}_sem"] = np.nan if qs is None else qs.semantic_of(items)
        col[f"{prefix}_rrf"] = np.nan if qs is None else qs.fused_of(items)
    out = np.empty((n, len(FEATURES)), dtype=np.float32)
    for j, name in enumerate(FEATURES[:_SOURCE_COLUMNS]):
        out[:, j] = col[name]
    out[:, _SOURCE_COLUMNS:] = cand.sources  # the source flags, 1.0 / 0.0, in one block
    return out


def _peer_scores(ranker: Ranker, user: int | None, items: np.ndarray) -> np.ndarray | float:
    """The user's peer score of each item (0 outside the user's peer items; NaN: unknown user)."""
    return np.nan if user is None else _row_lookup(*ranker.signals.peers_of(user), items)


def _ease_scores(ranker: Ranker, user: int | None, items: np.ndarray) -> np.ndarray | float:
    """The user's EASE score of each item (0 outside the user's best EASE items; NaN: unknown
    user)."""
    return np.nan if user is None else _row_lookup(*ranker.signals.ease_of(user), items)


def _row_lookup(row: np.ndarray, score: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``score`` of each of ``items`` in a sorted row of item indices, 0 where it is absent."""
    out = np.zeros(len(items), dtype=np.float32)
    if len(row):
        pos = np.minimum(np.searchsorted(row, items), len(row) - 1)
        hit = row[pos] == items
        out[hit] = score[pos[hit]]
    return out


def _repeat_stats(ranker: Ranker, req: FeatureRequest, items: np.ndarray,
                  col: dict[str, np.ndarray | float]) -> None:
    """The user's purchase history of each candidate (NaN where the user never bought it)."""
    sig = ranker.signals
    if req.user is not None:
        lo, hi = int(sig.hist_indptr[req.user]), int(sig.hist_indptr[req.user + 1])
        row = sig.hist_indices[lo:hi]  # sorted: the history CSR is built from a sorted groupby
        count, since, interval = history_of(row, lo, sig.hist_count, sig.hist_first,
                                            sig.hist_last, items, req.now, DAY_S)
        col["user_sessions"] = float(sig.user_sessions[req.user])
        col["explore"], col["one_off"] = _exploration(sig, lo, hi)
    else:  # no history: never bought, so count 0 and no timing
        count, since, interval = history_of(sig.hist_indices[:0], 0, sig.hist_count,
                                            sig.hist_first, sig.hist_last, items, req.now, DAY_S)
        col["user_sessions"] = 0.0
        col["explore"] = col["one_off"] = np.nan
    col["hist_count"] = count
    col["days_since_last"] = since
    col["interval_days"] = interval
    with np.errstate(invalid="ignore", divide="ignore"):
        col["due"] = since / np.maximum(interval, 0.5)


def _exploration(sig: RankingSignals, lo: int, hi: int) -> tuple[float, float]:
    """How much a shopper tries new items, from their history rows ``lo:hi``: the share of the
    items they bought in the last :data:`ADOPTION_DAYS` before the signals' reference time that
    they had never bought before (``explore``), and the share of all their items bought only
    once (``one_off``); NaN without such items. Some households buy the same list every week,
    others try something new in each basket; the ranker weighs repeat and new candidates by it.
    """
    if hi <= lo:
        return np.nan, np.nan
    since = sig.now - ADOPTION_DAYS * DAY_S
    recent = sig.hist_last[lo:hi] >= since
    n_recent = int(recent.sum())
    explore = (float((sig.hist_first[lo:hi][recent] >= since).sum()) / n_recent if n_recent
               else np.nan)
    return explore, float((sig.hist_count[lo:hi] == 1).mean())
