"""The offline protocol of SPEC.md: four tasks, three baselines and intentrec, one table.

Tasks (built from events after the cut; signals and embeddings only ever saw events before it):

- ``next_basket_all``: every test user with training purchases; relevant = the distinct items they
  buy after the cut; no exclusion.
- ``next_basket_discovery``: relevant = those items the user never bought before the cut; the
  user's previously bought items are excluded from every model's ranking.
- ``in_session``: every test basket (session) with at least 4 distinct purchased items; a seeded
  random half (``n // 2`` items) is revealed as ``add_to_cart`` events at the basket's timestamp,
  the rest is relevant; revealed items are excluded for every model; the context is the basket's
  timestamp.
- ``in_session_blind``: the same baskets, exclusions and targets with the session signal off.

Every model ranks the whole catalogue (no sampled negatives) through the same
``graph.ranking.top_k_from_scores`` path. Baselines:

- ``popularity``: recency-decayed global purchase counts.
- ``buy_again``: the user's own purchase frequency (sessions holding the item), ties broken by the
  most recent purchase, backfilled by popularity.
- ``itemknn``: sum of item–item co-occurrence similarities (``signals.item_sim``) with the user's
  purchase history weighted by frequency (normalised to sum 1) plus, in ``in_session``, the
  revealed items (normalised to sum 1); backfilled by popularity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from graph import schema as S
from graph.fusion import QueryBatch, fit_weights
from graph.interactions import Interactions
from graph.metrics import summarize
from graph.ranking import (
    ContextSignal,
    Ranker,
    SessionSignal,
    session_signal,
    top_k_from_scores,
)
from graph.signals import FusionWeights, RankingSignals, to_unix_seconds

log = logging.getLogger(__name__)
MIN_BASKET = 4
Progress = Callable[[str], None]
ScoreFn = Callable[[slice], np.ndarray]


def _bought(events: pd.DataFrame, inter: Interactions) -> pd.DataFrame:
    """Purchases (or, for data without any, positive item events) as (u, i, session, ts) codes.

    ``u`` is -1 for users outside ``inter.user_ids``; items outside the catalogue are dropped.
    """
    ev = events[events[S.ITEM_COL].notna()]
    if (ev[S.EVENT_COL] == S.PURCHASE).any():
        ev = ev[ev[S.EVENT_COL] == S.PURCHASE]
    else:
        ev = ev[ev[S.EVENT_COL].map(S.EVENT_WEIGHTS).fillna(0.0) > 0]
    out = pd.DataFrame({
        "u": pd.Index(inter.user_ids).get_indexer(ev[S.USER_COL].astype(str)),
        "i": pd.Index(inter.item_ids).get_indexer(ev[S.ITEM_COL].astype(str)),
        "s": ev[S.SESSION_COL].astype(str).to_numpy(),
        "ts": ev[S.TS_COL].to_numpy(),
    })
    return out[out["i"] >= 0]


def _item_sets(df: pd.DataFrame, key: str) -> dict[Any, np.ndarray]:
    return {k: np.unique(g.to_numpy()) for k, g in df.groupby(key, sort=True)["i"]}


def next_basket_tasks(
    train_events: pd.DataFrame,
    test_events: pd.DataFrame,
    inter: Interactions,
    *,
    seed: int = 0,
    max_users: int | None = None,
) -> tuple[QueryBatch, QueryBatch]:
    """``next_basket_all`` and ``next_basket_discovery`` queries.

    Users: those with purchases both before (in ``train_events`` and ``inter``) and after the cut;
    a seeded sample of ``max_users`` of them when given (the same for every model).
    """
    history = _item_sets(_bought(train_events, inter).query("u >= 0"), "u")
    future = _item_sets(_bought(test_events, inter).query("u >= 0"), "u")
    users = np.array(sorted(u for u in future if u in history), dtype=np.int64)
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    b = len(users)
    nb_all = QueryBatch("next_basket_all", users, [None] * b, [None] * b, [None] * b,
                        [future[u] for u in users])
    disc_users: list[int] = []
    disc_ex: list[np.ndarray | None] = []
    disc_t: list[np.ndarray] = []
    for u in users:
        new = np.setdiff1d(future[u], history[u])
        if len(new):
            disc_users.append(u)
            disc_ex.append(history[u])
            disc_t.append(new)
    d = len(disc_users)
    nb_disc = QueryBatch("next_basket_discovery", np.array(disc_users, dtype=np.int64),
                         [None] * d, [None] * d, disc_ex, disc_t)
    return nb_all, nb_disc


def in_session_tasks(
    test_events: pd.DataFrame,
    inter: Interactions,
    *,
    country: str = "US",
    seed: int = 0,
    max_baskets: int | None = None,
) -> tuple[QueryBatch, QueryBatch]:
    """``in_session`` and ``in_session_blind`` queries over baskets of >= 4 distinct items.

    Baskets are taken in session-id order; a seeded sample of ``max_baskets`` when given; each
    basket's items are shuffled by the same seeded generator and the first ``n // 2`` revealed.
    """
    bought = _bought(test_events, inter)
    meta = bought.groupby("s", sort=True).agg(u=("u", "first"), ts=("ts", "max"))
    items = _item_sets(bought, "s")
    keep = np.array([len(items[s]) >= MIN_BASKET for s in meta.index], dtype=bool)
    meta = meta[keep]
    rng = np.random.default_rng(seed)
    if max_baskets is not None and len(meta) > max_baskets:
        meta = meta.iloc[np.sort(rng.choice(len(meta), max_baskets, replace=False))]
    sessions: list[SessionSignal | None] = []
    contexts: list[ContextSignal | None] = []
    exclude: list[np.ndarray | None] = []
    targets: list[np.ndarray] = []
    for s, ts in zip(meta.index, pd.to_datetime(meta["ts"]), strict=True):
        its = rng.permutation(items[s])
        half = len(its) // 2
        now = to_unix_seconds(ts)
        sessions.append(session_signal([(int(i), S.ADD_TO_CART, now) for i in its[:half]], now))
        contexts.append(ContextSignal.from_timestamp(ts, country))
        exclude.append(np.sort(its[:half]))
        targets.append(np.sort(its[half:]))
    u = meta["u"].to_numpy(dtype=np.int64)
    n = len(meta)
    ins = QueryBatch("in_session", u, sessions, contexts, exclude, targets)
    blind = QueryBatch("in_session_blind", u, [None] * n, list(contexts), list(exclude), targets)
    return ins, blind


# ------------------------------------------------------------------------------ baselines
def _pop_norm(signals: RankingSignals) -> np.ndarray:
    p = np.log1p(np.maximum(signals.popularity.astype(np.float64), 0.0))
    return (p / max(p.max(), 1e-12)).astype(np.float32)


def _history_rows(signals: RankingSignals, users: np.ndarray, data: np.ndarray) -> sp.csr_matrix:
    """Rows of a user-history matrix (``data`` aligned with the CSR pattern); unknown = empty."""
    m = sp.csr_matrix((data, signals.hist_indices, signals.hist_indptr),
                      shape=(signals.num_users, signals.num_items))
    out = sp.csr_matrix((len(users), signals.num_items), dtype=np.float32)
    known = np.flatnonzero(users >= 0)
    if len(known):
        sel = sp.csr_matrix((np.ones(len(known)), (known, users[known])),
                            shape=(len(users), signals.num_users))
        out = sp.csr_matrix(sel @ m)
    return out


def popularity_scores(signals: RankingSignals, q: QueryBatch) -> ScoreFn:
    """Baseline ``popularity``: the same decayed popularity for every request."""
    pop = _pop_norm(signals)
    return lambda sl: np.broadcast_to(pop, (len(q.users[sl]), len(pop))).copy()


def buy_again_scores(signals: RankingSignals, q: QueryBatch) -> ScoreFn:
    """Baseline ``buy_again``: purchase count, then recency, then popularity."""
    pop = _pop_norm(signals)
    # Tie-breaks stay below 1, so they never override a difference of one purchase.
    recency = 0.5 / (1.0 + np.maximum(signals.now - signals.hist_last, 0.0) / 86400.0 / 30.0)
    data = (signals.hist_count + recency).astype(np.float32)

    def fn(sl: slice) -> np.ndarray:
        return _history_rows(signals, q.users[sl], data).toarray() + 1e-3 * pop
    return fn


def itemknn_scores(signals: RankingSignals, q: QueryBatch) -> ScoreFn:
    """Baseline ``itemknn``: co-occurrence with the purchase history (+ the session items)."""
    pop = _pop_norm(signals)
    rowsum = np.add.reduceat(signals.hist_count, signals.hist_indptr[:-1]) if len(
        signals.hist_count) else np.zeros(0)
    rowsum = np.where(np.diff(signals.hist_indptr) > 0, rowsum, 1.0)
    per_user = np.repeat(rowsum, np.diff(signals.hist_indptr))
    data = (signals.hist_count / np.maximum(per_user, 1e-12)).astype(np.float32)

    def fn(sl: slice) -> np.ndarray:
        profile = _history_rows(signals, q.users[sl], data)
        rows, cols, vals = [], [], []
        for r, s in enumerate(q.sessions[sl]):
            if s is not None and not s.is_empty:
                w = np.maximum(s.weights.astype(np.float64), 0.0)
                rows.append(np.full(len(w), r))
                cols.append(s.items)
                vals.append(w / max(w.sum(), 1e-12))
        if rows:
            profile = profile + sp.csr_matrix(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                shape=profile.shape,
            )
        return np.asarray((profile @ signals.item_sim).toarray(), dtype=np.float32) + 1e-6 * pop
    return fn


def ranker_scores(ranker: Ranker, q: QueryBatch, weights: FusionWeights | None = None) -> ScoreFn:
    """``intentrec``: the Ranker's fused score (optionally with other fusion weights)."""
    return lambda sl: ranker.score(q.users[sl], q.sessions[sl], q.contexts[sl], weights=weights)


def run_queries(fn: ScoreFn, q: QueryBatch, k: int, chunk: int) -> np.ndarray:
    """Rank the whole catalogue for every request, in chunks. Shapes: return ``[B, k]``."""
    out = [
        top_k_from_scores(fn(slice(s, s + chunk)), k, q.exclude[s: s + chunk])[0]
        for s in range(0, len(q), chunk)
    ]
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def evaluate(
    train_events: pd.DataFrame,
    test_events: pd.DataFrame,
    inter: Interactions,
    signals: RankingSignals,
    ranker: Ranker,
    *,
    seed: int = 0,
    max_users: int | None = None,
    max_baskets: int | None = None,
    progress: Progress | None = None,
    variants: Mapping[str, FusionWeights] | None = None,
    k: int = S.TOP_K,
) -> dict[str, dict[str, dict[str, float]]]:
    """Run the protocol; see the module docstring.

    Args:
        train_events: Events before the cut (only used for users' purchase histories).
        test_events: Events at or after the cut (only used for targets and revealed items).
        inter: The indexing of ``signals`` and of the ranker's embeddings.
        signals: Signals fitted on ``train_events`` only.
        ranker: The intentrec Ranker (built on ``signals``).
        seed: Seed of the reveal order and of any subsample.
        max_users: Subsample of next-basket users (default: all).
        max_baskets: Subsample of in-session baskets (default: all).
        progress: Called with one line per task (default: the module logger).
        variants: Extra rows ranked by the same Ranker with other fusion weights (ablations,
            e.g. the GNN alone); shown above ``intentrec``.
        k: Cut-off of the metrics.

    Returns:
        ``{model: {task: {"recall@k", "ndcg@k", "hit@k", "n"}}}`` where ``n`` is the number of
        requests the task scored.
    """
    say = progress or log.info
    t0 = time.perf_counter()
    nb_all, nb_disc = next_basket_tasks(train_events, test_events, inter, seed=seed,
                                        max_users=max_users)
    ins, blind = in_session_tasks(test_events, inter, country=signals.params.country, seed=seed,
                                  max_baskets=max_baskets)
    say(f"evaluate: {len(nb_all)} next-basket users ({len(nb_disc)} with new items), "
        f"{len(ins)} in-session baskets; tasks built in {time.perf_counter() - t0:.1f}s")
    models: dict[str, Callable[[QueryBatch], ScoreFn]] = {
        "popularity": lambda q: popularity_scores(signals, q),
        "buy_again": lambda q: buy_again_scores(signals, q),
        "itemknn": lambda q: itemknn_scores(signals, q),
    }
    for name, w in (variants or {}).items():
        models[name] = lambda q, w=w: ranker_scores(ranker, q, w)  # type: ignore[misc]
    models["intentrec"] = lambda q: ranker_scores(ranker, q)
    results: dict[str, dict[str, dict[str, float]]] = {m: {} for m in models}
    for q in (nb_all, nb_disc, ins, blind):
        t = time.perf_counter()
        for name, make in models.items():
            if len(q) == 0:
                results[name][q.name] = {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"),
                                         f"hit@{k}": float("nan"), "n": 0.0}
                continue
            ranked = run_queries(make(q), q, k, ranker.chunk_size)
            results[name][q.name] = {**summarize(ranked, q.targets, k), "n": float(len(q))}
        r = {m: results[m][q.name].get(f"recall@{k}", float("nan")) for m in models}
        say(f"evaluate {q.name}: {len(q)} requests in {time.perf_counter() - t:.1f}s; recall@{k} "
            + ", ".join(f"{m} {v:.4f}" for m, v in r.items()))
    say(f"evaluate: done in {time.perf_counter() - t0:.1f}s")
    return results


def fit_validation_weights(
    ranker: Ranker,
    train_events: pd.DataFrame,
    val_events: pd.DataFrame,
    inter: Interactions,
    *,
    seed: int = 0,
    max_users: int | None = 1000,
    max_baskets: int | None = 2000,
    progress: Progress | None = None,
) -> FusionWeights:
    """Fit the fusion weights on a validation window with the tasks of the protocol.

    ``no_session`` weights maximise the mean recall@20 of validation ``next_basket_all``,
    ``next_basket_discovery`` and ``in_session_blind``; ``session`` weights that of validation
    ``in_session`` (``graph.fusion.fit_weights``).

    Args:
        ranker: Ranker on embeddings and signals fitted on ``train_events`` only.
        train_events: Events before the validation cut.
        val_events: Events in the validation window (after the validation cut, before the test
            cut). Never the test window.
        inter: The indexing of the ranker's signals and embeddings.
        seed, max_users, max_baskets: Seeded subsample of validation queries (runtime).
        progress: Called with one line per mode.

    Returns:
        The fitted ``FusionWeights``; set them as ``weights`` of the signals refitted on all
        training events.
    """
    nb_all, nb_disc = next_basket_tasks(train_events, val_events, inter, seed=seed,
                                        max_users=max_users)
    ins, blind = in_session_tasks(val_events, inter, country=ranker.signals.params.country,
                                  seed=seed, max_baskets=max_baskets)
    lo, hi = val_events[S.TS_COL].min(), val_events[S.TS_COL].max()
    return fit_weights(
        ranker, [nb_all, nb_disc, blind], [ins],
        fitted_on=f"validation {lo:%Y-%m-%d}..{hi:%Y-%m-%d}: {len(nb_all)} users, "
                  f"{len(ins)} baskets (seed {seed})",
        progress=progress,
    )


# ------------------------------------------------------------------------------- table
def format_table(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Models as rows (intentrec last), task × metric columns, ``*`` marks each column's best.

    The header names each task with its number of requests ``n``.
    """
    models = [m for m in metrics if m != "intentrec"] + (
        ["intentrec"] if "intentrec" in metrics else [])
    tasks = [t for t in S.TASKS if any(t in metrics[m] for m in models)]
    tasks += sorted({t for m in models for t in metrics[m]} - set(tasks))
    names = [x for x in S.METRICS if any(x in metrics[m].get(t, {}) for m in models for t in tasks)]
    width = max([len(m) for m in models] + [5])
    col = max([len(x) for x in names] + [8])

    def value(m: str, t: str, x: str) -> float:
        return float(metrics[m].get(t, {}).get(x, float("nan")))

    best = {(t, x): max((v for m in models if not np.isnan(v := value(m, t, x))), default=None)
            for t in tasks for x in names}
    titles = {t: f"{t} (n={max(int(metrics[m].get(t, {}).get('n', 0)) for m in models)})"
              for t in tasks}
    block = {t: max(len(titles[t]), len(names) * (col + 1) - 1) for t in tasks}
    head1 = " " * width + " |" + "".join(f" {titles[t].center(block[t])} |" for t in tasks)
    head2 = "model".ljust(width) + " |" + "".join(
        f" {' '.join(x.rjust(col) for x in names).ljust(block[t])} |" for t in tasks)
    lines = [head1, head2, "-" * len(head2)]
    for m in models:
        row = m.ljust(width) + " |"
        for t in tasks:
            cells = []
            for x in names:
                v = value(m, t, x)
                mark = "*" if not np.isnan(v) and v == best[(t, x)] else " "
                cells.append(f"{v:.4f}{mark}".rjust(col + 1) if not np.isnan(v)
                             else "- ".rjust(col + 1))
            row += f" {''.join(cells)[1:].ljust(block[t])} |"
        lines.append(row)
    lines.append("recall = hits / |relevant|; ndcg: binary relevance, ideal DCG over "
                 "min(|relevant|, k); * = best in column")
    return "\n".join(lines)
