"""The GNN ranker replica: loads, caches and swaps model versions; answers with
:meth:`graph.recommend.Recommender.recommend`, the function offline evaluation also calls.

:class:`RankerService` is the whole ranker as a plain class (no Ray), so unit tests drive it on a
real small artifact; :class:`GNNRanker` is the Serve deployment around it. Per request it only
translates ids to indices and back, and the per-component contributions of the top items into
sentences (:mod:`actors.explain`).

Model swaps: a :class:`~actors.loaded_model.LoadedModel` is immutable once published by one
reference assignment; a request reads the reference once, so requests in flight finish on the
model they started with.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from actors.added_items import AddedItems, Stamp
from actors.catalogue import catalogue_listing, shopper_sample
from actors.context import infer_intent
from actors.deployment_options import RANKER, options
from actors.explain import Reasons, short_title
from actors.loaded_model import AnswerCache, LoadedModel
from actors.split import SplitConfig, in_split, parse_rollout
from actors.tombstones import Tombstones
from graph import schema as S
from graph.artifacts import (
    ModelArtifact,
    has_latest,
    list_versions,
    read_artifact,
    resolve_version,
    set_latest_version,
    versions_with_user,
)
from graph.errors import BadRequestError, IntentrecError, NotFoundError, UnavailableError
from graph.forgotten import record_name

if TYPE_CHECKING:  # heavy imports (torch, faiss) stay out of processes that only pass requests
    from graph.new_items import NewItem
    from graph.ranking import ContextSignal

log = logging.getLogger(__name__)

ITEMS_POLL_S = 1.0
"""Seconds between a replica's listings of the added-items folder (``PUT /v1/items``)."""

SKEW_PUBLISH_EVERY = 8
"""A replica's feature-skew gauge is set at the first binned request and every this many after."""

NO_MODEL = "none (cold start: no model trained yet)"
"""``model_version`` of answers given before the first model exists (first boot)."""

# One session event as the ingress sends it: (item_id, event, ts unix seconds, query).
WireEvent = tuple[str | None, str, float, str | None]


@dataclass(frozen=True, slots=True)
class RankQuery:
    """What the ingress sends the ranker for one recommendation (small: ids, not arrays).

    Args:
        user_id: The shopper, if known to the caller.
        session_id: The session, when the request names one (the key of a traffic split when
            there is no user: :mod:`actors.split`).
        events: The session's events, oldest first (see :data:`WireEvent`).
        context: ``graph.ranking.ContextSignal`` fields from the context enricher, or None.
        k: Items to return.
        query: Search text to blend in.
        exclude_items: Item ids never to return.
        category: Category-path prefix the items must have.
        now: The request time (unix seconds): ``context.ts`` or the server clock, taken once by
            the ingress. Every time-dependent part of the answer uses it (session decay,
            intent). None: the newest session event's time; the ranker never reads a clock.
    """

    user_id: str | None = None
    session_id: str | None = None
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
        items_path: Folder of items added with ``PUT /v1/items`` (:class:`AddedItems`; None: in
            memory only). They are applied on top of every version served.

    Raises:
        ArtifactError: no model under ``artifacts_root`` (with the ``python train_job.py`` hint).
        NotFoundError: ``model_version`` does not exist.
    """

    def __init__(
        self, artifacts_root: str, model_version: str = "latest", tombstones_path: str | None = None,
        cold_start: bool = False, items_path: str | None = None,
    ) -> None:
        self.artifacts_root = artifacts_root
        self.model_version = model_version
        self.tombstones = Tombstones(tombstones_path)
        self.added = AddedItems(items_path)
        self._items_stamp: Stamp | None = None  # the added items the served model holds
        self._text_cache: dict[str, Any] = {}  # item text -> MiniLM vector, across rebuilds
        self._reload_lock = threading.RLock()
        self._staged: LoadedModel | None = None  # validated by prepare(), not yet serving
        self._staged_stamp: Stamp | None = None
        self._rejected: set[str] = set()  # versions that failed to load (not retried by polling)
        self._listing: tuple[LoadedModel, dict[str, Any]] | None = None
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        # Told "kept" or "ranked" for each request with nothing personal (the replica's metric).
        self.on_answer: Callable[[str], None] | None = None
        # Told (version, PSI by feature) every SKEW_PUBLISH_EVERY-th binned request (the
        # replica's gauge); monitor_skew False: ranked requests are not counted (a warm-up).
        self.on_skew: Callable[[str, dict[str, float]], None] | None = None
        self.monitor_skew = True
        self.model: LoadedModel | None = None
        # A running A/B split and its model, published together by one assignment (a request
        # reads the pair once, like self.model).
        self._split: tuple[SplitConfig, LoadedModel] | None = None
        if cold_start and model_version == "latest" and not has_latest(artifacts_root):
            # First boot: nothing trained yet. Answer without a model until LATEST appears.
            log.warning("no model under %s yet: serving the cold-start answer (%s) until the "
                        "first `python train_job.py` publishes one", artifacts_root, NO_MODEL)
        else:
            self.model, self._items_stamp = self._load(read_artifact(artifacts_root, model_version))

    @property
    def version(self) -> str:
        """The version served now, or :data:`NO_MODEL` before the first model."""
        return NO_MODEL if self.model is None else self.model.version

    @property
    def split(self) -> SplitConfig | None:
        """The A/B split running now (:mod:`actors.split`), or None."""
        pair = self._split
        return None if pair is None else pair[0]

    def versions_served(self) -> list[str]:
        """Every version that answers requests now: the main one, and a split's."""
        pair = self._split
        return [self.version] + ([] if pair is None else [pair[1].version])

    def model_for(self, q: RankQuery) -> LoadedModel | None:
        """The model that answers ``q``: the split's when the request's user (or session) falls
        in its share, else the main one."""
        m, pair = self.model, self._split
        if m is None or pair is None:
            return m
        return pair[1] if in_split(pair[0], q.user_id, q.session_id) else m

    # ------------------------------------------------------------------------------ loading
    @staticmethod
    def build(artifact: ModelArtifact) -> LoadedModel:
        """Build everything a request needs from one artifact and answer one request with it."""
        t0 = time.perf_counter()
        model = LoadedModel.build(artifact)
        RankerService._warm_up(model)
        model.build_seconds = time.perf_counter() - t0
        return model

    def _load(self, artifact: ModelArtifact, extra: Sequence[NewItem] = ()
              ) -> tuple[LoadedModel, Stamp]:
        """:meth:`build` of ``artifact`` with the stored added items (and ``extra``) on top.

        Returns:
            The model and the listing of the added-items folder it holds (taken before reading
            them: a record written meanwhile changes the listing, so it is picked up next time).
        """
        stamp = self.added.stamp()
        items = {it.item_id: it for it in self.added.load()}
        for it in extra:
            items[it.item_id] = it
        if items and artifact.item_encoder is None:
            if extra:
                raise BadRequestError(
                    f"model version {artifact.version} has no item encoder (written by an older "
                    "release), so it cannot embed a new item: retrain with `python "
                    "train_job.py`, then add the item again", field="item_id")
            log.warning("model version %s has no item encoder: serving it without the %d "
                        "added items until a retrained version", artifact.version, len(items))
            items = {}
        try:
            served = self._with_items(artifact, [items[k] for k in sorted(items)])
        except Exception:
            if extra:  # the PUT fails; nothing was stored
                raise
            # A stored record this version cannot apply must not keep the replica from serving.
            log.exception("added items cannot be applied to model version %s: serving it "
                          "without them", artifact.version)
            served, items = artifact, {}
        model = self.build(served)
        model.base, model.added_items = artifact, len(items)
        model.unavailable = np.unique(np.fromiter(
            (model.item_index[k] for k, it in items.items() if not it.available), dtype=np.int64))
        model.answers = AnswerCache()  # nothing ranked before the unavailable items were known
        return model, stamp

    def _with_items(self, artifact: ModelArtifact, items: list[NewItem]) -> ModelArtifact:
        if not items:
            return artifact
        from graph.new_items import new_item_texts, with_items
        from graph.text import get_encoder

        texts = new_item_texts(items)
        missing = sorted({t for t in texts if t not in self._text_cache})
        if missing:
            for t, v in zip(missing, get_encoder().encode(missing), strict=True):
                self._text_cache[t] = v
        return with_items(artifact, items, np.stack([self._text_cache[t] for t in texts]))

    @staticmethod
    def _warm_up(model: LoadedModel) -> None:
        """Answer one request on a model before it is published: the first call pays one-off
        costs (lazy imports, allocator warm-up), and a model that cannot answer is never swapped
        in."""
        probe = RankerService.__new__(RankerService)
        probe.tombstones = Tombstones(None)
        probe.model = model
        probe._split = None
        probe.on_answer = None  # a warm-up is no served request: not counted
        probe.on_skew, probe.monitor_skew = None, False
        cat = model.catalogue
        top = int(cat.popular[0]) if len(cat.popular) else None
        first = None if top is None else str(cat.item_ids[top])
        user = next(iter(model.user_index), None)
        # A cart item: the exclusion path (and its compiled kernels, graph.kernels) runs too.
        events: tuple[WireEvent, ...] = () if first is None else (
            (first, S.ADD_TO_CART, 0.0, None),)
        # A query too: the sentence model is loaded and the query path warmed before publishing.
        words = [] if top is None else str(cat.categories[top]).split()
        probe.recommend(RankQuery(user_id=user, events=events, context={"weekday": 0, "hour": 12},
                                  k=5, query=words[-1] if words else None))

    def target_version(self) -> str:
        """The version this service should serve now: the pinned one, or what ``LATEST`` says."""
        return resolve_version(self.artifacts_root, self.model_version)

    def prepare(self, version: str | None = None) -> str:
        """Load and warm up a version without serving it: the validation a rollout runs before
        ``LATEST`` or any replica moves. The model is kept for the :meth:`switch_to` that follows.

        Args:
            version: The version to check; None: :meth:`target_version`.

        Returns:
            The version name.

        Raises:
            NotFoundError: No such complete version under the artifacts root.
            BadRequestError: The version exists but cannot be loaded or cannot answer a request
                (field ``version``); nothing changes, the current model keeps serving.
        """
        with self._reload_lock:
            target = version or self.target_version()
            resolve_version(self.artifacts_root, target)
            staged, pair = self._staged, self._split
            if target == self.version or (staged is not None and staged.version == target) \
                    or (pair is not None and pair[1].version == target):
                return target
            try:
                model, stamp = self._load(read_artifact(self.artifacts_root, target))
            except NotFoundError:
                raise
            except Exception as exc:
                self._rejected.add(target)
                raise BadRequestError(
                    f"model version {target!r} cannot be served: loading it or answering a "
                    f"warm-up request failed ({type(exc).__name__}: {exc}); still serving "
                    f"{self.version}. Retrain with `python train_job.py`, or roll back to "
                    f"one of {list_versions(self.artifacts_root)}",
                    field="version",
                ) from exc
            self._rejected.discard(target)
            self._staged, self._staged_stamp = model, stamp
            return target

    def switch_to(self, version: str) -> dict[str, Any]:
        """Serve ``version`` from now on (loaded by :meth:`prepare` first when it is not yet).

        Returns:
            ``{"previous_version", "version", "swapped"}``.
        """
        with self._reload_lock:
            previous = self.version
            if version == previous:
                return {"previous_version": previous, "version": previous, "swapped": False}
            pair = self._split
            from_split = pair is not None and pair[1].version == version
            model = self._obtain(version)
            self.model = model  # the swap: one reference; in-flight requests keep the old one
            # A model taken over from the split may predate the latest added items: no stamp
            # makes the items watcher rebuild it once.
            self._items_stamp = None if from_split else self._staged_stamp
            pair = self._split
            if pair is not None and pair[0].version == version:
                self._split = None  # the split's version is now everyone's: the split is over
                log.info("split ended: its version %s now serves every request", version)
            log.info("model swapped: %s -> %s (built in %.1fs)", previous, model.version,
                     model.build_seconds)
            return {"previous_version": previous, "version": model.version, "swapped": True}

    def _obtain(self, version: str) -> LoadedModel:
        """A built model of ``version``: the one a running split holds, else :meth:`prepare`'s
        (loaded now when it is not staged yet). Call with ``_reload_lock`` held."""
        pair = self._split
        if pair is not None and pair[1].version == version:
            return pair[1]
        if self.model is not None and self.model.version == version:
            return self.model
        self.prepare(version)
        model, self._staged = self._staged, None
        assert model is not None and model.version == version
        return model

    def set_split(self, split: SplitConfig | None) -> None:
        """Start, change or stop the A/B split: its version is loaded and warmed first
        (:meth:`prepare`), then published with one assignment. A split naming the version
        everyone gets already is no split.

        Raises:
            NotFoundError: No such version.
            BadRequestError: The version cannot be served; the split in place stays.
        """
        with self._reload_lock:
            if split is None or split.version == self.version or self.model is None:
                if self._split is not None:
                    log.info("split stopped: every request gets %s", self.version)
                self._split = None
                return
            model = self._obtain(split.version)
            self._split = (split, model)
            log.info("split: %.1f%% of users (salt %r) get %s, the others %s",
                     100 * split.share, split.salt, split.version, self.version)

    def reload(self, version: str | None = None) -> dict[str, Any]:
        """Validate a version (:meth:`prepare`), then swap it in with one assignment.

        Args:
            version: Roll to this version: when following ``latest``, ``LATEST`` is moved to it
                once it has loaded and answered (so automatic pickup does not undo the rollback,
                and a broken version never becomes ``LATEST``). None: reload what ``LATEST``
                (or the pinned version) names.

        Returns:
            ``{"previous_version", "version", "swapped"}``.

        Raises:
            NotFoundError: ``version`` does not exist under the artifacts root.
            BadRequestError: ``version`` cannot be served (see :meth:`prepare`).
        """
        target = self.prepare(version)
        if version is not None and self.model_version == "latest":
            set_latest_version(self.artifacts_root, version)
        return self.switch_to(target)

    def apply_rollout(self, config: dict[str, Any]) -> dict[str, Any]:
        """Serve what a rollout asks for (the ranker deployment's ``user_config``).

        ``{"version": v}``: a pinned service pins ``v``; a service following ``latest`` loads
        what ``LATEST`` names, which the rollout moved to ``v`` before it pushed the config (a
        replica started later, after a newer training run, then does not go back to ``v``).
        ``"split": {"version", "share", "salt"}`` also serves a second version to a share of the
        users (:mod:`actors.split`); without it, a running split stops.

        Raises:
            BadRequestError: Not a rollout config (field ``user_config...``), or a version that
                cannot be served.
        """
        rollout = parse_rollout(config)
        with self._reload_lock:
            if self.model_version != "latest":
                self.model_version = rollout.version
            res = self.switch_to(self.target_version())
            self.set_split(rollout.split)
        return res

    def maybe_pick_up_latest(self) -> dict[str, Any] | None:
        """Reload when ``LATEST`` names another version (only when following ``latest``). A
        version that failed to load is not tried again by polling (an explicit reload still
        tries it)."""
        if self.model_version != "latest":
            return None
        if self.model is None and not has_latest(self.artifacts_root):
            return None  # still before the first model
        target = self.target_version()
        if target == self.version or target in self._rejected:
            return None
        return self.switch_to(target)

    # ------------------------------------------------------------------------------ new items
    def upsert_item(self, item: NewItem) -> dict[str, Any]:
        """``PUT /v1/items/{id}``: :meth:`upsert_items` of one item.

        Returns:
            ``{"item_id", "created", "model_version", "num_items", "added_items"}``.
        """
        out = self.upsert_items([item])
        return {"item_id": item.item_id, "created": out["created"] == 1,
                **{k: out[k] for k in ("model_version", "num_items", "added_items")}}

    def upsert_items(self, items: Sequence[NewItem]) -> dict[str, Any]:
        """``PUT /v1/items`` (and one item's ``PUT /v1/items/{id}``): embed the items with the
        served version's item encoder, store them, and serve them here at once (other replicas
        pick them up with :meth:`maybe_pick_up_items`). A batch costs one catalogue rebuild,
        whatever its size.

        The model with the items is built (and answers a warm-up request) before any record is
        written: items that cannot be served are refused and stored nowhere. During an A/B
        split the split's version is rebuilt with them as well.

        Args:
            items: Ids unique (the API checks it).

        Returns:
            ``{"created", "updated", "model_version", "num_items", "added_items"}``: counts of
            new ids and of ids the catalogue had.

        Raises:
            UnavailableError: No model has been trained yet.
            BadRequestError: The served version has no item encoder.
        """
        with self._reload_lock:
            m = self.model
            if m is None:
                raise UnavailableError(
                    "no model has been trained yet, so a new item cannot be embedded: wait for "
                    "the first training job (`ray job list`), or run `python train_job.py`")
            created = sum(it.item_id not in m.item_index for it in items)
            model, before = self._load(m.trained, extra=items)
            for it in items:
                self.added.put(it)
            after = self.added.stamp()
            mine = {record_name(it.item_id) for it in items}
            pair = self._split
            # The split's version serves its share of shoppers: it gets the stored items too (a
            # version that cannot embed them serves without them, as at its start).
            arm = None if pair is None else (pair[0], self._load(pair[1].trained)[0])
            # The listing now differs from `before` by these records only, unless another
            # replica wrote one meanwhile: then keep the old listing, and the watcher reloads.
            same = [e for e in before if e[0] not in mine] == [e for e in after if e[0] not in mine]
            self.model = model
            if arm is not None:
                self._split = arm
            self._items_stamp = after if same else before
        log.info("%d items added and %d updated (model %s, %d added items)", created,
                 len(items) - created, model.version, model.added_items)
        return {"created": created, "updated": len(items) - created,
                "model_version": model.version, "num_items": model.num_items,
                "added_items": model.added_items}

    def maybe_pick_up_items(self) -> bool:
        """Rebuild the served version with the stored added items when the folder changed (an
        item put through another replica). Returns whether it did."""
        m = self.model
        if m is None or self.added.stamp() == self._items_stamp:
            return False
        with self._reload_lock:
            m = self.model
            assert m is not None
            if self.added.stamp() == self._items_stamp:
                return False
            model, stamp = self._load(m.trained)
            pair = self._split
            if pair is not None:  # the split's version gets them too
                self._split = (pair[0], self._load(pair[1].trained)[0])
            self.model, self._items_stamp = model, stamp
        log.info("added items picked up: %d on model %s", model.added_items, model.version)
        return True

    # ------------------------------------------------------------------------------ info
    def model_info(self) -> dict[str, Any]:
        """``GET /v1/model``: the version in use and its offline metrics."""
        m = self.model
        if m is None:
            return {"version": NO_MODEL, "created": None, "loaded_at": self.started_at,
                    "num_users": 0, "num_items": 0, "metrics": {}, "data": None, "gate": None}
        manifest = m.artifact.manifest
        return {
            "version": m.version,
            "created": manifest.get("created"),
            "loaded_at": m.loaded_at,
            "num_users": len(m.user_index),
            "num_items": m.num_items,
            "metrics": m.artifact.metrics,
            "data": manifest.get("data"),
            "gate": manifest.get("gate"),
            "split": self.split_info(),
            "context_columns": {c: len(v) for c, v in m.artifact.signals.attribute_lift.items()},
            "feature_skew": _skew_info(m),
        }

    def split_info(self) -> dict[str, Any] | None:
        """The running split (``actors.split.SplitOut``), or None."""
        pair = self._split
        if pair is None:
            return None
        split, b = pair
        return {**split.model_dump(), "created": b.artifact.manifest.get("created"),
                "loaded_at": b.loaded_at, "metrics": b.artifact.metrics,
                "feature_skew": _skew_info(b)}

    def catalogue(self) -> dict[str, Any]:
        """``GET /v1/catalogue``: departments and categories of the model in use (cached per
        version; see :func:`actors.catalogue.catalogue_listing`)."""
        m = self.model
        if m is None:
            return {"model_version": NO_MODEL, "num_items": 0, "departments": []}
        cached = self._listing
        if cached is None or cached[0] is not m:  # per model object: added items rebuild it
            cached = (m, catalogue_listing(m))
            self._listing = cached
        return cached[1]

    def shoppers(self) -> dict[str, Any]:
        """``GET /v1/catalogue/shoppers``: a sample of the users the model in use knows."""
        m = self.model
        if m is None:
            return {"model_version": NO_MODEL, "users": []}
        return {"model_version": m.version, "users": shopper_sample(m, self.tombstones)}

    def forget_user(self, user_id: str) -> dict[str, Any]:
        """Never use the user's embedding or purchase history again (see :class:`Tombstones`).

        Returns:
            ``{"model_versions": [...]}``: the versions under the artifacts root that still hold
            them (not used for serving from now on; left out by the next ``train_job.py``,
            which reads the same forgotten-users file).
        """
        self.tombstones.add(user_id)  # durable before the answer: serving stops first
        return {"model_versions": versions_with_user(self.artifacts_root, user_id)}

    def user_row(self, m: LoadedModel, user_id: str | None) -> int | None:
        """The user's row in the model, or None (unknown or forgotten)."""
        if user_id is None or user_id in self.tombstones:
            return None
        return m.user_index.get(user_id)

    # ------------------------------------------------------------------------------ requests
    def recommend(self, q: RankQuery) -> dict[str, Any]:
        """Answer one recommendation request (the body of ``RecommendationResponse`` minus the
        context display, which the ingress adds)."""
        from graph.recommend import Request

        m = self.model_for(q)  # read once: a swap during this request does not affect it
        if m is None:  # first boot: no catalogue yet, so nothing personal and no items
            return {"model_version": NO_MODEL, "user_known": False,
                    "session_events": len(q.events), "intent": [], "items": []}
        user = self.user_row(m, q.user_id)
        context = _context_signal(q.context)
        if context is not None:  # a device or region the model has no lift for is dropped
            context = context.for_signals(m.ranker.signals)
        # Nothing personal (no known shopper, session, search or exclusion): the answer depends
        # on the context signal, k and the category only, so it is ranked once per model
        # version and kept (actors.loaded_model.AnswerCache).
        key = ((context, q.k, q.category) if user is None and not q.events and q.query is None
               and not q.exclude_items else None)
        if key is not None:
            kept = m.answers.get(key)
            if self.on_answer is not None:
                self.on_answer("ranked" if kept is None else "kept")
            if kept is not None:
                return kept
        now = q.now if q.now is not None else max((e[2] for e in q.events), default=0.0)
        item_events = tuple(
            (i, ev, ts) for i, ev, ts in
            ((m.item_index.get(e[0]) if e[0] is not None else None, e[1], e[2]) for e in q.events)
            if i is not None and ev != S.SEARCH
        )
        searches = [e[3] for e in q.events if e[1] == S.SEARCH and e[3]]
        exclude = np.fromiter((m.item_index[x] for x in q.exclude_items if x in m.item_index),
                              dtype=np.int64)
        req = Request(user=user, item_events=item_events, context=context, now=now,
                      query=q.query, session_query=searches[-1] if searches else None,
                      category=q.category,
                      exclude=m.exclusions(exclude), k=q.k)
        prepared = m.rec.prepare(req)  # Recommender.recommend, with the session kept for reasons
        skew = m.skew if self.monitor_skew else None
        if skew is not None and skew.observe(
                prepared.x, user=user is not None, session=bool(item_events),
                query=req.query is not None or req.session_query is not None,
        ) and self.on_skew is not None and skew.sampled % SKEW_PUBLISH_EVERY == 1:
            self.on_skew(m.version, skew.psi())
        ranked = m.rec.rank(prepared, explain=True)
        intent = infer_intent(((e[0], e[1], e[2]) for e in q.events), lambda it: _label(m, it), now)
        why = Reasons.build(m, user, prepared.session, list(item_events), context,
                            q.query or (searches[-1] if searches else None), ranked.items)
        items = [self._item_out(m, it, sc, why.for_item(it, contrib))
                 for it, sc, contrib in zip(ranked.items.tolist(), ranked.scores.tolist(),
                                            ranked.contributions, strict=True)]
        out = {"model_version": m.version, "user_known": user is not None,
               "session_events": len(q.events),
               "intent": [{"category": c, "weight": round(w, 4)} for c, w in intent],
               "items": items}
        if key is not None:
            m.answers.put(key, out)
        return out

    def similar(self, item_id: str, k: int = S.TOP_K) -> dict[str, Any]:
        """Item-to-item neighbours: the recommender's answer to an anonymous session that viewed
        only this item.

        Raises:
            NotFoundError: the item is not in the model's catalogue.
        """
        from graph.recommend import Request

        m = self.model
        if m is None:
            raise UnavailableError(
                "no model has been trained yet, so there are no item neighbours: wait for the "
                "first training job (`ray job list`), or run `python train_job.py`")
        i = m.item_index.get(item_id)
        if i is None:
            raise NotFoundError(
                f"item {item_id!r} is not in the catalogue of model {m.version}; similar items "
                "need a catalogue item (events for unknown items are still accepted)",
                field="item_id",
            )
        key = ("similar", i, k)  # the same for everyone: ranked once per model version
        if (kept := m.answers.get(key)) is not None:
            return kept
        ranked = m.rec.recommend(Request(item_events=((i, S.VIEW, 0.0),), now=0.0,
                                         exclude=m.exclusions(np.array([i])), k=k),
                                 explain=False)
        sim = m.ranker.signals.item_sim
        co_set = set(sim.indices[sim.indptr[i]: sim.indptr[i + 1]].tolist())
        name = short_title(str(m.titles[i]))
        items = [self._item_out(m, it, sc, [f"often bought together with {name}" if it in co_set
                                            else f"similar to {name}"])
                 for it, sc in zip(ranked.items.tolist(), ranked.scores.tolist(), strict=True)]
        out = {"item_id": item_id, "model_version": m.version, "items": items}
        m.answers.put(key, out)
        return out

    @staticmethod
    def _item_out(m: LoadedModel, it: int, score: float, reasons: list[str]) -> dict[str, Any]:
        cat = m.catalogue
        price = float(cat.prices[it])
        return {
            "item_id": str(cat.item_ids[it]),
            "score": round(float(score), 6),
            "title": str(cat.titles[it]),
            "category": str(cat.categories[it]),
            "price": None if math.isnan(price) else round(price, 2),
            "reasons": reasons,
        }


def _skew_info(m: LoadedModel) -> dict[str, Any]:
    """``feature_skew`` of ``GET /v1/model``: this replica's live features against the ranker's
    training profile since the version was loaded (:class:`graph.skew.SkewMonitor`)."""
    if m.skew is None:
        return {"status": "no profile", "detail": f"model version {m.version} was trained by a "
                "release that kept no feature profile; retrain with `python train_job.py` to "
                "monitor training-serving skew"}
    return {**m.skew.report(), "since": m.loaded_at}


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


# ------------------------------------------------------------------------------ deployment
@serve.deployment(**options(RANKER))
class GNNRanker:
    """Serve deployment around :class:`RankerService`.

    A background thread polls ``LATEST`` every ``reload_poll_s`` seconds (0 turns automatic
    pickup off) and swaps in a new version once it is fully loaded.

    Args:
        artifacts_root: Folder or URI with model versions (absolute, resolved by ``build_app``).
        model_version: ``"latest"`` or a version name (pinned: no automatic pickup).
        reload_poll_s: Seconds between checks of ``LATEST``; 0 = never.
        tombstones_path: File of forgotten users shared by the replicas.
        items_path: Folder of items added with ``PUT /v1/items`` shared by the replicas; a
            second thread lists it every :data:`ITEMS_POLL_S` seconds.
    """

    def __init__(
        self,
        artifacts_root: str,
        model_version: str = "latest",
        reload_poll_s: float = 30.0,
        tombstones_path: str | None = None,
        items_path: str | None = None,
    ) -> None:
        _limit_threads()
        self.service = RankerService(artifacts_root, model_version, tombstones_path,
                                     cold_start=True, items_path=items_path)
        _freeze_gc()
        self._stop = threading.Event()
        self._metrics = _RankerMetrics()
        self.service.on_answer = self._metrics.answered
        self.service.on_skew = self._metrics.skew
        self._metrics.serving(self.service.versions_served())
        self.reload_poll_s = reload_poll_s
        if reload_poll_s > 0 and model_version == "latest":
            threading.Thread(target=self._watch, name="latest-watcher", daemon=True).start()
        if items_path is not None:
            threading.Thread(target=self._watch_items, name="items-watcher", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.reload_poll_s):
            try:
                res = self.service.maybe_pick_up_latest()
                if res:
                    self._swapped(res)
            except Exception:  # a bad new artifact must not take the serving one down
                log.exception("automatic model pickup failed; still serving %s",
                              self.service.version)

    def _watch_items(self) -> None:
        while not self._stop.wait(ITEMS_POLL_S):
            try:
                if self.service.maybe_pick_up_items():
                    _freeze_gc()
            except Exception:  # a bad record must not take the serving model down
                log.exception("picking up added items failed; still serving the previous ones")

    async def upsert_item(self, item: NewItem) -> dict[str, Any]:
        """Add or update a catalogue item (see :meth:`RankerService.upsert_item`), in a worker
        thread: requests keep being served while the catalogue is rebuilt."""
        out = await asyncio.to_thread(self.service.upsert_item, item)
        _freeze_gc()
        return out

    async def upsert_items(self, items: list[NewItem]) -> dict[str, Any]:
        """Add or update many catalogue items with one rebuild (see
        :meth:`RankerService.upsert_items`), in a worker thread."""
        out = await asyncio.to_thread(self.service.upsert_items, items)
        _freeze_gc()
        return out

    async def recommend(self, q: RankQuery) -> dict[str, Any]:
        """Rank for one request (see :meth:`RankerService.recommend`)."""
        t0 = time.perf_counter()
        out = self.service.recommend(q)
        self._metrics.latency.observe((time.perf_counter() - t0) * 1000.0)
        return out

    async def recommend_many(self, queries: list[RankQuery]) -> list[dict[str, Any] | Exception]:
        """Rank several requests in one call (the ingress coalesces its calls): one answer per
        query, in order. A query that fails gets its error in its place; the others are answered."""
        out: list[dict[str, Any] | Exception] = []
        for q in queries:
            t0 = time.perf_counter()
            try:
                out.append(self.service.recommend(q))
            except Exception as exc:  # this request's own failure (a 4xx, or a bug): not the batch's
                if not isinstance(exc, IntentrecError):
                    log.exception("ranking one request of a batch failed")
                out.append(exc)
            self._metrics.latency.observe((time.perf_counter() - t0) * 1000.0)
        return out

    async def similar(self, item_id: str, k: int) -> dict[str, Any]:
        """Item neighbours (see :meth:`RankerService.similar`)."""
        return self.service.similar(item_id, k)

    async def model_info(self) -> dict[str, Any]:
        """The model in use and its offline metrics."""
        return self.service.model_info()

    async def catalogue(self) -> dict[str, Any]:
        """Departments and categories (see :meth:`RankerService.catalogue`)."""
        return self.service.catalogue()

    async def shoppers(self) -> dict[str, Any]:
        """Known shoppers (see :meth:`RankerService.shoppers`)."""
        return self.service.shoppers()

    async def forget_user(self, user_id: str) -> dict[str, Any]:
        """Stop using the user's personal data (all replicas, persistently) and list the model
        versions that still hold it (see :meth:`RankerService.forget_user`), in a worker thread
        (one ``users.parquet`` column per version): requests keep being served meanwhile."""
        return await asyncio.to_thread(self.service.forget_user, user_id)

    async def reload(self, version: str | None = None) -> dict[str, Any]:
        """Load a version in a worker thread (requests keep being served), then swap."""
        return self._swapped(await asyncio.to_thread(self.service.reload, version))

    async def prepare(self, version: str | None = None) -> str:
        """Validate a version for a rollout: load it and answer a warm-up request, in a worker
        thread, without serving it (see :meth:`RankerService.prepare`)."""
        return await asyncio.to_thread(self.service.prepare, version)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's hook for a changed ``user_config``, called on every replica (and on every new
        one after ``__init__``): ``{"version": v}`` from a rollout (:mod:`actors.rollout`), with
        ``"split"`` while an A/B split runs (:mod:`actors.split`)."""
        split = self.service.split
        self._swapped(await asyncio.to_thread(self.service.apply_rollout, user_config))
        if self.service.split != split:
            _freeze_gc()
            self._metrics.serving(self.service.versions_served())

    async def serving(self) -> dict[str, Any]:
        """This replica's id, the version it serves and its split (rollout checks and tests)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "version": self.service.version, "split": self.service.split_info()}

    def _swapped(self, res: dict[str, Any]) -> dict[str, Any]:
        if res["swapped"]:
            _freeze_gc()
            self._metrics.serving(self.service.versions_served())
        return res

    def check_health(self) -> None:
        """Serve health check: a replica that started is healthy, also before the first model
        (it then serves the cold-start answer)."""

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when __init__ failed
        if stop is not None:
            stop.set()


class _RankerMetrics:
    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.latency = Histogram(
            "intentrec_ranker_latency_ms", "Ranker time per recommendation (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
        )
        self.version = Gauge("intentrec_model_version_info",
                             "1 for the model version this replica serves", tag_keys=("version",))
        self.answers = Counter(
            "intentrec_nonpersonal_answers",
            "Recommendations with nothing personal, by answer: kept (from the replica's cache of "
            "the model version) or ranked", tag_keys=("answer",))
        # Ray's stubs type tag_keys as a 1-tuple; any tuple of names is accepted.
        self.psi = Gauge(
            "intentrec_feature_psi",
            "Population stability index of each ranker feature on this replica's ranked "
            "requests since the version was loaded, against the ranker's training candidates "
            "(over 0.25: a major shift)",
            tag_keys=("version", "feature"))  # type: ignore[arg-type]
        self._served: set[str] = set()

    def answered(self, answer: str) -> None:
        self.answers.inc(tags={"answer": answer})

    def skew(self, version: str, psi: dict[str, float]) -> None:
        for feature, value in psi.items():
            if math.isfinite(value):
                self.psi.set(value, tags={"version": version, "feature": feature})

    def serving(self, versions: list[str]) -> None:
        """1 for each version this replica serves (two while a split runs), 0 for the others it
        served before."""
        for v in self._served.difference(versions):
            self.version.set(0, tags={"version": v})
        for v in versions:
            self.version.set(1, tags={"version": v})
        self._served = set(versions)


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
