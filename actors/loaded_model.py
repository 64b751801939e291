"""One model version as the ranker replica serves it: the artifact and its
:class:`graph.recommend.Recommender`, plus the id maps of the API.

A :class:`LoadedModel` is built completely (:meth:`LoadedModel.build`) before it is published and
is not changed afterwards (the catalogue's category-prefix cache and the answers of
:class:`AnswerCache` aside), so a request that read the reference once finishes on the version it
started with while a newer one is swapped in.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from graph.artifacts import ModelArtifact

if TYPE_CHECKING:  # torch and faiss stay out of processes that only pass requests
    from graph.ranking import Ranker
    from graph.recommend import Recommender
    from graph.retrieval import Catalogue
    from graph.skew import SkewMonitor


NON_PERSONAL_ANSWERS = 1024
"""Answers an :class:`AnswerCache` keeps per model version (a few kB each)."""


class AnswerCache:
    """The answers of one model version to requests with nothing personal in them.

    A request without a known shopper, a session, a search or exclusions is answered from the
    model, the request's context signal (weekday, hour, holiday), ``k`` and the category alone:
    every anonymous first visit in the same hour gets the same list, so a replica ranks it once
    per model version. The same holds for an item's neighbours (``GET
    /v1/items/{item_id}/similar``), kept by item and ``k``.

    The cache belongs to one :class:`LoadedModel`: a new version, or items added with ``PUT
    /v1/items`` (which build a new one), start with an empty cache, so an answer is never served
    by a model that did not compute it. Least recently used answers go first beyond
    ``capacity``; the counters are those of ``functools.lru_cache``.
    """

    def __init__(self, capacity: int = NON_PERSONAL_ANSWERS) -> None:
        self.capacity = capacity
        self.hits = self.misses = 0
        self._answers: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> dict[str, Any] | None:
        """The answer kept for ``key`` (not to be modified: every caller gets the same dict)."""
        with self._lock:
            out = self._answers.get(key)
            if out is None:
                self.misses += 1
            else:
                self.hits += 1
                self._answers.move_to_end(key)
            return out

    def put(self, key: Hashable, answer: dict[str, Any]) -> None:
        with self._lock:
            self._answers[key] = answer
            self._answers.move_to_end(key)
            while len(self._answers) > self.capacity:
                self._answers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._answers)


@dataclass
class LoadedModel:
    """One fully built model version."""

    version: str
    artifact: ModelArtifact
    rec: Recommender
    item_index: dict[str, int]
    user_index: dict[str, int]
    loaded_at: str
    build_seconds: float
    base: ModelArtifact | None = None  # the version as trained, before added items
    added_items: int = 0  # items of PUT /v1/items applied on top of it
    # Item indices a PUT marked unavailable: excluded from every answer (sorted, unique).
    unavailable: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    answers: AnswerCache = field(default_factory=AnswerCache, repr=False, compare=False)
    # Live feature counts against the ranker's training profile (None: a ranker without one).
    skew: SkewMonitor | None = field(default=None, repr=False, compare=False)

    def exclusions(self, extra: np.ndarray) -> np.ndarray:
        """``extra`` item indices plus the unavailable ones."""
        return np.union1d(self.unavailable, extra) if len(self.unavailable) else extra

    @property
    def trained(self) -> ModelArtifact:
        """The version as trained (added items are applied on top of it again after a change)."""
        return self.base if self.base is not None else self.artifact

    @property
    def ranker(self) -> Ranker:
        return self.rec.ranker

    @property
    def catalogue(self) -> Catalogue:
        return self.rec.catalogue

    @property
    def num_items(self) -> int:
        return self.rec.catalogue.num_items

    @property
    def titles(self) -> np.ndarray:
        return self.rec.catalogue.titles

    @property
    def intent_labels(self) -> np.ndarray:
        return self.rec.catalogue.intent_labels

    @classmethod
    def build(cls, artifact: ModelArtifact) -> LoadedModel:
        """Everything a request needs from one artifact (:meth:`Recommender.build`)."""
        from graph.features import FEATURES
        from graph.ranking import Ranker
        from graph.recommend import Recommender
        from graph.skew import SkewMonitor

        ranker = Ranker(artifact.user_emb, artifact.item_emb, artifact.signals)
        rec = Recommender.build(artifact.items, ranker, artifact.item_static, artifact.learned,
                                text=artifact.text)
        profile = artifact.learned.profile
        return cls(
            version=artifact.version,
            artifact=artifact,
            rec=rec,
            item_index=artifact.item_index(),
            user_index=artifact.user_index(),
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            build_seconds=0.0,
            skew=None if profile is None else SkewMonitor(
                profile, [FEATURES.index(f) for f in profile.features]),
        )
