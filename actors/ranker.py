"""The GNN ranker: artifact → faiss index → candidates → ``graph.ranking.Ranker`` → reasons.

:class:`RankerService` is the whole ranker as a plain class (no Ray), so unit tests drive it on a
real small artifact; :class:`GNNRanker` is the Serve deployment around it.

A request is answered in four steps:

1. **Candidates** (a few hundred to a couple of thousand items, never the whole catalogue):
   inner-product neighbours of the user's long-term embedding and of the session embedding
   (faiss, exact), the user's buy-again items, item-to-item neighbours of the latest session
   items, popular items of the session's top intent categories, popular items overall and in the
   departments the request's context favours, and items matching the search text (a token index
   over titles and categories built at load time). Candidates only decide what gets scored; the
   order is the shared Ranker's.
2. **Scores** from :meth:`graph.ranking.Ranker.score` — the exact function the offline evaluation
   uses — plus, when there is search text, a match bonus (see :data:`QUERY_WEIGHT`).
3. **Top-k** through :func:`graph.ranking.top_k_from_scores` (exclusions: the request's
   ``exclude_items`` and what is in the session's cart).
4. **Reasons** from :meth:`graph.ranking.Ranker.explain`: the components that carried an item,
   each turned into a sentence ("because you added X to your cart", "you buy this every week",
   "popular on Saturday mornings").

Model swaps: a :class:`LoadedModel` is immutable and fully built (index included) before it is
published by one reference assignment; a request reads the reference once, so requests in flight
finish on the model they started with.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from actors.context import WEEKDAYS, infer_intent
from graph import schema as S
from graph.artifacts import ModelArtifact, read_artifact, resolve_version, set_latest_version
from graph.errors import IntentrecError, NotFoundError

if TYPE_CHECKING:  # heavy imports (torch, faiss) stay out of processes that only pass requests
    from graph.ranking import ContextSignal, Ranker, SessionSignal

log = logging.getLogger(__name__)

# Per source, how many candidates to take.
ANN_K = 100
POPULAR_K = 100
CONTEXT_DEPTS = 3
CONTEXT_PER_DEPT = 30
COOC_RECENT_ITEMS = 10
COOC_PER_ITEM = 50
BUY_AGAIN_K = 200
QUERY_K = 200
CATEGORY_K = 200
INTENT_CATEGORIES = 2
INTENT_PER_CATEGORY = 30
# A full search match adds this many standard deviations of the candidates' scores.
QUERY_WEIGHT = 2.0
# The session's latest search counts as an implicit query at this fraction of QUERY_WEIGHT.
SESSION_QUERY_FRACTION = 0.75
# A component is given as a reason when it carries at least this share of an item's positive score.
REASON_SHARE = 0.15
MAX_REASONS = 3
_TOKEN_RE = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset({"and", "or", "the", "of", "for", "with", "in", "to", "a", "oz", "ct", "lb"})

# One session event as the ingress sends it: (item_id, event, ts unix seconds, query).
WireEvent = tuple[str | None, str, float, str | None]


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


def short_title(title: str) -> str:
    """The readable end of a title: ``"GROCERY > CEREAL > KIDS CEREAL, 12 OZ"`` → ``"KIDS CEREAL,
    12 OZ"``."""
    return title.rsplit(S.CATEGORY_SEP, 1)[-1].strip() or title


def day_part(hour: int) -> str:
    """``mornings`` (5–11), ``afternoons`` (12–16), ``evenings`` (17–21) or ``nights``."""
    if 5 <= hour < 12:
        return "mornings"
    if 12 <= hour < 17:
        return "afternoons"
    if 17 <= hour < 22:
        return "evenings"
    return "nights"


def cadence_text(count: float, first: float, last: float) -> str:
    """Human wording of a purchase rhythm from the user's history of one item."""
    n = round(count)
    if n < 2:
        return "you bought this before"
    days = (last - first) / 86400.0 / (n - 1)
    if days <= 10:
        return "you buy this every week"
    if days <= 18:
        return "you buy this every couple of weeks"
    if days <= 40:
        return "you buy this every month"
    return f"you have bought this {n} times"


_VERB = {
    S.ADD_TO_CART: "added {t} to your cart",
    S.PURCHASE: "bought {t}",
    S.CLICK: "looked at {t}",
    S.VIEW: "viewed {t}",
}


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


class Tombstones:
    """Users forgotten through ``DELETE /v1/users/{id}``: their personal serving data (embedding,
    buy-again history) is not used again, by this replica or any other, also after a reload.

    Kept in an append-only file so every ranker replica sees a deletion on its next request
    (one ``stat`` per check) and a restarted replica still honours it. With no path it is
    in-memory only (unit tests).
    """

    def __init__(self, path: str | None) -> None:
        self.path = None if path is None else Path(path)
        self._users: set[str] = set()
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with self._lock:
                self._users = set(self.path.read_text().splitlines()) | self._users
                self._stamp = stamp

    def add(self, user_id: str) -> None:
        with self._lock:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    os.write(fd, (user_id + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._users.add(user_id)

    def __contains__(self, user_id: object) -> bool:
        self.refresh()
        return user_id in self._users


@dataclass(frozen=True, slots=True)
class RankQuery:
    """What the ingress sends the ranker for one recommendation (small: ids, not arrays).

    Args:
        user_id: The shopper, if known to the caller.
        events: The session's events, oldest first (see :data:`WireEvent`).
        context: ``graph.ranking.ContextSignal`` fields from the context enricher, or None.
        k: Items to return.
        query: Search text to blend in.
        exclude_items: Item ids never to return.
        category: Category-path prefix the items must have.
        now: Request time (unix seconds) for the recency of session events.
    """

    user_id: str | None = None
    events: tuple[WireEvent, ...] = ()
    context: dict[str, Any] | None = None
    k: int = S.TOP_K
    query: str | None = None
    exclude_items: tuple[str, ...] = ()
    category: str | None = None
    now: float | None = None


class RankerService:
    """The ranker without Ray: holds the current model, answers requests, swaps versions.

    Args:
        artifacts_root: Folder or URI holding model versions and ``LATEST``.
        model_version: ``"latest"`` or a version name.
        tombstones_path: File of forgotten users (None: in memory only).

    Raises:
        ArtifactError: no model under ``artifacts_root`` (with the ``python train_job.py`` hint).
        NotFoundError: ``model_version`` does not exist.
    """

    def __init__(
        self, artifacts_root: str, model_version: str = "latest", tombstones_path: str | None = None
    ) -> None:
        self.artifacts_root = artifacts_root
        self.model_version = model_version
        self.tombstones = Tombstones(tombstones_path)
        self._reload_lock = threading.Lock()
        self.model: LoadedModel = self.build(read_artifact(artifacts_root, model_version))

    # ------------------------------------------------------------------------------ loading
    @staticmethod
    def build(artifact: ModelArtifact) -> LoadedModel:
        """Build everything a request needs from one artifact (index included)."""
        import faiss

        from graph.ranking import Ranker

        t0 = time.perf_counter()
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
        model = LoadedModel(
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
        RankerService._warm_up(model)
        model.build_seconds = time.perf_counter() - t0
        return model

    @staticmethod
    def _warm_up(model: LoadedModel) -> None:
        """Answer one request on a model before it is published: the first call pays one-off
        costs (lazy imports, allocator warm-up), and a model that cannot answer is never swapped
        in."""
        probe = RankerService.__new__(RankerService)
        probe.tombstones = Tombstones(None)
        probe.model = model
        first = str(model.item_ids[int(model.popular[0])]) if len(model.popular) else None
        user = next(iter(model.user_index), None)
        events: tuple[WireEvent, ...] = () if first is None else ((first, S.VIEW, 0.0, None),)
        words = tokenize(str(model.titles[int(model.popular[0])])) if len(model.popular) else []
        probe.recommend(RankQuery(user_id=user, events=events, context={"weekday": 0, "hour": 12},
                                  k=5, query=words[0] if words else None))

    def target_version(self) -> str:
        """The version this service should serve now: the pinned one, or what ``LATEST`` says."""
        return resolve_version(self.artifacts_root, self.model_version)

    def reload(self, version: str | None = None) -> dict[str, Any]:
        """Load a version completely, then swap it in with one assignment.

        Args:
            version: Roll to this version: when following ``latest``, ``LATEST`` is moved to it
                first (so automatic pickup does not undo the rollback). None: reload what
                ``LATEST`` (or the pinned version) names.

        Returns:
            ``{"previous_version", "version", "swapped"}``.

        Raises:
            NotFoundError: ``version`` does not exist under the artifacts root.
        """
        with self._reload_lock:
            previous = self.model.version
            if version is not None:
                resolve_version(self.artifacts_root, version)
                if self.model_version == "latest":
                    set_latest_version(self.artifacts_root, version)
                target = version
            else:
                target = self.target_version()
            if target == previous:
                return {"previous_version": previous, "version": previous, "swapped": False}
            model = self.build(read_artifact(self.artifacts_root, target))
            self.model = model  # the swap: one reference; in-flight requests keep the old one
            log.info("model swapped: %s -> %s (built in %.1fs)", previous, model.version,
                     model.build_seconds)
            return {"previous_version": previous, "version": model.version, "swapped": True}

    def maybe_pick_up_latest(self) -> dict[str, Any] | None:
        """Reload when ``LATEST`` names another version (only when following ``latest``)."""
        if self.model_version != "latest":
            return None
        if self.target_version() == self.model.version:
            return None
        return self.reload()

    # ------------------------------------------------------------------------------ info
    def model_info(self) -> dict[str, Any]:
        """``GET /v1/model``: the version in use and its offline metrics."""
        m = self.model
        manifest = m.artifact.manifest
        return {
            "version": m.version,
            "created": manifest.get("created"),
            "loaded_at": m.loaded_at,
            "num_users": len(m.user_index),
            "num_items": m.num_items,
            "metrics": m.artifact.metrics,
            "data": manifest.get("data"),
        }

    def forget_user(self, user_id: str) -> None:
        """Never use the user's embedding or purchase history again (see :class:`Tombstones`)."""
        self.tombstones.add(user_id)

    def user_row(self, m: LoadedModel, user_id: str | None) -> int | None:
        """The user's row in the model, or None (unknown or forgotten)."""
        if user_id is None or user_id in self.tombstones:
            return None
        return m.user_index.get(user_id)

    # ------------------------------------------------------------------------------ requests
    def recommend(self, q: RankQuery) -> dict[str, Any]:
        """Answer one recommendation request (the body of ``RecommendationResponse`` minus the
        context display, which the ingress adds)."""
        from graph.ranking import session_signal, top_k_from_scores

        m = self.model  # read once: a swap during this request does not affect it
        now = q.now if q.now is not None else time.time()
        user = self.user_row(m, q.user_id)
        known_events = [(m.item_index.get(e[0]) if e[0] is not None else None, e[1], e[2])
                        for e in q.events]
        item_events = [(i, ev, ts) for i, ev, ts in known_events if i is not None and ev != S.SEARCH]
        session = session_signal(item_events, now) if item_events else None
        context = _context_signal(q.context)
        search_text = [e[3] for e in q.events if e[1] == S.SEARCH and e[3]]
        q_tokens = tokenize(q.query) if q.query else []
        s_tokens = [t for t in tokenize(search_text[-1]) if t not in q_tokens] if search_text else []

        intent = infer_intent(((e[0], e[1], e[2]) for e in q.events),
                              lambda it: _label(m, it), now)
        cand = self._candidates(m, user, session, item_events, context, q_tokens + s_tokens,
                                q.category, [c for c, _ in intent[:INTENT_CATEGORIES]])
        if q.category:
            cand = cand[np.char.startswith(m.categories_lower[cand], q.category.strip().lower())]
        exclude = self._exclusions(m, q.exclude_items, item_events)
        base = {"model_version": m.version, "user_known": user is not None,
                "session_events": len(q.events),
                "intent": [{"category": c, "weight": round(w, 4)} for c, w in intent]}
        if len(cand) == 0:
            return {**base, "items": []}

        scores = m.ranker.score([user], [session], [context], candidates=cand)[0]
        bonus = np.zeros(len(cand), dtype=np.float32)
        spread = float(np.std(scores)) or 1.0
        if q_tokens:
            bonus += QUERY_WEIGHT * spread * m.tokens.match(q_tokens, cand)
        if s_tokens:
            bonus += SESSION_QUERY_FRACTION * QUERY_WEIGHT * spread * m.tokens.match(s_tokens, cand)
        total = scores + bonus
        idx, vals = top_k_from_scores(total[None, :], q.k, [exclude], cand)
        keep = idx[0] >= 0
        top, top_scores = idx[0][keep], vals[0][keep]
        bonus_of = dict(zip(cand.tolist(), bonus.tolist(), strict=True))
        contributions = m.ranker.explain(user, session, context, top) if len(top) else []
        why = Reasons.build(m, user, session, item_events, context,
                            q.query or (search_text[-1] if search_text else None), top)
        items = []
        for it, sc, contrib in zip(top.tolist(), top_scores.tolist(), contributions, strict=True):
            if bonus_of.get(it, 0.0) > 0:
                contrib = {**contrib, "query": bonus_of[it]}
            items.append(self._item_out(m, it, sc, why.for_item(it, contrib)))
        return {**base, "items": items}

    def similar(self, item_id: str, k: int = S.TOP_K) -> dict[str, Any]:
        """Item-to-item neighbours: co-occurrence and embedding neighbours, scored by the shared
        Ranker with the item as a one-item session.

        Raises:
            NotFoundError: the item is not in the model's catalogue.
        """
        from graph.ranking import SessionSignal, top_k_from_scores

        m = self.model
        i = m.item_index.get(item_id)
        if i is None:
            raise NotFoundError(
                f"item {item_id!r} is not in the catalogue of model {m.version}; similar items "
                "need a catalogue item (events for unknown items are still accepted)",
                field="item_id",
            )
        sim = m.ranker.signals.item_sim
        co = sim.indices[sim.indptr[i]: sim.indptr[i + 1]]
        # Inner product, like the Ranker's session component the candidates are scored with.
        _, ann = m.index.search(m.ranker.item_emb[i: i + 1], ANN_K)
        cand = np.unique(np.concatenate([co, ann[0][ann[0] >= 0]]).astype(np.int64))
        cand = cand[cand != i]
        if len(cand) == 0:
            cand = m.popular[m.popular != i]
        session = SessionSignal(np.array([i], dtype=np.int64), np.array([1.0], dtype=np.float32))
        scores = m.ranker.score([None], [session], [None], candidates=cand)
        idx, vals = top_k_from_scores(scores, k, None, cand)
        keep = idx[0] >= 0
        top, top_scores = idx[0][keep], vals[0][keep]
        co_set = set(co.tolist())
        name = short_title(str(m.titles[i]))
        items = []
        for it, sc in zip(top.tolist(), top_scores.tolist(), strict=True):
            reason = (f"often bought together with {name}" if it in co_set
                      else f"similar to {name}")
            items.append(self._item_out(m, it, sc, [reason]))
        return {"item_id": item_id, "model_version": m.version, "items": items}

    # ------------------------------------------------------------------------------ internals
    def _candidates(
        self, m: LoadedModel, user: int | None, session: SessionSignal | None,
        item_events: list[tuple[int, str, float]], context: ContextSignal | None,
        tokens: list[str], category: str | None, intent: Sequence[str] = (),
    ) -> np.ndarray:
        r = m.ranker
        parts: list[np.ndarray] = [m.popular]
        queries = []
        if user is not None:
            queries.append(r.user_emb[user])
            parts.append(_buy_again(r, user))
        if session is not None and not session.is_empty:
            w = session.weights.astype(np.float32)
            queries.append((w / max(float(np.abs(w).sum()), 1e-12)) @ r.item_emb[session.items])
            recent: list[int] = []
            for i, ev, _ in reversed(item_events):
                if ev != S.REMOVE_FROM_CART and i not in recent:
                    recent.append(i)
                if len(recent) >= COOC_RECENT_ITEMS:
                    break
            sim = r.signals.item_sim
            for i in recent:
                row = slice(sim.indptr[i], sim.indptr[i + 1])
                nb, val = sim.indices[row], sim.data[row]
                if len(nb) > COOC_PER_ITEM:
                    nb = nb[np.argpartition(-val, COOC_PER_ITEM - 1)[:COOC_PER_ITEM]]
                parts.append(nb.astype(np.int64))
        if queries:
            _, ann = m.index.search(np.stack(queries).astype(np.float32), ANN_K)
            parts.append(ann[ann >= 0].astype(np.int64))
        if context is not None:
            lift = r.signals.context_lift[context.weekday, context.hour]
            if context.is_holiday:
                lift = lift + r.signals.holiday_lift
            for d in np.argsort(-lift)[:CONTEXT_DEPTS]:
                parts.append(m.dept_popular.get(int(d), np.zeros(0, dtype=np.int64)))
        if tokens:
            parts.append(m.tokens.candidates(tokens, m.popularity, QUERY_K))
        if category:
            parts.append(m.category_items(category)[:CATEGORY_K])
        for label in intent:
            parts.append(m.category_items(label)[:INTENT_PER_CATEGORY])
        return np.unique(np.concatenate(parts).astype(np.int64))

    @staticmethod
    def _exclusions(
        m: LoadedModel, exclude_items: Iterable[str], item_events: list[tuple[int, str, float]]
    ) -> np.ndarray:
        """Requested exclusions (unknown ids ignored) plus what the session's cart holds."""
        out = {m.item_index[x] for x in exclude_items if x in m.item_index}
        cart: dict[int, int] = {}
        for i, ev, _ in item_events:
            if ev in (S.ADD_TO_CART, S.PURCHASE):
                cart[i] = cart.get(i, 0) + 1
            elif ev == S.REMOVE_FROM_CART:
                cart[i] = cart.get(i, 0) - 1
        out |= {i for i, n in cart.items() if n > 0}
        return np.fromiter(out, dtype=np.int64, count=len(out))

    @staticmethod
    def _item_out(m: LoadedModel, it: int, score: float, reasons: list[str]) -> dict[str, Any]:
        price = float(m.prices[it])
        return {
            "item_id": str(m.item_ids[it]),
            "score": round(float(score), 6),
            "title": str(m.titles[it]),
            "category": str(m.categories[it]),
            "price": None if math.isnan(price) else round(price, 2),
            "reasons": reasons,
        }


@dataclass
class Reasons:
    """Turns an item's component contributions into sentences, for one request.

    The session item behind a "because you ..." reason is found for all top items at once: the
    session item with the largest weighted co-occurrence (``cooc``) or embedding affinity
    (``session``) with the recommended item.
    """

    m: LoadedModel
    user: int | None
    context: ContextSignal | None
    query: str | None
    item_events: list[tuple[int, str, float]]
    cooc_src: dict[int, int] = field(default_factory=dict)
    session_src: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(
        cls, m: LoadedModel, user: int | None, session: SessionSignal | None,
        item_events: list[tuple[int, str, float]], context: ContextSignal | None,
        query: str | None, top: np.ndarray,
    ) -> Reasons:
        out = cls(m, user, context, query, item_events)
        if session is None or session.is_empty or len(top) == 0:
            return out
        w = np.maximum(session.weights.astype(np.float32), 0.0)[:, None]
        r = m.ranker
        co = r.signals.item_sim[session.items][:, top].toarray() * w
        em = (r.item_emb[session.items] @ r.item_emb[top].T) * w
        for strength, dest in ((co, out.cooc_src), (em, out.session_src)):
            best = strength.argmax(axis=0)
            ok = strength[best, np.arange(len(top))] > 0
            dest.update({int(t): int(session.items[b])
                         for t, b, good in zip(top.tolist(), best.tolist(), ok.tolist(),
                                               strict=True) if good})
        return out

    def for_item(self, it: int, contrib: dict[str, float]) -> list[str]:
        """Sentences for the components that carried the item (largest first)."""
        positive = {c: v for c, v in contrib.items() if v > 0}
        total = sum(positive.values())
        out: list[str] = []
        for comp, v in sorted(positive.items(), key=lambda cv: -cv[1]):
            if total > 0 and v / total < REASON_SHARE:
                break
            text = self.text(comp, it)
            if text and text not in out:
                out.append(text)
            if len(out) >= MAX_REASONS:
                break
        return out or ["popular with shoppers"]

    def text(self, comp: str, it: int) -> str | None:
        """The sentence for one component of one item (None: nothing true to say)."""
        m = self.m
        if comp == "repeat" and self.user is not None:
            sig = m.ranker.signals
            lo, hi = sig.hist_indptr[self.user], sig.hist_indptr[self.user + 1]
            pos = lo + np.flatnonzero(sig.hist_indices[lo:hi] == it)
            if len(pos):
                p = int(pos[0])
                return cadence_text(float(sig.hist_count[p]), float(sig.hist_first[p]),
                                    float(sig.hist_last[p]))
            return "you bought this before"
        if comp in ("cooc", "session"):
            src = (self.cooc_src if comp == "cooc" else self.session_src).get(it)
            if src is None:
                return None
            event = _strongest_event(src, self.item_events)
            return "because you " + _VERB.get(event, _VERB[S.VIEW]).format(
                t=short_title(str(m.titles[src])))
        if comp == "gnn":
            return "picked for you from your shopping history"
        if comp == "pop":
            return "popular with shoppers"
        if comp == "context" and self.context is not None:
            if self.context.is_holiday:
                return "popular on public holidays"
            return f"popular on {WEEKDAYS[self.context.weekday]} {day_part(self.context.hour)}"
        if comp == "query" and self.query:
            return f"matches your search “{self.query}”"
        return None


def _context_signal(fields: dict[str, Any] | None) -> ContextSignal | None:
    """``graph.ranking.ContextSignal`` from the enricher's fields (extra fields are ignored, so an
    enricher and a ranker of neighbouring releases still talk during a rolling update)."""
    if fields is None:
        return None
    import dataclasses

    from graph.ranking import ContextSignal

    names = {f.name for f in dataclasses.fields(ContextSignal)}
    return ContextSignal(**{k: v for k, v in fields.items() if k in names})


def _label(m: LoadedModel, item_id: str) -> str | None:
    i = m.item_index.get(item_id)
    return None if i is None else str(m.intent_labels[i])


def _strongest_event(item: int, item_events: list[tuple[int, str, float]]) -> str:
    best, best_w = S.VIEW, -1.0
    for i, ev, _ in item_events:
        if i == item and S.EVENT_WEIGHTS.get(ev, 0.0) > best_w:
            best, best_w = ev, S.EVENT_WEIGHTS[ev]
    return best


def _buy_again(r: Ranker, user: int) -> np.ndarray:
    sig = r.signals
    lo, hi = sig.hist_indptr[user], sig.hist_indptr[user + 1]
    items = sig.hist_indices[lo:hi].astype(np.int64)
    if len(items) > BUY_AGAIN_K:
        items = items[np.argpartition(-sig.hist_weight[lo:hi], BUY_AGAIN_K - 1)[:BUY_AGAIN_K]]
    return items


# ------------------------------------------------------------------------------ deployment
@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    max_constructor_retry_count=3,
    health_check_period_s=10,
)
class GNNRanker:
    """Serve deployment around :class:`RankerService`.

    A background thread polls ``LATEST`` every ``reload_poll_s`` seconds (0 turns automatic
    pickup off) and swaps in a new version once it is fully loaded.

    Args:
        artifacts_root: Folder or URI with model versions (absolute, resolved by ``build_app``).
        model_version: ``"latest"`` or a version name (pinned: no automatic pickup).
        reload_poll_s: Seconds between checks of ``LATEST``; 0 = never.
        tombstones_path: File of forgotten users shared by the replicas.
    """

    def __init__(
        self,
        artifacts_root: str,
        model_version: str = "latest",
        reload_poll_s: float = 30.0,
        tombstones_path: str | None = None,
    ) -> None:
        _limit_threads()
        self.service = RankerService(artifacts_root, model_version, tombstones_path)
        _freeze_gc()
        self._stop = threading.Event()
        self._metrics = _RankerMetrics()
        self._metrics.model_swapped(None, self.service.model.version)
        self.reload_poll_s = reload_poll_s
        if reload_poll_s > 0 and model_version == "latest":
            threading.Thread(target=self._watch, name="latest-watcher", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.reload_poll_s):
            try:
                res = self.service.maybe_pick_up_latest()
                if res and res["swapped"]:
                    _freeze_gc()
                    self._metrics.model_swapped(res["previous_version"], res["version"])
            except Exception:  # a bad new artifact must not take the serving one down
                log.exception("automatic model pickup failed; still serving %s",
                              self.service.model.version)

    async def recommend(self, q: RankQuery) -> dict[str, Any]:
        """Rank for one request (see :meth:`RankerService.recommend`)."""
        t0 = time.perf_counter()
        out = self.service.recommend(q)
        self._metrics.latency.observe((time.perf_counter() - t0) * 1000.0)
        return out

    async def similar(self, item_id: str, k: int) -> dict[str, Any]:
        """Item neighbours (see :meth:`RankerService.similar`)."""
        return self.service.similar(item_id, k)

    async def model_info(self) -> dict[str, Any]:
        """The model in use and its offline metrics."""
        return self.service.model_info()

    async def forget_user(self, user_id: str) -> None:
        """Stop using the user's personal data (all replicas, persistently)."""
        self.service.forget_user(user_id)

    async def reload(self, version: str | None = None) -> dict[str, Any]:
        """Load a version in a worker thread (requests keep being served), then swap."""
        res = await asyncio.to_thread(self.service.reload, version)
        if res["swapped"]:
            _freeze_gc()
            self._metrics.model_swapped(res["previous_version"], res["version"])
        return res

    def check_health(self) -> None:
        """Serve health check: a replica without a model is unhealthy."""
        if self.service.model is None:  # pragma: no cover - build() raises instead
            raise IntentrecError("no model loaded")

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when __init__ failed
        if stop is not None:
            stop.set()


class _RankerMetrics:
    def __init__(self) -> None:
        from ray.serve.metrics import Gauge, Histogram

        self.latency = Histogram(
            "intentrec_ranker_latency_ms", "Ranker time per recommendation (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
        )
        self.version = Gauge("intentrec_model_version_info",
                             "1 for the model version this replica serves", tag_keys=("version",))

    def model_swapped(self, previous: str | None, version: str) -> None:
        if previous is not None:
            self.version.set(0, tags={"version": previous})
        self.version.set(1, tags={"version": version})


def _freeze_gc() -> None:
    """Move the loaded model out of the garbage collector's sight.

    A model holds a few hundred thousand tracked objects (id maps, token postings); a full
    collection walks them all, about 150 ms with the built-in catalogue, stalling whatever
    request triggered it. Frozen objects are still freed by reference counting when a swapped-out
    model is dropped.
    """
    import gc

    gc.freeze()


def _limit_threads() -> None:
    """One compute thread per replica: replicas share few cores and must not oversubscribe them."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
