"""The offline ``search`` task (:func:`graph.tasks.search_task`): intentrec against three search
baselines, each ranking the whole catalogue for the same simulated queries.

- ``popularity_in_category``: the category path of the query's best BM25 hit (the best semantic
  hit when no word matches), its items by popularity, then the rest by popularity.
- ``lexical``: BM25 (:mod:`graph.search`), ties and the rest by popularity.
- ``semantic``: cosine of the query's and the items' text vectors, ties by popularity.
- ``intentrec``: the recommender with the query (hybrid candidates and features, the session, the
  user, the context, the learned ranker), as served.

Every model gets the task's exclusions (the revealed basket items). The queries are simulated
(:mod:`graph.queries`), and said so in the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graph.ltr import LearnedRanker
from graph.metrics import summarize
from graph.parallel import RankingPool
from graph.recommend import Recommender
from graph.tasks import QueryBatch

SEARCH_KEY = "search"
BASELINES: tuple[str, ...] = ("popularity_in_category", "lexical", "semantic")
ScoreFn = Callable[[slice], np.ndarray]


def _scores(rec: Recommender, q: QueryBatch, model: str) -> ScoreFn:
    """Whole-catalogue scores of ``model`` for a slice of the task's requests."""
    pop = np.log1p(np.maximum(rec.ranker.signals.popularity.astype(np.float64), 0.0))
    pop = (pop / max(float(pop.max()), 1e-12)).astype(np.float32)
    everything = np.arange(len(pop))
    item_category = np.asarray(rec.ranker.signals.item_category)
    queries = q.queries or []

    def one(text: str | None) -> np.ndarray:
        qs = rec.search_scores(text)
        if qs is None:
            return pop.copy()
        if model == "lexical":
            return qs.lexical_of(everything) + 1e-3 * pop
        if model == "semantic":
            return qs.semantic_of(everything) + 1e-3 * pop
        lex = qs.lexical_of(everything)
        best = qs.top(lex if lex.max() > 0 else qs.semantic_of(everything) + 1.0, pop, 1)
        return (item_category == item_category[best[0]]).astype(np.float32) + 1e-3 * pop

    return lambda sl: np.stack([one(t) for t in queries[sl]]) if queries[sl] else (
        np.zeros((0, len(pop)), dtype=np.float32))


def baseline_chunk(rec: Recommender, rankers: Mapping[str, LearnedRanker], names: Sequence[str],
                   q: QueryBatch, k: int) -> dict[str, np.ndarray]:
    """The top ``k`` of the named search baselines for a chunk of requests (a
    :data:`graph.parallel.Call`; ``rankers`` is not used)."""
    from graph.evaluate import run_queries

    return {n: run_queries(_scores(rec, q, n), q, k, chunk=64) for n in names}


def evaluate_search(rec: Recommender, q: QueryBatch, learned: LearnedRanker, k: int,
                    progress: Callable[[str], None] | None = None,
                    pool: RankingPool | None = None) -> dict[str, Any]:
    """``{model: {"search": {"recall@k", "ndcg@k", "hit@k", "n"}}}`` for the baselines and
    intentrec (whose entry also holds the candidate report; ranked on ``pool``'s actors when
    given)."""
    from graph.evaluate import task_rankings

    out: dict[str, Any] = {}
    if len(q) == 0:
        return out
    ranked, report, base = task_rankings(rec, q, {"intentrec": learned}, k, baselines=BASELINES,
                                         baseline_fn=baseline_chunk, progress=progress, pool=pool)
    for name in BASELINES:
        out[name] = {q.name: {**summarize(base[name], q.targets, k), "n": float(len(q))}}
    out["intentrec"] = {q.name: {**summarize(ranked["intentrec"], q.targets, k),
                                 "n": float(len(q)), **report}}
    return out


def format_search(metrics: dict[str, Any]) -> str:
    """The search table (``metrics["search"]``), or "" without one."""
    from graph.evaluate import format_table

    rows = metrics.get(SEARCH_KEY)
    if not rows:
        return ""
    return ("search (simulated queries from a hidden basket item's category or title words; "
            "relevant = the basket's hidden items of that category):\n" + format_table(rows))
