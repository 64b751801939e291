"""Offline ranking across the Ray cluster's CPUs: the evaluation's requests, chunk by chunk, on a
pool of Ray actors that each hold the model version being evaluated.

The offline protocol ranks tens of thousands of requests one by one through
:meth:`graph.recommend.Recommender.prepare` (candidates and features are Python and NumPy work
on one core), so on its own it keeps one CPU busy while the others idle. A
:class:`RankingPool` puts the recommender in Ray's object store once (its arrays are shared, not
copied, by the actors of a node), starts one actor per CPU it may use, and hands each actor chunks
of requests; the driver only gathers the answers. Every request is still answered by the same
:meth:`Recommender.prepare`, :meth:`Recommender.score` and :meth:`Recommender.select`, and no
request's answer depends on which others share its chunk or actor, so the rankings are exactly
those of the sequential loop (a test checks it).

Without Ray initialised, or with one CPU free, there is no pool and the evaluation runs in the
driver as before::

    with ranking_pool(rec) as pool:   # one actor per free CPU of the cluster, or None
        metrics = evaluate(..., pool=pool)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graph.ltr import LearnedRanker
from graph.recommend import Recommender, Request
from graph.retrieval import SOURCES


@dataclass
class ChunkResult:
    """The rankings of one chunk of requests.

    Shapes:
        - **top** ``{ranker name: [n, k]}`` item indices padded with ``-1``.
        - **recall**, **count** ``[n]``: candidate recall and number of candidates per request.
        - **per_source** ``[n, len(SOURCES)]``: each source's share of the relevant items.
        - **contributions** ``{first ranker's name: [2, len(ranker.components)]}``: over its top ``k``
          items (``explained[name]`` of them), the summed absolute (row 0) and signed (row 1)
          *lift* of each reason component: the item's contribution minus its request's mean
          over the finalists (the candidates every tree scored, :attr:`graph.ltr.Cascade.rows`),
          so that what moves every finalist alike (a missing session) counts for nothing.
    """

    top: dict[str, np.ndarray]
    recall: np.ndarray
    count: np.ndarray
    per_source: np.ndarray
    contributions: dict[str, np.ndarray] = field(default_factory=dict)
    explained: dict[str, int] = field(default_factory=dict)


def rank_chunk(rec: Recommender, rankers: Mapping[str, LearnedRanker],
               requests: Sequence[Request], targets: Sequence[np.ndarray], k: int) -> ChunkResult:
    """Candidates, candidate recall and each ranker's top ``k`` for a chunk of requests (a
    request's candidates and features are computed once; the chunk shares one prediction call
    per ranker)."""
    n = len(requests)
    prepared = [rec.prepare(r) for r in requests]
    recall, count = np.zeros(n), np.zeros(n)
    per_source = np.zeros((n, len(SOURCES)))
    for b, (p, tgt) in enumerate(zip(prepared, targets, strict=True)):
        hit = np.isin(p.candidates.items, tgt)
        recall[b] = hit.sum() / len(tgt)
        count[b] = len(p.candidates)
        per_source[b] = p.candidates.sources[hit].sum(axis=0) / len(tgt)
    top: dict[str, np.ndarray] = {}
    contributions: dict[str, np.ndarray] = {}  # the first ranker's only (the report's)
    explained: dict[str, int] = {}
    for name, lr in rankers.items():
        out = np.full((n, k), -1, dtype=np.int64)
        chosen, finalists = [], []
        for b, (p, s) in enumerate(zip(prepared, rec.score(prepared, learned=lr), strict=True)):
            items = rec.select(p, s, learned=lr, k=k).items
            out[b, : len(items)] = items
            if len(items) and not contributions:
                # Candidates are sorted and unique: an item's position is its rank among them.
                chosen.append(s.leaves_of(np.searchsorted(p.candidates.items, items)))
                finalists.append(s.leaves)
        top[name] = out
        if not contributions:
            contributions[name] = component_lift(lr, chosen, finalists)
            explained[name] = sum(map(len, chosen))
    return ChunkResult(top, recall, count, per_source, contributions, explained)


def component_lift(lr: LearnedRanker, chosen: Sequence[np.ndarray], finalists: Sequence[np.ndarray]
                   ) -> np.ndarray:
    """Summed absolute (row 0) and signed (row 1) lift of each of ``lr.components`` over chosen
    items: an item's contribution minus the mean over its request's finalists.

    Shapes: per request, ``chosen`` ``[k_r, trees]`` and ``finalists`` ``[m_r, trees]`` leaves
    (``k_r`` > 0); return ``[2, len(lr.components)]``.
    """
    if not chosen:
        return np.zeros((2, len(lr.components)))
    top = lr.component_contributions(np.concatenate(chosen))
    sizes = np.array([len(f) for f in finalists])
    fin = lr.component_contributions(np.concatenate(finalists))
    mean = np.add.reduceat(fin, np.r_[0, np.cumsum(sizes)[:-1]], axis=0) / sizes[:, None]
    lift = top - np.repeat(mean, [len(c) for c in chosen], axis=0)
    return np.stack([np.abs(lift).sum(axis=0), lift.sum(axis=0)])


# A unit of pool work: ``fn(rec, rankers, *args)`` with a module-level ``fn`` (sent by reference).
Call = tuple[Callable[..., Any], tuple[Any, ...]]


class _Worker:
    """One pool actor: the recommender, and the rankers registered so far by key."""

    def __init__(self, rec: Recommender) -> None:
        # Ray gives a one-CPU actor OMP_NUM_THREADS=1: faiss and BLAS use one thread each.
        self.rec = rec
        self.rankers: dict[str, LearnedRanker] = {}

    def add_rankers(self, rankers: dict[str, LearnedRanker]) -> None:
        self.rankers.update(rankers)

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], rankers: dict[str, str]) -> Any:
        return run_call(self.rec, (fn, args),
                        {name: self.rankers[key] for name, key in rankers.items()})


def run_call(rec: Recommender, call: Call, rankers: Mapping[str, LearnedRanker]) -> Any:
    """``fn(rec, rankers, *args)``: a call gets the recommender and the rankers by name."""
    fn, args = call
    return fn(rec, rankers, *args)


def run_calls(rec: Recommender, calls: Sequence[Call], rankers: Mapping[str, LearnedRanker],
              pool: RankingPool | None = None) -> Iterator[tuple[int, Any]]:
    """``(index, result)`` of each call: in this process in order without a ``pool``, else on
    its actors in the order they finish."""
    if pool is None:
        return ((i, run_call(rec, c, rankers)) for i, c in enumerate(calls))
    return pool.map(calls, rankers)


class RankingPool:
    """Ray actors answering chunks of offline work with one recommender (see the module
    docstring). Make one with :func:`ranking_pool`, which closes it."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        self.answered = 0  # calls the actors have answered
        self._keys: dict[int, str] = {}
        self._rankers: list[LearnedRanker] = []  # keeps the registered objects (and ids) alive

    @property
    def size(self) -> int:
        return len(self.actors)

    @classmethod
    def start(cls, rec: Recommender, workers: int) -> RankingPool:
        """``workers`` actors, each holding ``rec`` (put in the object store once)."""
        import ray

        ref = ray.put(rec)
        remote = ray.remote(num_cpus=1)(_Worker)
        return cls([remote.remote(ref) for _ in range(workers)])

    def _register(self, rankers: Mapping[str, LearnedRanker]) -> dict[str, str]:
        """Send the rankers the actors do not have yet (once each); their keys by name."""
        import ray

        new = {}
        for lr in rankers.values():
            if id(lr) not in self._keys:
                self._keys[id(lr)] = key = f"r{len(self._keys)}"
                self._rankers.append(lr)
                new[key] = lr
        if new:
            ray.get([a.add_rankers.remote(new) for a in self.actors])
        return {name: self._keys[id(lr)] for name, lr in rankers.items()}

    def map(self, calls: Sequence[Call], rankers: Mapping[str, LearnedRanker] | None = None,
            ) -> Iterator[tuple[int, Any]]:
        """``(index, result)`` of every call (:func:`run_call` on an actor), in the order they
        finish; each actor has at most two calls queued, so a free actor takes the next one."""
        import ray

        names = self._register(rankers or {})
        todo = iter(enumerate(calls))
        pending: dict[Any, tuple[int, Any]] = {}

        def submit(actor: Any) -> None:
            if (nxt := next(todo, None)) is not None:
                i, (fn, args) = nxt
                pending[actor.call.remote(fn, args, names)] = (i, actor)

        for actor in self.actors * 2:
            submit(actor)
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(done)
            submit(actor)
            result = ray.get(done)
            self.answered += 1
            yield i, result

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


@contextmanager
def ranking_pool(rec: Recommender, workers: int | None = None) -> Iterator[RankingPool | None]:
    """A :class:`RankingPool` of ``workers`` actors (default: one per CPU the Ray cluster has
    free), closed on exit; None, and the caller ranks in its own process, when Ray is not
    initialised or fewer than two actors would run (one actor would only add copying)."""
    import ray

    if workers is None:
        workers = int(ray.available_resources().get("CPU", 0)) if ray.is_initialized() else 0
    if workers < 2 or not ray.is_initialized():
        yield None
        return
    pool = RankingPool.start(rec, workers)
    try:
        yield pool
    finally:
        pool.close()
