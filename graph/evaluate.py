"""The offline protocol of SPEC.md: four tasks, three baselines, intentrec and its ablations.

Tasks: :mod:`graph.tasks` (built from events after the cut; signals and embeddings only ever saw
events before it). The ``search`` task and its baselines are in :mod:`graph.search_eval`
(``metrics["search"]``).

intentrec is ranked by :class:`graph.recommend.Recommender`: the same candidate generation,
features, LightGBM ranker and top-k as serving, request by request. Its ablations
(``intentrec_no_gnn``, ``intentrec_no_session``, ``intentrec_no_context``) rank the same
candidates with rankers fitted without those features and candidate sources, next to intentrec,
on a seeded sample of each task (prediction costs one LightGBM pass per ranker). For each task the
report also gives the **candidate recall**: the share of relevant items that candidate generation
put in front of the ranker (an upper bound of its recall), overall and per source.

``published`` (:func:`evaluate_version`, for ``train_job.py --require-no-regression``): the
version serving, asked the same requests in its own ids and judged against the same targets.

Baselines rank the whole catalogue (no sampled negatives) through
``graph.ranking.top_k_from_scores``:

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from graph import schema as S
from graph.interactions import Interactions
from graph.ltr import LearnedRanker
from graph.metrics import cluster_bootstrap, recall_at_k, summarize
from graph.parallel import Call, RankingPool, rank_chunk, run_calls
from graph.ranking import top_k_from_scores
from graph.recommend import Recommender
from graph.retrieval import SOURCES
from graph.signals import RankingSignals
from graph.tasks import QueryBatch, in_session_tasks, next_basket_tasks, search_task

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
ScoreFn = Callable[[slice], np.ndarray]
CHUNK = 256
BATCH = 256
ABLATION_REQUESTS = 1000
ABLATIONS_KEY = "ablations"
UNCERTAINTY_KEY = "uncertainty"
# Top-level blocks of metrics.json that are not a model's row of the main table.
SEGMENTS_KEY = "segments"
ANONYMOUS_KEY = "anonymous"
NON_MODEL_KEYS = frozenset({ABLATIONS_KEY, UNCERTAINTY_KEY, SEGMENTS_KEY, ANONYMOUS_KEY, "search",
                            "cold_items"})
# In-session baskets asked again without their shopper (anonymous_tasks), per task.
ANONYMOUS_REQUESTS = 2000
# The row of the version LATEST named when the run started, on this run's tasks
# (evaluate_version; train_job.py --require-no-regression).
PUBLISHED = "published"
BOOTSTRAP_SAMPLES = 1000


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


BASELINES: dict[str, Callable[[RankingSignals, QueryBatch], ScoreFn]] = {
    "popularity": popularity_scores, "buy_again": buy_again_scores, "itemknn": itemknn_scores,
}


def run_queries(fn: ScoreFn, q: QueryBatch, k: int, chunk: int = CHUNK) -> np.ndarray:
    """Rank the whole catalogue for every request, in chunks. Shapes: return ``[B, k]``."""
    out = [
        top_k_from_scores(fn(slice(s, s + chunk)), k, q.exclude[s: s + chunk])[0]
        for s in range(0, len(q), chunk)
    ]
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


PROGRESS_EVERY_S = 10.0


def progress_bar(done: int, total: int, elapsed_s: float, width: int = 24) -> str:
    """One progress line for a long loop, the evaluation's counterpart of the training's epoch
    lines: ``[#########---------------]  1,536/4,096 requests  38%  12s, about 19s left``."""
    frac = done / total if total else 1.0
    filled = round(width * frac)
    left = elapsed_s * (1 - frac) / frac if frac > 0 else float("nan")
    eta = f", about {left:.0f}s left" if frac < 1 and left == left else ""
    return (f"[{'#' * filled}{'-' * (width - filled)}]  {done:,}/{total:,} requests  "
            f"{100 * frac:.0f}%  {elapsed_s:.0f}s{eta}")


def recommender_rankings(
    rec: Recommender, q: QueryBatch, rankers: Mapping[str, LearnedRanker], k: int,
    progress: Progress | None = None, batch: int = BATCH, pool: RankingPool | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Rank every request of ``q`` with :meth:`Recommender.prepare`, :meth:`Recommender.score`
    and :meth:`Recommender.select` for each ranker (:func:`graph.parallel.rank_chunk`: a
    request's candidates and features are computed once; ``batch`` requests share one prediction
    call per ranker), in this process or, with a ``pool``, on its Ray actors (the same rankings).

    Returns:
        ``({name: [B, k] item indices padded with -1}, candidate report)``; the report holds
        ``candidate_recall`` (relevant items among the candidates / relevant items, averaged over
        requests), ``candidates`` (mean count), ``source_recall`` per source and
        ``contributions``: what ranked the first ranker's top ``k``, per reason component
        (:attr:`graph.ltr.LearnedRanker.components`), from each recommended item's TreeSHAP
        contribution minus its request's mean over the finalists (the candidates every tree
        scored; :func:`graph.parallel.component_lift`): ``share``, the component's part of the
        absolute total, and ``mean``, the signed lift per recommended item (raw score units).
    """
    ranked, report, _ = task_rankings(rec, q, rankers, k, progress=progress, batch=batch,
                                      pool=pool)
    return ranked, report


def baseline_chunk(rec: Recommender, rankers: Mapping[str, LearnedRanker], names: Sequence[str],
                   q: QueryBatch, k: int) -> dict[str, np.ndarray]:
    """The top ``k`` of the named baselines (:data:`BASELINES`) for a chunk of requests (a
    :data:`graph.parallel.Call`; ``rankers`` is not used)."""
    return {n: run_queries(BASELINES[n](rec.ranker.signals, q), q, k) for n in names}


def task_rankings(
    rec: Recommender, q: QueryBatch, rankers: Mapping[str, LearnedRanker], k: int, *,
    baselines: Sequence[str] = (), baseline_fn: Callable[..., dict[str, np.ndarray]] = baseline_chunk,
    progress: Progress | None = None, batch: int = BATCH, pool: RankingPool | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """:func:`recommender_rankings` and the named baselines' top ``k`` (``baseline_fn``, chunk
    by chunk) of one task, all as calls of one :func:`graph.parallel.run_calls`, so that a pool
    keeps every CPU busy until the task is done.

    Returns:
        ``(rankings, candidate report, {baseline: [B, k]})``.
    """
    out = {name: np.full((len(q), k), -1, dtype=np.int64) for name in rankers}
    base = {name: np.full((len(q), k), -1, dtype=np.int64) for name in baselines}
    recall = np.zeros(len(q))
    count = np.zeros(len(q))
    per_source = np.zeros((len(q), len(SOURCES)))
    first = next(iter(rankers), None)
    components = rankers[first].components if first is not None else ()
    # Per chunk, summed in chunk order after the loop: a pool answers in any order, and the
    # metrics must not depend on it to the last bit.
    chunk_lift: dict[int, tuple[np.ndarray, int]] = {}
    t0 = last = time.perf_counter()
    requests = q.requests(k)
    starts = list(range(0, len(q), batch))
    calls: list[Call] = [(rank_chunk, (requests[s: s + batch], q.targets[s: s + batch], k))
                         for s in starts]
    if baselines:
        calls += [(baseline_fn, (tuple(baselines), q.take(np.arange(s, min(s + batch, len(q)))), k))
                  for s in starts]
    done = 0
    for i, res in run_calls(rec, calls, rankers, pool):
        sl = slice(starts[i % len(starts)], starts[i % len(starts)] + batch)
        if i >= len(starts):
            for name, top in res.items():
                base[name][sl] = top
            continue
        recall[sl], count[sl], per_source[sl] = res.recall, res.count, res.per_source
        if first is not None:
            chunk_lift[i] = (res.contributions[first], res.explained[first])
        for name, top in res.top.items():
            out[name][sl] = top
        done += len(res.recall)
        if progress is not None and time.perf_counter() - last > PROGRESS_EVERY_S:
            last = time.perf_counter()
            progress(f"evaluate {q.name}: " + progress_bar(done, len(q), last - t0))
    evidence, explained = np.zeros((2, len(components))), 0
    for i in sorted(chunk_lift):
        evidence += chunk_lift[i][0]
        explained += chunk_lift[i][1]
    report = {"candidate_recall": float(recall.mean()) if len(q) else float("nan"),
              "candidates": float(count.mean()) if len(q) else float("nan"),
              "source_recall": {s: float(per_source[:, j].mean()) if len(q) else float("nan")
                                for j, s in enumerate(SOURCES)},
              "contributions": contribution_report(components, evidence, explained)}
    return out, report, base


def contribution_report(components: Sequence[str], evidence: np.ndarray, explained: int
                        ) -> dict[str, dict[str, float]]:
    """``{component: {"share", "mean"}}`` from the summed absolute (``evidence[0]``) and signed
    (``evidence[1]``) lifts of ``explained`` items; empty without any."""
    total = float(evidence[0].sum())
    if not explained or total <= 0.0:
        return {}
    return {c: {"share": float(evidence[0, j] / total), "mean": float(evidence[1, j] / explained)}
            for j, c in enumerate(components)}


def evaluate(
    train_events: pd.DataFrame,
    test_events: pd.DataFrame,
    inter: Interactions,
    rec: Recommender,
    cut: pd.Timestamp,
    *,
    ablations: Mapping[str, LearnedRanker] | None = None,
    ablation_requests: int = ABLATION_REQUESTS,
    seed: int = 0,
    max_users: int | None = None,
    max_baskets: int | None = None,
    progress: Progress | None = None,
    k: int = S.TOP_K,
    pool: RankingPool | None = None,
) -> dict[str, Any]:
    """Run the protocol; see the module docstring.

    Args:
        train_events: Events before the cut (only used for users' purchase histories).
        test_events: Events at or after the cut (only used for targets and revealed items).
        inter: The indexing of the recommender's signals and embeddings.
        rec: The intentrec recommender (signals and embeddings fitted on ``train_events``).
        cut: The split time (the request time of next-basket tasks).
        ablations: Rankers ``{row name: LearnedRanker}`` fitted without some features and
            sources; they and ``intentrec`` rank the same seeded sample of at most
            ``ablation_requests`` requests per task (same candidates), reported under
            ``"ablations"``.
        ablation_requests: Size of that sample per task.
        seed: Seed of the reveal order and of any subsample.
        max_users: Subsample of next-basket users (default: all).
        max_baskets: Subsample of in-session baskets (default: all).
        progress: Called with progress lines (default: the module logger).
        k: Cut-off of the metrics.
        pool: Ray actors holding ``rec`` (:func:`graph.parallel.ranking_pool`) that rank the
            requests (the same rankings as without one, on more CPUs).

    Returns:
        ``{model: {task: {"recall@k", "ndcg@k", "hit@k", "n"}}}``; intentrec's task entries
        also hold the candidate report of :func:`recommender_rankings`; with ``ablations``,
        ``"ablations"`` holds the same structure for the ablation rows and ``intentrec``.
        Beside them: ``"uncertainty"`` (:func:`recall_uncertainty`), ``"segments"``
        (:func:`segment_report`), ``"anonymous"`` (the :func:`anonymous_tasks`, in the main
        table's structure) and ``"search"``.
    """
    say = progress or log.info
    signals = rec.ranker.signals
    t0 = time.perf_counter()
    nb_all, nb_disc, ins, blind = protocol_tasks(
        train_events, test_events, inter, cut, country=signals.params.country, seed=seed,
        max_users=max_users, max_baskets=max_baskets)
    say(f"evaluate: {len(nb_all)} next-basket users ({len(nb_disc)} with new items), "
        f"{len(ins)} in-session baskets; tasks built in {time.perf_counter() - t0:.1f}s")
    assert rec.learned is not None
    rankers = {"intentrec": rec.learned}
    ablation_rankers = {**(ablations or {}), "intentrec": rec.learned}
    results: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in [*BASELINES, *rankers]}
    ablated: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in ablation_rankers}
    empty = {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"), f"hit@{k}": float("nan"),
             "n": 0.0}
    rng = np.random.default_rng(seed)
    per_request: dict[str, dict[str, np.ndarray]] = {}
    shoppers: dict[str, np.ndarray] = {}
    task_users: dict[str, np.ndarray] = {}
    for q in (nb_all, nb_disc, ins, blind):
        t = time.perf_counter()
        if len(q) == 0:
            for table in (results, ablated):
                for name in table:
                    table[name][q.name] = dict(empty)
            continue
        per_request[q.name] = {}
        # An unknown shopper's requests are each their own cluster.
        shoppers[q.name] = np.where(q.users >= 0, q.users, -1 - np.arange(len(q)))
        task_users[q.name] = q.users
        ranked, report, base = task_rankings(rec, q, rankers, k,  # type: ignore[arg-type]
                                             baselines=list(BASELINES), progress=say, pool=pool)
        for name, top in {**base, **ranked}.items():
            results[name][q.name] = {**summarize(top, q.targets, k), "n": float(len(q))}
            per_request[q.name][name] = recall_at_k(top, q.targets, k)
        results["intentrec"][q.name].update(report)
        r = {m: results[m][q.name].get(f"recall@{k}", float("nan")) for m in results}
        say(f"evaluate {q.name}: {len(q)} requests in {time.perf_counter() - t:.1f}s; candidate "
            f"recall {report['candidate_recall']:.3f} ({report['candidates']:.0f} candidates); "
            f"recall@{k} " + ", ".join(f"{m} {v:.4f}" for m, v in r.items()))
        if ablations:
            t = time.perf_counter()
            n = min(len(q), ablation_requests)
            sub = q.take(np.sort(rng.choice(len(q), n, replace=False)))
            ranked, _ = recommender_rankings(rec, sub, ablation_rankers, k, progress=say,
                                             pool=pool)
            for name, top in ranked.items():
                ablated[name][q.name] = {**summarize(top, sub.targets, k), "n": float(n)}
            say(f"evaluate {q.name} ablations: {n} requests in {time.perf_counter() - t:.1f}s; "
                f"recall@{k} " + ", ".join(f"{m} {ablated[m][q.name][f'recall@{k}']:.4f}"
                                           for m in ablated))
    out: dict[str, Any] = dict(results)
    if ablations:
        out[ABLATIONS_KEY] = ablated
    out[UNCERTAINTY_KEY] = recall_uncertainty(per_request, shoppers, list(BASELINES), k=k,
                                              seed=seed)
    out[SEGMENTS_KEY] = segment_report(per_request, shoppers, task_users,
                                       history_breadth(signals), list(BASELINES), k=k, seed=seed)
    anonymous: dict[str, dict[str, dict[str, float]]] = {m: {} for m in [*BASELINES, *rankers]}
    for q in anonymous_tasks(ins, blind, max_requests=ANONYMOUS_REQUESTS, seed=seed):
        t = time.perf_counter()
        ranked, _, base = task_rankings(rec, q, rankers, k,  # type: ignore[arg-type]
                                        baselines=list(BASELINES), progress=say, pool=pool)
        for name, top in {**base, **ranked}.items():
            anonymous[name][q.name] = {**summarize(top, q.targets, k), "n": float(len(q))}
        say(f"evaluate {q.name}: {len(q)} requests in {time.perf_counter() - t:.1f}s; recall@{k} "
            + ", ".join(f"{m} {v[q.name][f'recall@{k}']:.4f}" for m, v in anonymous.items()))
    if any(anonymous.values()):
        out[ANONYMOUS_KEY] = anonymous
    from graph.search_eval import SEARCH_KEY, evaluate_search

    t = time.perf_counter()
    cat = rec.catalogue
    sq = search_task(ins, cat.categories, cat.titles, seed=seed)
    out[SEARCH_KEY] = evaluate_search(rec, sq, rec.learned, k, progress=say, pool=pool)
    if len(sq):
        say(f"evaluate search: {len(sq)} simulated queries in {time.perf_counter() - t:.1f}s; "
            f"recall@{k} " + ", ".join(f"{m} {v[sq.name][f'recall@{k}']:.4f}"
                                       for m, v in out[SEARCH_KEY].items()))
    say(f"evaluate: done in {time.perf_counter() - t0:.1f}s")
    return out


def protocol_tasks(train_events: pd.DataFrame, test_events: pd.DataFrame, inter: Interactions,
                   cut: pd.Timestamp, *, country: str, seed: int = 0,
                   max_users: int | None = None, max_baskets: int | None = None,
                   ) -> tuple[QueryBatch, QueryBatch, QueryBatch, QueryBatch]:
    """The four tasks of :data:`graph.schema.TASKS`, in ``inter``'s rows (seeded: the same
    arguments give the same requests)."""
    nb_all, nb_disc = next_basket_tasks(train_events, test_events, inter, cut, seed=seed,
                                        max_users=max_users)
    ins, blind = in_session_tasks(test_events, inter, country=country, seed=seed,
                                  max_baskets=max_baskets)
    return nb_all, nb_disc, ins, blind


# ------------------------------------------------------------------ the published version
@dataclass(frozen=True)
class IndexMap:
    """Rows of this run's users and items in another model version, and back.

    Shapes:
        - **users** ``[users here]``, **items** ``[items here]``: the version's row, -1 where it
          does not know the id; **back** ``[items there]``: this run's row, -1 likewise.
    """

    users: np.ndarray
    items: np.ndarray
    back: np.ndarray

    @classmethod
    def between(cls, user_ids: np.ndarray, item_ids: np.ndarray, their_user_ids: np.ndarray,
                their_item_ids: np.ndarray) -> IndexMap:
        """The map from ids here (``user_ids``, ``item_ids``, each row's id) to theirs."""
        def rows(ids: np.ndarray, into: np.ndarray) -> np.ndarray:
            return pd.Index(np.asarray(into).astype(str)).get_indexer(
                np.asarray(ids).astype(str)).astype(np.int64)
        return cls(rows(user_ids, their_user_ids), rows(item_ids, their_item_ids),
                   rows(their_item_ids, item_ids))

    def to_theirs(self, q: QueryBatch) -> QueryBatch:
        """``q``'s requests as the other version gets them: a shopper it does not know is
        anonymous, items it does not know leave the session and the exclusions, as they do when
        it serves. Its targets are those it could recommend (a request left without one gets
        ``[-1]``, which no candidate matches); the metrics are computed here, on ``q``'s own."""
        def items(x: np.ndarray) -> np.ndarray:
            out = self.items[np.asarray(x, dtype=np.int64)]
            return out[out >= 0]

        users = np.where(q.users >= 0, self.users[np.maximum(q.users, 0)], -1)
        events = [tuple((int(self.items[i]), e, t) for i, e, t in ev if self.items[i] >= 0)
                  for ev in q.events]
        exclude = [None if ex is None else items(ex) for ex in q.exclude]
        targets = [t if len(t := items(tg)) else np.array([-1], dtype=np.int64)
                   for tg in q.targets]
        return QueryBatch(q.name, users, events, list(q.contexts), q.times.copy(), exclude,
                          targets, None if q.queries is None else list(q.queries))

    def to_ours(self, top: np.ndarray) -> np.ndarray:
        """Their ranked rows (``-1`` padded) as this run's rows; an item this run does not
        know stays in its place as ``-1``, a miss."""
        return np.where(top >= 0, self.back[np.maximum(top, 0)], -1)


def evaluate_version(
    rec: Recommender, index: IndexMap, train_events: pd.DataFrame, test_events: pd.DataFrame,
    inter: Interactions, cut: pd.Timestamp, *, country: str, seed: int = 0,
    max_users: int | None = None, max_baskets: int | None = None,
    progress: Progress | None = None, k: int = S.TOP_K, pool: RankingPool | None = None,
) -> dict[str, dict[str, float]]:
    """Another model version (``rec``: the one serving, :data:`PUBLISHED`) on this run's four
    tasks: the requests :func:`evaluate` asked (same arguments, same seed), in that version's
    rows (:meth:`IndexMap.to_theirs`), ranked by its own candidates, features and ranker, and
    judged here against the same targets. It answers with what it knew when it was trained:
    a shopper's purchases since then, and items added since, are unknown to it, as they are
    while it serves.

    Returns:
        ``{task: {"recall@k", "ndcg@k", "hit@k", "n"}}``.
    """
    say = progress or log.info
    assert rec.learned is not None
    out: dict[str, dict[str, float]] = {}
    for q in protocol_tasks(train_events, test_events, inter, cut, country=country, seed=seed,
                            max_users=max_users, max_baskets=max_baskets):
        if len(q) == 0:
            out[q.name] = {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"),
                           f"hit@{k}": float("nan"), "n": 0.0}
            continue
        t = time.perf_counter()
        ranked, _, _ = task_rankings(rec, index.to_theirs(q), {PUBLISHED: rec.learned}, k,
                                     progress=say, pool=pool)
        out[q.name] = {**summarize(index.to_ours(ranked[PUBLISHED]), q.targets, k),
                       "n": float(len(q))}
        say(f"evaluate {q.name} ({PUBLISHED} version): {len(q)} requests in "
            f"{time.perf_counter() - t:.1f}s; recall@{k} {out[q.name][f'recall@{k}']:.4f}")
    return out


def regression_shortfalls(metrics: Mapping[str, Any], tolerance: float, k: int = S.TOP_K
                          ) -> list[str]:
    """The tasks where intentrec's recall@k is below the published version's
    (``metrics[PUBLISHED]``, :func:`evaluate_version`) by more than ``tolerance``: the publish
    gate of ``train_job.py --require-no-regression``, one sentence each; [] when it is not, and
    when there is no published row (nothing was published before). A task without requests
    (NaN) is not judged.
    """
    key = f"recall@{k}"
    if not metrics.get(PUBLISHED):
        return []
    out = []
    for task in S.TASKS:
        ours, old = _recall(metrics, "intentrec", task, k), _recall(metrics, PUBLISHED, task, k)
        if np.isnan(ours) or np.isnan(old):
            continue
        if ours < old - tolerance - 1e-12:  # a drop of exactly the tolerance is allowed
            out.append(f"{task}: intentrec {key} {ours:.4f} against the published version's "
                       f"{old:.4f} ({ours - old:+.4f}, at most {tolerance:.4f} lower allowed)")
    return out


def recall_uncertainty(per_request: Mapping[str, Mapping[str, np.ndarray]],
                       shoppers: Mapping[str, np.ndarray], baselines: list[str], *,
                       k: int = S.TOP_K, model: str = "intentrec", seed: int = 0,
                       samples: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """95% intervals of ``model``'s recall@k and of its lead over the task's best baseline.

    Each task's shoppers are resampled with all their requests
    (:func:`graph.metrics.cluster_bootstrap`); the lead is paired: the same requests for both
    models, so it is much tighter than the two intervals side by side. What the intervals
    cover is the sampling of requests (which shoppers and baskets the test window happened to
    hold), not the ranker's refit noise (another seed, other rows).

    Args:
        per_request: ``{task: {model: per-request recall@k}}``.
        shoppers: ``{task: the shopper of each request}``.
        baselines: The baseline models' names.

    Returns:
        ``{"method": str, "samples": int, f"recall@{k}": {task: {"mean", "ci95", "best_baseline",
        "lead", "lead_ci95"}}}``.
    """
    rows: dict[str, dict[str, Any]] = {}
    for task, by_model in per_request.items():
        if model not in by_model:
            continue
        mine, who = by_model[model], shoppers[task]
        best = max((b for b in baselines if b in by_model), key=lambda b: float(by_model[b].mean()))
        lead = mine - by_model[best]
        rows[task] = {
            "mean": float(mine.mean()),
            "ci95": list(cluster_bootstrap(mine, who, samples=samples, seed=seed)),
            "best_baseline": best,
            "lead": float(lead.mean()),
            "lead_ci95": list(cluster_bootstrap(lead, who, samples=samples, seed=seed)),
        }
    return {"method": "95% percentile intervals, shoppers resampled with all their requests",
            "samples": samples, f"recall@{k}": rows}


def format_uncertainty(metrics: Mapping[str, Any], k: int = S.TOP_K) -> str:
    """The intervals of :func:`recall_uncertainty` as a table, or "" without them."""
    rows = (metrics.get(UNCERTAINTY_KEY) or {}).get(f"recall@{k}")
    if not rows:
        return ""
    width = max(len(t) for t in rows)
    head = (f"{'task'.ljust(width)} | intentrec recall@{k} [95% interval] | lead over the best "
            "baseline [95% interval]")
    lines = [f"uncertainty ({metrics[UNCERTAINTY_KEY]['samples']:,} bootstrap resamples of the "
             "shoppers; the ranker's refit noise is not in it):", head, "-" * len(head)]
    for t, r in rows.items():
        lo, hi = r["ci95"]
        llo, lhi = r["lead_ci95"]
        lines.append(f"{t.ljust(width)} | {r['mean']:.4f} [{lo:.4f}, {hi:.4f}]".ljust(width + 38)
                     + f"| {r['lead']:+.4f} [{llo:+.4f}, {lhi:+.4f}] over {r['best_baseline']}")
    return "\n".join(lines)


def anonymous_tasks(ins: QueryBatch, blind: QueryBatch, *, max_requests: int | None = None,
                    seed: int = 0) -> list[QueryBatch]:
    """The shoppers the protocol's tasks always know, withheld: ``anonymous_session`` is
    ``in_session`` without the shopper (a visitor who has not signed in: the revealed items
    only) and ``cold_start`` is ``in_session_blind`` without them (nothing personal: the
    basket's time and context only), each a seeded sample of at most ``max_requests`` (the
    same baskets when the two tasks hold the same ones, as the test tasks do). Empty tasks are
    left out."""
    out = []
    for q, name in ((ins, "anonymous_session"), (blind, "cold_start")):
        idx = np.arange(len(q))
        if max_requests is not None and len(q) > max_requests:
            idx = np.sort(np.random.default_rng(seed).choice(len(q), max_requests, replace=False))
        if len(idx):
            out.append(replace(q.take(idx, name=name), users=np.full(len(idx), -1, dtype=np.int64)))
    return out


def format_anonymous(metrics: Mapping[str, Any]) -> str:
    """The table of the :func:`anonymous_tasks`, or "" without one."""
    anon = metrics.get(ANONYMOUS_KEY)
    if not anon:
        return ""
    return ("without a known shopper (in-session baskets asked again with the shopper withheld: "
            "anonymous_session keeps the revealed items, cold_start has only the basket's time and "
            "context; buy_again has no history to use, so it is popularity):\n"
            + format_table(anon))


# ------------------------------------------------------------------------------ segments
SEGMENTS = ("new", "light", "medium", "heavy")


def history_breadth(signals: RankingSignals) -> np.ndarray:
    """How many distinct items each user's history before the split holds. Shapes: ``[U]``."""
    return np.diff(np.asarray(signals.hist_indptr)).astype(np.int64)


def segment_edges(breadth: np.ndarray) -> tuple[int, int]:
    """The largest breadths of the ``light`` and ``medium`` thirds of the users with a history:
    terciles, so that the bands follow the data rather than fixed counts (a light shopper of
    the built-in grocer has bought up to 156 distinct items; where most shoppers bought once,
    light and medium share the edge 1 and medium is empty)."""
    known = breadth[breadth > 0]
    if len(known) == 0:
        return 0, 0
    lo, hi = np.quantile(known, [1 / 3, 2 / 3], method="inverted_cdf")  # values that occur
    return int(lo), int(hi)


def shopper_segments(users: np.ndarray, breadth: np.ndarray, edges: tuple[int, int]) -> np.ndarray:
    """Each request's segment as an index of :data:`SEGMENTS`: ``new`` for an unknown shopper or
    one without a history, then ``light`` / ``medium`` / ``heavy`` by :func:`segment_edges`.
    Shapes: ``users`` ``[B]`` (``-1`` = unknown) -> ``[B]`` int64."""
    users = np.asarray(users, dtype=np.int64)
    n = np.where(users >= 0, breadth[np.maximum(users, 0)], 0) if len(breadth) else np.zeros(
        len(users), dtype=np.int64)
    return np.select([n <= 0, n <= edges[0], n <= edges[1]], [0, 1, 2], default=3).astype(np.int64)


def segment_report(per_request: Mapping[str, Mapping[str, np.ndarray]],
                   shoppers: Mapping[str, np.ndarray], users: Mapping[str, np.ndarray],
                   breadth: np.ndarray, baselines: list[str], *, k: int = S.TOP_K,
                   model: str = "intentrec", seed: int = 0,
                   samples: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """Recall@k of every model by shopper segment (:func:`shopper_segments`), with ``model``'s
    lead over the segment's best baseline and its 95% interval (shoppers resampled, paired, as
    :func:`recall_uncertainty`). An average over all shoppers can hide a segment that a
    baseline serves better: heavy shoppers whose next basket is mostly what they always buy,
    or new ones that only popularity knows anything about.

    Args:
        per_request: ``{task: {model: per-request recall@k}}``.
        shoppers: ``{task: the shopper (cluster) of each request}``.
        users: ``{task: the user row of each request}`` (``-1`` = unknown).
        breadth: :func:`history_breadth` of every user row.

    Returns:
        ``{"by", "edges", "samples", f"recall@{k}": {task: {segment: {"n", "shoppers",
        "models": {model: recall}, "best_baseline", "lead", "lead_ci95"}}}}``; a segment
        without requests is left out.
    """
    edges = segment_edges(breadth)
    rows: dict[str, dict[str, Any]] = {}
    for task, by_model in per_request.items():
        if model not in by_model:
            continue
        seg = shopper_segments(users[task], breadth, edges)
        rows[task] = {}
        for code, name in enumerate(SEGMENTS):
            sel = seg == code
            if not sel.any():
                continue
            means = {m: float(v[sel].mean()) for m, v in by_model.items()}
            best = max((b for b in baselines if b in by_model), key=lambda b: means[b])
            lead = by_model[model][sel] - by_model[best][sel]
            rows[task][name] = {
                "n": int(sel.sum()),
                "shoppers": len(np.unique(shoppers[task][sel])),
                "models": means,
                "best_baseline": best,
                "lead": float(lead.mean()),
                "lead_ci95": list(cluster_bootstrap(lead, shoppers[task][sel], samples=samples,
                                                    seed=seed)),
            }
    return {"by": "distinct items in the shopper's history before the split; light, medium and "
                  "heavy are thirds of the shoppers with a history",
            "edges": list(edges), "samples": samples, f"recall@{k}": rows}


def format_segments(metrics: Mapping[str, Any], k: int = S.TOP_K, model: str = "intentrec") -> str:
    """The table of :func:`segment_report`, or "" without one."""
    seg = metrics.get(SEGMENTS_KEY) or {}
    rows = seg.get(f"recall@{k}")
    if not rows:
        return ""
    lo, hi = seg["edges"]
    bands = {"new": "new (none)", "light": f"light (1-{lo})", "medium": f"medium ({lo + 1}-{hi})",
             "heavy": f"heavy ({hi + 1}+)"}
    width = max(len(t) for t in rows)
    head = (f"{'task'.ljust(width)} | {'shoppers (items bought)':<23} | {'requests':>8} | "
            f"{model:>9} | {'best baseline':<18} | lead [95% interval]")
    lines = [f"by shopper history (recall@{k}; items = distinct items in the shopper's history "
             "before the split; light, medium, heavy: thirds of the shoppers with one; the lead "
             f"is over the segment's best baseline, {seg['samples']:,} bootstrap resamples of "
             "the shoppers):", head, "-" * len(head)]
    for t, by_seg in rows.items():
        for name, r in by_seg.items():
            llo, lhi = r["lead_ci95"]
            best = f"{r['best_baseline']} {r['models'][r['best_baseline']]:.4f}"
            lines.append(f"{t.ljust(width)} | {bands[name]:<23} | {r['n']:>8,} | "
                         f"{r['models'][model]:>9.4f} | {best:<18} | {r['lead']:+.4f} "
                         f"[{llo:+.4f}, {lhi:+.4f}]")
    return "\n".join(lines)


def validation_tasks(history: pd.DataFrame, window: pd.DataFrame, inter: Interactions,
                     cut: pd.Timestamp, *, country: str, seed: int = 0,
                     max_users: int | None = 5000, max_baskets: int | None = 10000,
                     ) -> list[QueryBatch]:
    """The validation twins of the tasks the learned ranker is fitted on: next-basket (all and
    discovery) asked at the validation cut, in-session baskets of the validation window, and the
    blind version of a quarter of them (requests with a context but no session).

    The caps bound the ranker's fitting time on large data; the built-in data stays under them
    (all 2,017 users and 6,927 baskets of its validation window). On held-out validation requests,
    fitting on all of them instead of 1,000 users and 2,000 baskets (with 100 instead of 300
    negatives each, so the same number of rows) raised in-session recall@20 from 0.241 to 0.247.
    """
    nb_all, nb_disc = next_basket_tasks(history, window, inter, cut, seed=seed, max_users=max_users)
    ins, blind = in_session_tasks(window, inter, country=country, seed=seed,
                                  max_baskets=max_baskets)
    quarter = np.arange(0, len(blind), 4)
    return [nb_all, nb_disc, ins, blind.take(quarter)]


def _recall(metrics: Mapping[str, Any], model: str, task: str, k: int) -> float:
    """``model``'s recall@k in ``task`` (NaN where the table has none): what the gates judge."""
    return float(metrics.get(model, {}).get(task, {}).get(f"recall@{k}", float("nan")))


def lead_shortfalls(metrics: Mapping[str, Any], margin: float, k: int = S.TOP_K) -> list[str]:
    """The tasks where intentrec's recall@k does not beat every baseline's by more than
    ``margin`` (the publish gate of ``train_job.py --require-lead``; a tie is no lead), one
    sentence each; [] when it does in every task. A task without requests (NaN) is not
    judged; no judged task at all is a shortfall (nothing shows the model is better).
    """
    key = f"recall@{k}"
    out, judged = [], 0
    for task in S.TASKS:
        ours = _recall(metrics, "intentrec", task, k)
        theirs = {b: _recall(metrics, b, task, k) for b in BASELINES}
        theirs = {b: v for b, v in theirs.items() if not np.isnan(v)}
        if np.isnan(ours) or not theirs:
            continue
        judged += 1
        best = max(theirs, key=lambda b: theirs[b])
        if not ours - theirs[best] > margin:
            out.append(f"{task}: intentrec {key} {ours:.4f} against {best} {theirs[best]:.4f} "
                       f"(a lead of {ours - theirs[best]:+.4f}, more than {margin:.4f} required)")
    if not judged:
        out.append(f"no task had requests to compare intentrec's {key} with the baselines'")
    return out


def format_ablations(metrics: Mapping[str, Any]) -> str:
    """The ablation table (``metrics["ablations"]``), or "" without one."""
    abl = metrics.get(ABLATIONS_KEY)
    if not abl:
        return ""
    return ("ablations (the same seeded sample of requests and candidates for each row; "
            "each ranker refitted without the named features and sources):\n" + format_table(abl))


def format_candidates(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Candidate recall per task: overall, mean count and per source."""
    rows = metrics.get("intentrec", {})
    tasks = [t for t in S.TASKS if "candidate_recall" in rows.get(t, {})]
    if not tasks:
        return ""
    width = max(len(t) for t in tasks)
    head = "task".ljust(width) + " | cand.recall  mean n | " + " ".join(s.rjust(9) for s in SOURCES)
    lines = ["candidate recall (share of relevant items among the candidates; per source):", head,
             "-" * len(head)]
    for t in tasks:
        r = rows[t]
        lines.append(t.ljust(width) + f" | {r['candidate_recall']:>11.4f} {r['candidates']:>7.0f} | "
                     + " ".join(f"{r['source_recall'][s]:>9.4f}" for s in SOURCES))
    return "\n".join(lines)


def format_contributions(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """What ranks intentrec's recommendations, per task: each reason component's share of the
    recommended items' absolute lift over their finalists and its mean signed lift (largest
    average share first), or "" without a report."""
    rows = metrics.get("intentrec", {})
    tasks = [t for t in S.TASKS if rows.get(t, {}).get("contributions")]
    if not tasks:
        return ""
    comps = sorted({c for t in tasks for c in rows[t]["contributions"]},
                   key=lambda c: -sum(rows[t]["contributions"].get(c, {}).get("share", 0.0)
                                      for t in tasks))
    width = max(max(len(c) for c in comps), len("component"))
    cell = max(max(len(t) for t in tasks), 15)
    head = "component".ljust(width) + " | " + " | ".join(t.center(cell) for t in tasks)
    lines = ["what ranks the recommended items (per reason component, each top-20 item's TreeSHAP "
             "contribution minus its request's mean over the finalists that every tree scored: "
             "share of the absolute total, mean per item):", head, "-" * len(head)]
    for c in comps:
        cells = []
        for t in tasks:
            v = rows[t]["contributions"].get(c)
            cells.append(("-" if v is None else f"{v['share']:6.1%}  {v['mean']:+.3f}").rjust(cell))
        lines.append(c.ljust(width) + " | " + " | ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- table
def format_table(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Models as rows (intentrec last), task × metric columns, ``*`` marks each column's best.

    The header names each task with its number of requests ``n``.
    """
    models = [m for m in metrics if m != "intentrec" and m not in NON_MODEL_KEYS] + (
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
