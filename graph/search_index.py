"""The search index of a model's catalogue: words of item titles and category paths → items.

Built once per model version at load time (:class:`actors.loaded_model.LoadedModel`); used by the
ranker twice per request with search text: as a candidate source (items holding the words, most
popular first) and as a match bonus (the share of the query's words an item holds).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_TOKEN_RE = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset({"and", "or", "the", "of", "for", "with", "in", "to", "a", "oz", "ct", "lb"})


def _normalize(t: str) -> str | None:
    """One raw lower-case word → its index form (light plural stemming), or None to drop it."""
    if len(t) < 2 or t in _STOPWORDS:
        return None
    if len(t) > 4 and t.endswith("es") and not t.endswith("ses"):
        return t[:-2]
    if len(t) > 3 and t.endswith("s") and not t.endswith("ss"):
        return t[:-1]
    return t


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``, light plural stemming (``cereals`` → ``cereal``)."""
    return [n for n in map(_normalize, _TOKEN_RE.findall(text.lower())) if n is not None]


@dataclass
class TokenIndex:
    """Inverted index token → item indices (sorted), over titles and category paths."""

    postings: dict[str, np.ndarray]

    @classmethod
    def build(cls, titles: Sequence[str], categories: Sequence[str]) -> TokenIndex:
        """Index every item's title and category words."""
        acc: dict[str, list[int]] = {}
        norm: dict[str, str | None] = {}
        by_category: dict[str, list[str]] = {}
        findall = _TOKEN_RE.findall
        for i, (title, cat) in enumerate(zip(titles, categories, strict=True)):
            words = by_category.get(cat)
            if words is None:  # catalogues repeat category paths: tokenise each once
                words = by_category[cat] = findall(cat.lower())
            seen: set[str] = set()
            for w in (*findall(title.lower()), *words):
                if w not in norm:
                    norm[w] = _normalize(w)
                t = norm[w]
                if t is not None and t not in seen:
                    seen.add(t)
                    acc.setdefault(t, []).append(i)
        return cls({t: np.asarray(v, dtype=np.int64) for t, v in acc.items()})

    def match(self, tokens: Sequence[str], items: np.ndarray) -> np.ndarray:
        """Share of ``tokens`` each item of ``items`` contains. Shapes: ``[len(items)]``."""
        if not tokens:
            return np.zeros(len(items), dtype=np.float32)
        hits = np.zeros(len(items), dtype=np.float32)
        for t in tokens:
            post = self.postings.get(t)
            if post is not None:
                hits += np.isin(items, post, assume_unique=False)
        return hits / len(tokens)

    def candidates(self, tokens: Sequence[str], popularity: np.ndarray, k: int) -> np.ndarray:
        """Up to ``k`` items holding all tokens (else the most tokens), most popular first."""
        posts = [self.postings[t] for t in tokens if t in self.postings]
        if not posts:
            return np.zeros(0, dtype=np.int64)
        allof = posts[0]
        for p in posts[1:]:
            allof = np.intersect1d(allof, p, assume_unique=True)
        pool = allof if len(allof) else np.unique(np.concatenate(posts))
        if len(pool) > k:
            pool = pool[np.argpartition(-popularity[pool], k - 1)[:k]]
        return pool
