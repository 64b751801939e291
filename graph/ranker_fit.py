"""Fitting the learned ranker on the validation window (never on anything after the split).

1. The validation twins of the protocol's tasks (:mod:`graph.tasks`): history = events before the
   validation cut, targets = the validation window.
2. Each request goes through :meth:`graph.recommend.Recommender.prepare` of a recommender whose
   embeddings and signals saw only the events before the validation cut: the very candidate
   generation and features serving uses. A candidate is labelled 1 when the request's targets
   hold it.
3. Queries: no data set we ship has searches, so a seeded share of the in-session requests gets
   a simulated one (:func:`simulate_queries`, :mod:`graph.queries`): words of one target item's
   category or title, never its id. That is what teaches the ranker what a query match is
   worth; it is said wherever a number comes from it.
4. Negatives are subsampled per request (all positives kept) to bound training time (many
   requests with 100 negatives each ranked better on held-out validation requests than a third
   as many with 300: the same rows, more variety of shoppers and baskets), the shoppers are
   split 80/20 into training and early-stopping sets (:func:`split_requests`), and LambdaRank
   is fitted for the full model and each ablation (:data:`graph.ltr.ABLATIONS`), then refitted
   on both sets with the rounds early stopping chose, scaled (:data:`graph.ltr.REFIT_ON_ALL`).
5. Anonymous twins (:func:`validation_requests`; opt-in, ``train_job.py --anonymous-twins``):
   a seeded share of the requests is asked a second time without its shopper, as an anonymous
   session (``in_session``) or a cold start (``next_basket_all``). Every validation request has
   a known shopper, and a ranker that never saw one without ranks cold starts far below plain
   popularity (README, "Shoppers it does not know"). A twin goes to the same side of the
   early-stopping split as its original.
6. The full ranker keeps the distribution of its features over the validation requests'
   candidates (:func:`training_profile`), which serving replicas compare live traffic with
   (:mod:`graph.skew`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from graph.features import FEATURES
from graph.ltr import ABLATIONS, LearnedRanker, RankingData, fit_ranker
from graph.queries import simulate_query
from graph.recommend import Recommender, Request
from graph.skew import FeatureProfile, request_mix, sample_rows
from graph.tasks import QueryBatch

QUERY_SHARE = 0.2
NEGATIVES_PER_REQUEST = 100
VALID_SHARE = 0.2
SPLIT_BY_SHOPPER = True  # early-stopping requests: whole shoppers held out (split_requests)
# The share of the requests of ANONYMOUS_TASKS also asked without their shopper
# (validation_requests; read at call time, so `bench/ranker_holdout.py --set` reaches it).
# Off by default: 0.2 (`train_job.py --anonymous-twins 0.2`) ranks anonymous sessions and cold
# starts far better, but cost the search task 0.006-0.013 recall@20 (README, "Shoppers it does
# not know").
ANONYMOUS_SHARE = 0.0
# Discovery is left out: its exclusions are the shopper's history, which an anonymous request
# cannot have. Blind twins (cold starts at a basket's time) cost known shoppers' blind recall
# on two held-out quarters of three (-0.0038 on average) for no more cold-start recall than the
# next-basket twins give (docs/EXPERIMENTS.md, "Anonymous twins").
ANONYMOUS_TASKS = ("next_basket_all", "in_session")
Progress = Callable[[str], None]


def simulate_queries(requests: list[Request], targets: Sequence[np.ndarray], categories: np.ndarray,
                     titles: np.ndarray, rng: np.random.Generator, share: float | None = None,
                     ) -> list[Request]:
    """Give a seeded ``share`` (default :data:`QUERY_SHARE`) of the requests a search about one
    of its target items (:func:`graph.queries.simulate_query`, e.g. ``"kids cereal"``), half of
    them as the request's query and half as the session's latest search."""
    share = QUERY_SHARE if share is None else share
    out = list(requests)
    words_rng = rng.spawn(1)[0]  # a child stream: the draws of rng itself are left as they were
    for r in np.flatnonzero(rng.random(len(requests)) < share).tolist():
        item = int(rng.choice(targets[r]))
        text = simulate_query(str(categories[item]), str(titles[item]), words_rng)
        if text:
            explicit = bool(rng.random() < 0.5)
            out[r] = replace(requests[r], query=text if explicit else None,
                             session_query=None if explicit else text)
    return out


@dataclass
class LabelledSet:
    """Labelled candidates of many requests, with their source flags (for ablations) and how
    many of the request's candidates each row stands for (1, or more for a sampled negative: the
    training profile of :mod:`graph.skew` is that of all candidates)."""

    data: RankingData
    sources: np.ndarray
    candidate_recall: float
    weights: np.ndarray

    def subset(self, requests: np.ndarray) -> LabelledSet:
        """The rows of the given requests (indices), in that order."""
        starts = np.concatenate([[0], np.cumsum(self.data.group)])
        rows = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in requests]) if len(
            requests) else np.zeros(0, dtype=np.int64)
        return LabelledSet(self.data.subset(requests), self.sources[rows], self.candidate_recall,
                           self.weights[rows])


def label(rec: Recommender, requests: Sequence[Request], targets: Sequence[np.ndarray],
          rng: np.random.Generator, negatives: int | None = None) -> LabelledSet:
    """Candidates and features of each request, labelled by its targets; at most ``negatives``
    (default :data:`NEGATIVES_PER_REQUEST`, read at call time so that ``bench/ranker_holdout.py
    --set`` reaches it) random negatives per request.

    Random, not hard, negatives: taking half of the negatives from a first ranker's best
    unbought candidates cost 9-31% recall@20 on held-out validation shoppers (README,
    "Ranking"), most likely because many of them are items the shopper buys later.
    """
    negatives = NEGATIVES_PER_REQUEST if negatives is None else negatives
    xs, ys, srcs, ws, group = [], [], [], [], []
    found = total = 0
    for req, tgt in zip(requests, targets, strict=True):
        p = rec.prepare(req)
        y = np.isin(p.candidates.items, tgt)
        found += int(y.sum())
        total += len(tgt)
        neg = np.flatnonzero(~y)
        w = np.ones(len(y))
        if len(neg) > negatives:
            keep = np.sort(np.concatenate([np.flatnonzero(y), rng.choice(neg, negatives, replace=False)]))
            w[neg] = len(neg) / negatives
        else:
            keep = np.arange(len(y))
        xs.append(p.x[keep])
        ws.append(w[keep])
        ys.append(y[keep].astype(np.float32))
        srcs.append(p.candidates.sources[keep])
        group.append(len(keep))
    data = RankingData(np.concatenate(xs), np.concatenate(ys), np.asarray(group, dtype=np.int64))
    return LabelledSet(data, np.concatenate(srcs), found / max(total, 1), np.concatenate(ws))


@dataclass
class ValidationRequests:
    """The requests the ranker is fitted on, their targets, and the shopper each stands for
    (an anonymous twin's is its original's; a request without one is its own, ``-1 - i``)."""

    requests: list[Request]
    targets: list[np.ndarray]
    shoppers: np.ndarray
    twins: int = 0


def validation_requests(batches: Sequence[QueryBatch], categories: np.ndarray, titles: np.ndarray,
                        rng: np.random.Generator, anonymous_share: float | None = None,
                        ) -> ValidationRequests:
    """The validation tasks' requests as the ranker is fitted on them: ``in_session`` with
    simulated searches (:func:`simulate_queries`), then the anonymous twins: a seeded
    ``anonymous_share`` (default :data:`ANONYMOUS_SHARE`) of the requests of
    :data:`ANONYMOUS_TASKS` asked again without their shopper, appended after all the
    originals (so the originals' negatives are drawn as without them).

    The twins are drawn from a child stream of ``rng``: its own draws are left as they were.
    """
    share = ANONYMOUS_SHARE if anonymous_share is None else anonymous_share
    requests: list[Request] = []
    targets: list[np.ndarray] = []
    eligible: list[bool] = []
    for q in batches:
        reqs = q.requests()
        if q.name == "in_session":
            reqs = simulate_queries(reqs, q.targets, categories, titles, rng)
        requests += reqs
        targets += q.targets
        eligible += [q.name in ANONYMOUS_TASKS] * len(reqs)
    shoppers = [-1 - i if r.user is None else int(r.user) for i, r in enumerate(requests)]
    n = len(requests)
    twins = 0
    if share > 0:
        # Spawned after simulate_queries spawned its own: that one's words stay as they were.
        twin_rng = rng.spawn(1)[0]
        for i in np.flatnonzero(np.asarray(eligible, dtype=bool)
                                & (twin_rng.random(n) < share)).tolist():
            if requests[i].user is None:
                continue
            requests.append(replace(requests[i], user=None))
            targets.append(targets[i])
            shoppers.append(shoppers[i])
            twins += 1
    return ValidationRequests(requests, targets, np.asarray(shoppers, dtype=np.int64), twins)


def fit_sets(rec: Recommender, requests: Sequence[Request], targets: Sequence[np.ndarray],
             rng: np.random.Generator, shoppers: np.ndarray | None = None,
             ) -> tuple[LabelledSet, LabelledSet]:
    """The labelled training and early-stopping sets of the validation requests
    (:func:`label`, :func:`split_requests` by ``shoppers``, see :class:`ValidationRequests`),
    as ``train_job.py`` and ``bench/ranker_holdout.py`` fit them."""
    lab = label(rec, requests, targets, rng)
    tr_idx, va_idx = split_requests(requests, rng, shoppers=shoppers)
    return lab.subset(tr_idx), lab.subset(va_idx)


def split_requests(requests: Sequence[Request], rng: np.random.Generator,
                   share: float | None = None, shoppers: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the early-stopping requests: a random ``share`` (default
    :data:`VALID_SHARE`) of the shoppers and all their requests go to early stopping (the
    shopper of each request is ``shoppers[i]`` when given, else its user; a request without
    one is its own shopper). With :data:`SPLIT_BY_SHOPPER` off, a random share of the
    requests instead.

    Split by request, a shopper's next-basket request and in-session baskets land on both
    sides, and early stopping rewards learning the shopper rather than the ranking: on the
    built-in data the early-stopping NDCG@20 kept rising to 600 rounds while held-out shoppers'
    recall did not (docs/PERFORMANCE.md, README "Ranking").
    """
    share = VALID_SHARE if share is None else share
    n = len(requests)
    if SPLIT_BY_SHOPPER:
        keys = np.asarray(shoppers, dtype=np.int64) if shoppers is not None else np.array(
            [-1 - i if r.user is None else int(r.user) for i, r in enumerate(requests)],
            dtype=np.int64)
        distinct = np.unique(keys)
        chosen = rng.permutation(distinct)[:max(1, round(share * len(distinct)))]
        valid = np.isin(keys, chosen)
    else:
        valid = np.zeros(n, dtype=bool)
        valid[rng.permutation(n)[:max(1, round(share * n))]] = True
    return np.flatnonzero(~valid), np.flatnonzero(valid)


def fit_on_validation(
    rec: Recommender,
    batches: Sequence[QueryBatch],
    *,
    seed: int = 0,
    ablations: Sequence[str] = tuple(ABLATIONS),
    anonymous_share: float | None = None,
    progress: Progress = print,
) -> dict[str, LearnedRanker]:
    """Fit the full ranker and the ablations on validation tasks.

    Args:
        rec: A recommender fitted only on events before the validation cut (its ``learned`` is
            not used).
        batches: Validation tasks (:func:`graph.tasks.next_basket_tasks`,
            :func:`graph.tasks.in_session_tasks` on the validation window).
        seed: Seed of the query simulation, negative sampling, split and LightGBM.
        ablations: Which of :data:`graph.ltr.ABLATIONS` to fit (``"full"`` always).
        anonymous_share: Share of anonymous twins (:func:`validation_requests`; default
            :data:`ANONYMOUS_SHARE`).
        progress: Called with one line per step.

    Returns:
        ``{ablation: LearnedRanker}``.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    v = validation_requests(batches, rec.catalogue.categories, rec.catalogue.titles, rng,
                            anonymous_share)
    requests = v.requests
    tr, va = fit_sets(rec, requests, v.targets, rng, shoppers=v.shoppers)
    tasks = ", ".join(f"{q.name} {len(q)}" for q in batches)
    twins = f" and {v.twins:,} anonymous twins" if v.twins else ""
    progress(f"[ranker] {len(requests) - v.twins:,} validation requests ({tasks}){twins}: "
             f"{len(tr.data.y) + len(va.data.y):,} labelled candidates, candidate recall "
             f"{tr.candidate_recall:.3f} ({time.perf_counter() - t0:.0f}s)")
    train, valid, tr_src, va_src = tr.data, va.data, tr.sources, va.sources
    out: dict[str, LearnedRanker] = {}
    for name in dict.fromkeys(("full", *ablations)):
        out[name] = fit_ranker(train, valid, ablation=name, sources=tr_src, valid_sources=va_src,
                               seed=seed, progress=progress)
    profile = training_profile(out["full"], requests, (tr, va), seed=seed)
    out["full"].profile = profile
    progress(f"[ranker] feature profile for skew monitoring: {len(profile.features)} features over "
             f"{profile.rows:,.0f} candidates; requests with a known shopper "
             f"{profile.mix['known_shopper']:.0%}, session items {profile.mix['session']:.0%}, "
             f"a search {profile.mix['query']:.0%}")
    return out


def training_profile(lr: LearnedRanker, requests: Sequence[Request], sets: Sequence[LabelledSet],
                     seed: int = 0) -> FeatureProfile:
    """The distribution of ``lr``'s features over all candidates of the validation requests
    (:class:`graph.skew.FeatureProfile`, from a seeded sample of the labelled rows weighted by
    what each stands for), and the requests' mix: what a serving replica's live counts are
    compared with."""
    cols = np.array([FEATURES.index(f) for f in lr.features], dtype=np.int64)
    picks = sample_rows([len(s.weights) for s in sets], seed=seed)
    x = np.concatenate([s.data.x[i][:, cols] for s, i in zip(sets, picks, strict=True)])
    w = np.concatenate([s.weights[i] for s, i in zip(sets, picks, strict=True)])
    total = float(sum(s.weights.sum() for s in sets))
    mix = request_mix([r.user is not None for r in requests], [bool(r.item_events) for r in requests],
                      [r.query is not None or r.session_query is not None for r in requests])
    return FeatureProfile.fit(x, lr.features, w, mix=mix, rows=total)
