"""One recommendation, top to bottom: the function that serving, evaluation and benchmarks call.

    request ─▶ candidates (graph.retrieval) ─▶ features (graph.features)
            ─▶ learned ranker (graph.ltr) ─▶ top-k ─▶ per-component contributions

:class:`Recommender` is one model version ready to answer (ranker signals and embeddings, the
catalogue with its faiss index, per-item features and the LightGBM ranker). Offline evaluation
builds its requests from held-out data and calls :meth:`Recommender.prepare`,
:meth:`Recommender.score` (batched over requests) and :meth:`Recommender.select`, the three steps
of :meth:`Recommender.recommend`; the Serve replica (``actors/ranker.py``) calls
:meth:`Recommender.recommend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from graph import schema as S
from graph.errors import ArtifactError
from graph.features import FeatureRequest, build_features
from graph.ltr import Cascade, LearnedRanker
from graph.ranking import ContextSignal, Ranker, SessionSignal, session_signal
from graph.retrieval import CandidateSet, Catalogue, candidates, exclusions
from graph.search import QueryScores
from graph.text import ItemText, normalize_query


@dataclass(frozen=True)
class Request:
    """One recommendation request in model indices.

    Args:
        user: The user's row (None: unknown or forgotten).
        item_events: ``(item index, event, ts)`` of the session's catalogue items, oldest first.
        context: The request's context signal.
        now: The request time (unix seconds); session decay and repurchase timing use it.
        query: Search text of the request.
        session_query: Search text of the session's latest search.
        category: Category-path prefix the items must have.
        exclude: Item indices never to return (the session's cart is added).
        k: How many items.
    """

    user: int | None = None
    item_events: tuple[tuple[int, str, float], ...] = ()
    context: ContextSignal | None = None
    now: float = 0.0
    query: str | None = None
    session_query: str | None = None
    category: str | None = None
    exclude: np.ndarray | None = None
    k: int = S.TOP_K

    @property
    def session(self) -> SessionSignal | None:
        return session_signal(list(self.item_events), self.now) if self.item_events else None


@dataclass(frozen=True)
class Prepared:
    """A request's candidates and their feature rows. Shapes: ``x`` ``[n, len(FEATURES)]``."""

    request: Request
    session: SessionSignal | None
    candidates: CandidateSet
    x: np.ndarray


@dataclass(frozen=True)
class Ranked:
    """The answer: item indices, scores and (when asked) per-component contributions.

    Shapes:
        - **items**, **scores** ``[<= k]``.
    """

    items: np.ndarray
    scores: np.ndarray
    contributions: list[dict[str, float]] = field(default_factory=list)
    num_candidates: int = 0


@dataclass
class Recommender:
    """One model version, ready to answer.

    Args:
        ranker: Embeddings and non-parametric signals.
        catalogue: Items, faiss index, popularity orders, hybrid search index.
        item_static: Per-item features (:func:`graph.features.item_features`).
        learned: The LambdaRank ranker (None only while the ranker itself is being fitted:
            :meth:`prepare` works, :meth:`rank` needs one).
    """

    ranker: Ranker
    catalogue: Catalogue
    item_static: np.ndarray
    learned: LearnedRanker | None = None

    def __post_init__(self) -> None:
        emb = self.ranker.item_emb
        self.item_unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    @property
    def text(self) -> ItemText:
        """The catalogue's text embeddings."""
        return self.catalogue.search.text

    @classmethod
    def build(cls, items: pd.DataFrame, ranker: Ranker, item_static: np.ndarray,
              learned: LearnedRanker | None = None, *, text: ItemText) -> Recommender:
        return cls(ranker, Catalogue.build(items, ranker, text), item_static, learned)

    def search_scores(self, text: str | None) -> QueryScores | None:
        """Hybrid search scores of a search text (None for none or a blank one)."""
        if text is None or not text.strip():
            return None
        return self.catalogue.search.scores(text)

    def prepare(self, req: Request) -> Prepared:
        """Candidates and features of one request (exclusions and category filter applied)."""
        session = req.session
        query = self.search_scores(req.query)
        session_query = (None if req.session_query is not None and req.query is not None
                         and normalize_query(req.session_query) == normalize_query(req.query)
                         else self.search_scores(req.session_query))
        cand = candidates(
            self.ranker, self.catalogue, user=req.user, session=session,
            item_events=req.item_events, context=req.context,
            query=query, session_query=session_query,
            category=req.category, exclude=exclusions(req.exclude, req.item_events),
        )
        fr = FeatureRequest(req.user, session, req.context, req.now, query, session_query)
        x = build_features(self.ranker, self.catalogue, self.item_static, fr, cand, self.item_unit)
        return Prepared(req, session, cand, x)

    def _ranker(self, learned: LearnedRanker | None) -> LearnedRanker:
        lr = learned or self.learned
        if lr is None:
            raise ArtifactError("this recommender has no learned ranker; retrain with "
                                "`python train_job.py`")
        return lr

    def score(self, prepared: Sequence[Prepared], *, learned: LearnedRanker | None = None,
              ) -> list[Cascade]:
        """The ranker's scores of the candidates of several prepared requests, in one call (a
        batch of requests costs one LightGBM traversal per cascade stage, not one per stage and
        request: the early-exit cascade of :meth:`graph.ltr.LearnedRanker.cascade`).

        Returns:
            One :class:`graph.ltr.Cascade` per request: a score per candidate the ranker keeps
            (its sources, then the cascade's best), in the order of ``candidates.items``;
            ``-inf`` for dropped ones; the rows scored by every tree (indices into the
            request's candidates) and their leaves, for contributions.
        """
        lr = self._ranker(learned)
        keeps = [lr.keep_candidates(p.candidates.sources) for p in prepared]
        xs = [p.x if keep is None else p.x[keep] for p, keep in zip(prepared, keeps, strict=True)]
        if not xs:
            return []
        cas = lr.cascade(np.concatenate(xs), group=[len(x) for x in xs],
                         keep=[p.request.k for p in prepared])
        out, start = [], 0
        for p, keep, x in zip(prepared, keeps, xs, strict=True):
            s = cas.scores[start: start + len(x)]
            lo, hi = np.searchsorted(cas.rows, [start, start + len(x)])
            rows = cas.rows[lo:hi] - start
            start += len(x)
            if keep is not None:
                full = np.full(len(p.candidates), -np.inf, dtype=np.float32)
                full[keep] = s
                s, rows = full, np.flatnonzero(keep)[rows]
            out.append(Cascade(s, rows, cas.leaves[lo:hi]))
        return out

    def select(self, p: Prepared, scored: Cascade, *, learned: LearnedRanker | None = None,
               k: int | None = None, explain: bool = False) -> Ranked:
        """The top ``k`` (default: the request's) of scored candidates, with per-component
        contributions when ``explain`` (from the leaves the cascade reached: no second
        traversal)."""
        k = p.request.k if k is None else k
        scores = scored.scores
        ok = np.isfinite(scores)
        top = np.flatnonzero(ok)[top_k(scores[ok], p.candidates.items[ok], k)]
        contrib = (self._ranker(learned).contributions_of(scored.leaves_of(top))
                   if explain else [])
        return Ranked(p.candidates.items[top], scores[top], contrib, len(p.candidates))

    def rank(self, p: Prepared, *, learned: LearnedRanker | None = None, k: int | None = None,
             explain: bool = False) -> Ranked:
        """Score one prepared request and keep its top ``k`` (:meth:`score` + :meth:`select`)."""
        return self.select(p, self.score([p], learned=learned)[0], learned=learned, k=k,
                           explain=explain)

    def recommend(self, req: Request, *, explain: bool = True) -> Ranked:
        """Answer one request: :meth:`prepare`, :meth:`score`, :meth:`select`."""
        return self.rank(self.prepare(req), explain=explain)


def top_k(scores: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best scores, best first; ties go to the lower item index."""
    if len(scores) <= k:
        return np.lexsort((items, -scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((items[part], -scores[part]))]
