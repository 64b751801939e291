"""Hybrid search over one model version's catalogue: BM25 plus sentence-embedding similarity.

- **Lexical**: BM25 (``bm25s``, Lucene's variant with Elasticsearch's defaults ``k1 = 1.2``,
  ``b = 0.75``) over each item's title and category path, English stop words removed, words
  reduced by the Snowball English stemmer (PyStemmer): ``apple`` and ``APPLES`` are the same
  word. Documents are the distinct texts (many items share a title).
- **Semantic**: the cosine of the query's all-MiniLM-L6-v2 vector with each item's text vector
  (:class:`graph.text.ItemText`): ``soda`` finds ``SOFT DRINKS`` although no word is shared.
- **Fusion**: reciprocal-rank fusion (Cormack et al., SIGIR 2009; Elasticsearch's and Vespa's
  hybrid default), ``1 / (60 + lexical rank) + 1 / (60 + semantic rank)`` over the BM25 hits and
  the :data:`SEMANTIC_DEPTH` nearest texts. Ranks, not scores, are fused: BM25 and cosine live on
  scales that do not compare.

A request's search text gives one :class:`QueryScores` (LRU-cached per text in the
:class:`SearchIndex`); :mod:`graph.retrieval` takes its best items as candidates and
:mod:`graph.features` its three scores per candidate as ranker features.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from graph import schema as S
from graph.text import ItemText, TextEncoder, get_encoder, normalize_query

BM25_K1 = 1.2
BM25_B = 0.75
RRF_K = 60
SEMANTIC_DEPTH = 100
SCORE_CACHE = 2048


def _bm25s() -> Any:
    import bm25s

    # bm25s sets its own logger to DEBUG on import, which floods any handler the app installs.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def lexical_texts(items: pd.DataFrame) -> list[str]:
    """Each item's lexical document: its title and, unless the title holds it, its category."""
    cats = items[S.CATEGORY_COL].astype(str).tolist()
    titles = items[S.TITLE_COL].astype(str).tolist() if S.TITLE_COL in items else cats
    return [t if c in t else f"{t} {c}" for t, c in zip(titles, cats, strict=True)]


def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer("english")


def _bm25_index(docs: list[str], stemmer: Any) -> Any:
    """The BM25 index of the lexical documents, from the machine's cache (:mod:`graph.cache`)
    when it holds one for these documents and settings: tokenizing and indexing them takes about
    a second on the built-in catalogue, at every replica start."""
    from importlib import metadata

    from graph.cache import cached, digest

    bm25s = _bm25s()

    def build() -> Any:
        index = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
        index.index(bm25s.tokenize(docs, stopwords="en", stemmer=stemmer, show_progress=False),
                    show_progress=False)
        return index

    def load(path: Path) -> Any:
        index = bm25s.BM25.load(str(path), show_progress=False)
        if index.scores["num_docs"] != len(docs):
            raise ValueError(f"holds {index.scores['num_docs']} documents, not {len(docs)}")
        return index

    key = digest([f"bm25-lucene-{BM25_K1}-{BM25_B}-en", f"bm25s{metadata.version('bm25s')}",
                  f"pystemmer{metadata.version('PyStemmer')}", *docs])
    return cached("bm25", key, build,
                  lambda index, path: index.save(str(path), show_progress=False), load)


def analyze(texts: list[str], stemmer: Any) -> list[list[str]]:
    """Lower-cased word tokens (two characters or more), English stop words out, stemmed."""
    out: list[list[str]] = _bm25s().tokenize(texts, stopwords="en", stemmer=stemmer,
                                          return_ids=False, show_progress=False)
    return out


@dataclass(frozen=True)
class QueryScores:
    """One search text's scores over the catalogue's documents, read per item.

    The lexical side is sparse: a query matches a few hundred of the tens of thousands of lexical
    documents (median 323 of 31,895 on the built-in data), so a cached query holds about 20 kB
    (mostly its cosine per text) instead of 430 kB, and the index caches :data:`SCORE_CACHE` of them.

    Shapes:
        - **lex_docs** ``[H]`` int32, ascending: the documents with a BM25 score; **lex_score**
          ``[H]`` their BM25 divided by the query's best (0..1]; **lex_hit_rank** ``[H]`` their
          1-based rank; **semantic** ``[T]`` cosine per text vector; **sem_near** ``[D]`` the
          :data:`SEMANTIC_DEPTH` nearest texts, **sem_near_rank** ``[D]`` their 1-based rank;
          **lex_row** / **sem_row** ``[I]`` each item's document and text.
    """

    text: str
    num_docs: int
    lex_docs: np.ndarray
    lex_score: np.ndarray
    lex_hit_rank: np.ndarray
    semantic: np.ndarray
    sem_near: np.ndarray
    sem_near_rank: np.ndarray
    lex_row: np.ndarray
    sem_row: np.ndarray
    # The best items per k (and the popularity that broke ties), computed by the first request.
    _best: dict[int, tuple[np.ndarray, np.ndarray]] = field(
        init=False, repr=False, compare=False, default_factory=dict)

    def _per_doc(self, values: np.ndarray) -> np.ndarray:
        out = np.zeros(self.num_docs, dtype=values.dtype)
        out[self.lex_docs] = values
        return out

    @property
    def lexical(self) -> np.ndarray:
        """BM25 over the best per document, 0 for the unmatched. Shapes: ``[L]``."""
        return self._per_doc(self.lex_score)

    @property
    def lex_rank(self) -> np.ndarray:
        """1-based BM25 rank per document, 0 for the unmatched. Shapes: ``[L]``."""
        return self._per_doc(self.lex_hit_rank)

    @property
    def sem_rank(self) -> np.ndarray:
        """1-based rank per text among the nearest, 0 for the others. Shapes: ``[T]``."""
        out = np.zeros(len(self.semantic), dtype=np.int32)
        out[self.sem_near] = self.sem_near_rank
        return out

    def lexical_of(self, items: np.ndarray) -> np.ndarray:
        return self.lexical[self.lex_row[items]]

    def semantic_of(self, items: np.ndarray) -> np.ndarray:
        return self.semantic[self.sem_row[items]]

    def fused_of(self, items: np.ndarray) -> np.ndarray:
        """Reciprocal-rank fusion score of each item (0: in neither list). Shapes: ``[n]``."""
        lex = self._per_doc(_rrf(self.lex_hit_rank))[self.lex_row[items]]
        return lex + _rrf(self.sem_rank)[self.sem_row[items]]

    def hits(self, popularity: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` best items by :meth:`fused_of` over the whole catalogue, ties to the more
        popular (:meth:`top`). Computed once per query and ``k``: every later request with this
        query (the index caches its scores) reuses them.

        Shapes:
            - **popularity** ``[I]``; return ``[<= k]`` item indices.
        """
        memo = self._best.get(k)
        if memo is not None and memo[0] is popularity:
            return memo[1]
        out = self.top(self.fused_of(np.arange(len(self.lex_row))), popularity, k)
        out.setflags(write=False)  # shared by every request that hits the cache
        self._best[k] = (popularity, out)
        return out

    def top(self, score: np.ndarray, popularity: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` items of highest ``score`` (one per item: :meth:`fused_of`, :meth:`lexical_of`,
        ...), ties to the more popular; only items with a positive score."""
        pool = np.flatnonzero(score > 0)
        if len(pool) > k:  # every item at or above the k-th best score, then order them
            kth = np.partition(score[pool], len(pool) - k)[len(pool) - k]
            pool = pool[score[pool] >= kth]
        order = np.lexsort((-popularity[pool], -score[pool]))
        return pool[order[:k]]


class CacheInfo(NamedTuple):
    """Score-cache statistics, field for field those of ``functools.lru_cache``."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class SearchIndex:
    """The lexical index and the text vectors of one catalogue, with a per-text score cache.

    Args:
        items: The catalogue table (row = item index).
        text: Its embedded texts.
        encoder: Embeds queries (default: the process's shared :func:`graph.text.get_encoder`).
    """

    def __init__(self, items: pd.DataFrame, text: ItemText, encoder: TextEncoder | None = None
                 ) -> None:
        codes, uniques = pd.factorize(pd.Series(lexical_texts(items)), sort=False)
        self.text = text
        self.lex_row = codes.astype(np.int64)
        self.encoder = encoder or get_encoder()
        self._process_state()
        self._bm25 = _bm25_index(list(uniques), self._stemmer)
        self.num_docs = len(uniques)

    def _process_state(self) -> None:
        """What each process makes for itself: the stemmer (a C object), the lock and the score
        cache with its counts (set up here and after unpickling, never pickled)."""
        self._stemmer = _stemmer()
        self._cache: OrderedDict[str, QueryScores] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (into a Ray actor: :mod:`graph.parallel`) without :meth:`_process_state`'s
        objects; :meth:`__setstate__` makes new ones."""
        state = dict(self.__dict__)
        for name in ("_stemmer", "_lock", "_cache", "_hits", "_misses"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._process_state()

    def cache_info(self) -> CacheInfo:
        """Score-cache hits and misses since the last :meth:`cache_clear` (as ``functools``)."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, SCORE_CACHE, len(self._cache))

    def cache_clear(self) -> None:
        """Forget every cached query's scores and the counts (the query vectors stay cached in
        the encoder: ``encoder.embed_query.cache_clear()``)."""
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def scores(self, text: str) -> QueryScores:
        """Lexical, semantic and fused scores of one search text (cached per normalised text)."""
        key = normalize_query(text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return hit
            self._misses += 1
        out = self._score(key)
        with self._lock:
            self._cache[key] = out
            if len(self._cache) > SCORE_CACHE:
                self._cache.popitem(last=False)
        return out

    def _score(self, key: str) -> QueryScores:
        tokens = analyze([key], self._stemmer)[0]
        lex = (np.asarray(self._bm25.get_scores(tokens), dtype=np.float32) if tokens
               else np.zeros(self.num_docs, dtype=np.float32))
        best = float(lex.max()) if len(lex) else 0.0
        if best > 0:
            lex = lex / best
        docs = np.flatnonzero(lex > 0)
        sem = self.text.vectors @ self.encoder.embed_query(key)
        depth = min(SEMANTIC_DEPTH, len(sem))
        near = np.argpartition(-sem, depth - 1)[:depth] if depth else np.zeros(0, np.int64)
        return QueryScores(key, self.num_docs, docs.astype(np.int32), lex[docs],
                           _ranks(lex, docs)[docs], sem.astype(np.float32),
                           near.astype(np.int32), _ranks(sem, near)[near], self.lex_row,
                           self.text.item_row)


def _rrf(rank: np.ndarray) -> np.ndarray:
    """Reciprocal-rank fusion share ``1 / (RRF_K + rank)`` of 1-based ranks (0 for rank 0)."""
    return np.where(rank > 0, 1.0 / (RRF_K + np.maximum(rank, 1)), 0.0).astype(np.float32)


def _ranks(score: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """1-based rank by descending ``score`` of the entries ``keep``; 0 for the others."""
    out = np.zeros(len(score), dtype=np.int32)
    order = keep[np.argsort(-score[keep], kind="stable")]
    out[order] = np.arange(1, len(order) + 1)
    return out
