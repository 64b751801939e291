"""One model version as the ranker serves it: the artifact, its faiss index and catalogue columns.

A :class:`LoadedModel` is built completely (:meth:`LoadedModel.build`) before it is published and
is not changed afterwards (its category-prefix cache aside), so a request that read the reference
once finishes on the version it started with while a newer one is swapped in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.search_index import TokenIndex
from graph import schema as S
from graph.artifacts import ModelArtifact

if TYPE_CHECKING:  # torch and faiss stay out of processes that only pass requests
    from graph.ranking import Ranker

# Most popular items kept overall (a candidate source for every request) and per department.
POPULAR_K = 100
CONTEXT_PER_DEPT = 30


@dataclass
class LoadedModel:
    """One fully built model version (not changed once published, its prefix cache aside).

    Shapes:
        - **titles**, **categories**, **intent_labels** ``[I]`` object; **prices** ``[I]``.
        - **popular** ``[POPULAR_K]`` item indices, most popular first.
    """

    version: str
    artifact: ModelArtifact
    ranker: Ranker
    index: Any  # faiss.IndexFlatIP over the item embeddings
    item_index: dict[str, int]
    user_index: dict[str, int]
    item_ids: np.ndarray
    titles: np.ndarray
    categories: np.ndarray
    categories_lower: np.ndarray
    intent_labels: np.ndarray
    prices: np.ndarray
    popularity: np.ndarray
    popular: np.ndarray
    dept_popular: dict[int, np.ndarray]
    tokens: TokenIndex
    loaded_at: str
    build_seconds: float
    _category_cache: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.titles)

    def category_items(self, prefix: str) -> np.ndarray:
        """Item indices whose category path starts with ``prefix`` (case-insensitive), most
        popular first (cached per prefix; the cache is bounded)."""
        key = prefix.strip().lower()
        hit = self._category_cache.get(key)
        if hit is None:
            mask = np.char.startswith(self.categories_lower, key)
            idx = np.flatnonzero(mask)
            hit = idx[np.argsort(-self.popularity[idx], kind="stable")]
            if len(self._category_cache) > 1024:
                self._category_cache.clear()
            self._category_cache[key] = hit
        return hit

    @classmethod
    def build(cls, artifact: ModelArtifact) -> LoadedModel:
        """Everything a request needs from one artifact: the Ranker, the faiss index, the
        catalogue columns, popularity orders and the search index."""
        import faiss

        from graph.ranking import Ranker

        faiss.omp_set_num_threads(1)
        ranker = Ranker(artifact.user_emb, artifact.item_emb, artifact.signals)
        index = faiss.IndexFlatIP(ranker.item_emb.shape[1])
        index.add(ranker.item_emb)
        items = artifact.items
        titles = items[S.TITLE_COL].astype(str).to_numpy(dtype=object)
        categories = items[S.CATEGORY_COL].astype(str).to_numpy(dtype=object)
        sep = S.CATEGORY_SEP.strip()
        label_of = {c: S.CATEGORY_SEP.join(p.strip() for p in c.split(sep)[:2])
                    for c in set(categories.tolist())}
        intent_labels = np.array([label_of[c] for c in categories.tolist()], dtype=object)
        prices = items[S.PRICE_COL].astype("float64").to_numpy() if S.PRICE_COL in items else (
            np.full(len(items), np.nan))
        popularity = np.asarray(artifact.signals.popularity, dtype=np.float64)
        order = np.argsort(-popularity, kind="stable")
        depts = np.asarray(artifact.signals.item_department)
        dept_popular: dict[int, np.ndarray] = {}
        for d in np.unique(depts):
            in_d = order[depts[order] == d]
            dept_popular[int(d)] = in_d[:CONTEXT_PER_DEPT]
        return cls(
            version=artifact.version,
            artifact=artifact,
            ranker=ranker,
            index=index,
            item_index=artifact.item_index(),
            user_index=artifact.user_index(),
            item_ids=items[S.ITEM_COL].astype(str).to_numpy(dtype=object),
            titles=titles,
            categories=categories,
            categories_lower=np.array([c.lower() for c in categories.tolist()], dtype=str),
            intent_labels=intent_labels,
            prices=prices,
            popularity=popularity,
            popular=order[:POPULAR_K],
            dept_popular=dept_popular,
            tokens=TokenIndex.build(titles.tolist(), categories.tolist()),
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            build_seconds=0.0,
        )
