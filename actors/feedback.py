"""The feedback loop's online half: what each recommendation response showed, and the clicks and
add-to-carts that come back with its ``request_id`` (``from_request`` on an event).

Each ingress replica remembers its recent responses (:class:`Impressions`, bounded, newest kept)
and exports Prometheus counters through Ray's metrics agent (:class:`FeedbackMetrics`), tagged
with the model version and the 1-based position, so that click-through and add-to-cart rates per
version are one division in Prometheus or Grafana::

    sum by (model_version) (rate(ray_intentrec_clicks_total[5m]))
      / sum by (model_version) (rate(ray_intentrec_impressions_total[5m]))

Serve's proxy sends a click to any ingress replica, not to the one that answered. So every
replica also hands its responses, in batches, to one shared :class:`ImpressionBook` actor
(:class:`SharedImpressions`), and a click the replica cannot credit from its own memory is looked
up there. An event whose response nobody remembers (older than the book holds, sent within
:data:`SHARE_EVERY_S` of its answer to another replica, or while the book restarts) is still
accepted; it is counted with ``model_version="unknown"``, never credited to a wrong version. The
offline half, exporting accepted events for retraining, is :mod:`graph.online_events`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray

from graph import schema as S

log = logging.getLogger("intentrec.feedback")

DEFAULT_CAPACITY = 100_000
FLUSH_EVERY_S = 1.0  # impressions reach the Ray counters at most this late (FeedbackMetrics)
UNKNOWN_VERSION = "unknown"
SHARE_EVERY_S = 0.2  # a replica's responses reach the shared book at most this late
LOOKUP_TIMEOUT_S = 0.5  # longest wait for the shared book when crediting one event
WARN_EVERY_S = 60.0  # a replica warns about the shared book at most this often
# Event types credited to the response they came from, and the counter each one feeds.
CREDITED = {S.CLICK: "clicks", S.ADD_TO_CART: "add_to_cart"}


def new_request_id() -> str:
    """A fresh ``request_id``: 32 lowercase hex digits (``actors.api.REQUEST_ID_PATTERN``)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Attribution:
    """What an event is credited to: the version that answered and the item's position there
    (None: the response did not show the item)."""

    model_version: str
    position: int | None


# A response's item ids as kept: joined by Impressions.SEP, or a tuple when an id holds it.
Packed = str | tuple[str, ...]


class Impressions:
    """Recent responses of one replica: ``request_id -> (model_version, item ids shown)``.

    A response is kept compactly, as its 16-byte request id and one string of its item ids
    (joined by a control character, which no API id may hold), about 0.39 KB for 20 items; a
    dict of positions per response took 1.8 KB. The position is found when an event is credited,
    which is rare next to responses.

    Args:
        capacity: Responses kept; the oldest is dropped first. The default 100,000 responses of
            20 items take about 39 MB (``tests/unit/test_feedback.py`` measures it).
    """

    SEP = "\x1f"  # the unit separator: refused in ids by ``actors.api`` (control characters)

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"impressions capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._shown: OrderedDict[bytes, tuple[str, str | tuple[str, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(request_id: str) -> bytes:
        try:
            return bytes.fromhex(request_id) if len(request_id) == 32 else request_id.encode()
        except ValueError:  # not hex (ids are validated by the API; keep any other one exact)
            return request_id.encode()

    @classmethod
    def pack(cls, item_ids: Sequence[str]) -> Packed:
        """The item ids as kept: one joined string (a catalogue id with the separator in it,
        not from the API, keeps the plain tuple)."""
        return (tuple(item_ids) if any(cls.SEP in i for i in item_ids)
                else cls.SEP.join(item_ids))

    def record(self, request_id: str, model_version: str, item_ids: Sequence[str]) -> None:
        self.record_packed(request_id, model_version, self.pack(item_ids))

    def record_packed(self, request_id: str, model_version: str, shown: Packed) -> None:
        """:meth:`record` for ids already :meth:`pack`-ed."""
        key = self._key(request_id)
        with self._lock:
            self._shown[key] = (model_version, shown)
            while len(self._shown) > self.capacity:
                self._shown.popitem(last=False)

    def attribute(self, request_id: str, item_id: str | None) -> Attribution | None:
        """The response ``request_id`` and the item's position in it; None when unknown here."""
        with self._lock:
            hit = self._shown.get(self._key(request_id))
        if hit is None:
            return None
        version, shown = hit
        if item_id is None:
            return Attribution(version, None)
        items = shown.split(self.SEP) if isinstance(shown, str) and shown else shown
        try:
            return Attribution(version, list(items).index(item_id) + 1)
        except ValueError:
            return Attribution(version, None)

    def __len__(self) -> int:
        return len(self._shown)


# One response on its way to the shared book: (request_id, model_version, packed item ids).
Shown = tuple[str, str, Packed]


class ImpressionBook:
    """The recent responses of every ingress replica, in one place (``shared_impressions``).

    Run as one named, detached Ray actor per app (:func:`attach_book`), so that a click is
    credited whichever ingress replica receives it. It holds ``capacity`` responses of the whole
    app, newest kept (each replica still keeps its own ``impressions_capacity`` too). Its state
    is not persisted: a restarted book starts empty, and clicks on earlier answers that reach
    another replica are counted as unknown until it has filled again.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.impressions = Impressions(capacity)

    # Without Ray's task events: every replica calls the book five times a second for as long
    # as it serves, and the GCS would keep each call's record until its task-event bound (a
    # 10-minute soak saw the GCS grow 15% from these alone; bench/results/soak_inline_ranker_*).
    @ray.method(enable_task_events=False)
    def record_many(self, rows: Sequence[Shown]) -> int:
        """Remember a batch of responses; returns how many the book holds."""
        for request_id, version, shown in rows:
            self.impressions.record_packed(request_id, version, shown)
        return len(self.impressions)

    @ray.method(enable_task_events=False)
    def attribute(self, request_id: str, item_id: str | None) -> Attribution | None:
        return self.impressions.attribute(request_id, item_id)

    def size(self) -> int:
        return len(self.impressions)


def attach_book(name: str, namespace: str, capacity: int) -> Any:
    """The app's :class:`ImpressionBook` actor: created by the first ingress replica, attached to
    by the others (``get_if_exists``). Detached, like the session shards, so that it outlives the
    replica that created it; a crashed book restarts empty (``max_restarts=-1``). No CPU is
    reserved: it answers a batch call per replica every :data:`SHARE_EVERY_S` and one call per
    click another replica answered."""
    return ray.remote(ImpressionBook).options(
        name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
        max_restarts=-1, num_cpus=0,
    ).remote(capacity)


def book_name(actor_prefix: str) -> str:
    """The shared book's actor name: ``<session.actor_prefix>-impressions``."""
    return f"{actor_prefix}-impressions"


def kill_book(name: str, namespace: str) -> bool:
    """Remove the shared book (it is detached, so ``serve shutdown`` leaves it); True if one ran.
    The next deploy starts a new, empty one with its ``impressions_capacity``."""
    try:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    except ValueError:
        return False
    return True


class SharedImpressions:
    """One replica's side of the :class:`ImpressionBook`.

    Responses are queued and sent ``every_s`` seconds after the first of them, all in one call
    (fire and forget: nothing is waited for on the request path). The send is a timer on the
    caller's event loop (a replica's request loop), so an idle replica does nothing and no
    second thread competes for the GIL; outside an event loop a daemon timer thread sends. A
    click this replica cannot credit is looked up in the book, waiting at most ``timeout_s``.

    Args:
        send: Hands a batch to the book (``book.record_many.remote``).
        lookup: Asks the book about one event (``book.attribute.remote``): an awaitable of an
            :class:`Attribution` or None.
        every_s: The batching interval; 0 sends each response at once (tests).
        timeout_s: Longest wait for the book per event; past it the event counts as unknown.
    """

    def __init__(self, send: Callable[[list[Shown]], Any],
                 lookup: Callable[[str, str | None], Awaitable[Attribution | None]], *,
                 every_s: float = SHARE_EVERY_S, timeout_s: float = LOOKUP_TIMEOUT_S) -> None:
        self._send = send
        self._lookup = lookup
        self.every_s = every_s
        self.timeout_s = timeout_s
        self._queue: list[Shown] = []
        self._lock = threading.Lock()
        self._warned_at: float | None = None

    @classmethod
    def over_actor(cls, book: Any, **kwargs: Any) -> SharedImpressions:
        """Over a Ray actor handle of :class:`ImpressionBook` (:func:`attach_book`)."""
        return cls(lambda rows: book.record_many.remote(rows),
                   lambda rid, item: book.attribute.remote(rid, item), **kwargs)

    def add(self, request_id: str, model_version: str, shown: Packed) -> None:
        """Queue one response (its item ids :meth:`Impressions.pack`-ed)."""
        row = (request_id, model_version, shown)
        if self.every_s <= 0:
            self._send([row])
            return
        with self._lock:
            self._queue.append(row)
            first = len(self._queue) == 1
        if first:  # a send is due every_s from now; later responses ride along
            try:
                asyncio.get_running_loop().call_later(self.every_s, self.flush)
            except RuntimeError:  # no event loop in this thread
                timer = threading.Timer(self.every_s, self.flush)
                timer.daemon = True
                timer.start()

    def flush(self) -> None:
        """Send what is queued, in one call."""
        with self._lock:
            rows, self._queue = self._queue, []
        if rows:
            try:
                self._send(rows)
            except Exception as exc:  # a book being restarted: these answers go uncredited
                self._warn(f"could not hand {len(rows)} responses to the shared impression "
                           f"book ({exc!r})")

    async def attribute(self, request_id: str, item_id: str | None) -> Attribution | None:
        """The book's answer; None when it does not know the response, is down or is slow."""
        try:
            return await asyncio.wait_for(self._lookup(request_id, item_id), self.timeout_s)
        except Exception as exc:  # the event is accepted either way
            self._warn(f"the shared impression book did not answer ({exc!r}); the event is "
                       "accepted and counted with model_version=\"unknown\"")
            return None

    def _warn(self, message: str) -> None:
        now = time.monotonic()  # at most one warning a minute: what is wrong, not how often
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("%s; clicks on other replicas' answers count as unknown meanwhile",
                        message)


class _Counter(Protocol):
    def inc(self, value: float = ..., tags: dict[str, str] = ...) -> None: ...


def position_tag(position: int | None) -> str:
    """The ``position`` tag: 1-based, or ``none`` for an item the response did not show."""
    return "none" if position is None else str(position)


class FeedbackMetrics:
    """Impressions, clicks and add-to-carts per model version and position.

    Impressions are one counter series per position, so a response of 20 items is 20 increments.
    Each increment of a Ray metric costs about 25 µs (tags checked, then handed to Ray's
    recorder), 0.5 ms per response, a noticeable share of an ingress replica's CPU (py-spy,
    docs/PERFORMANCE.md). With ``flush_every_s > 0`` they are added up here and handed over at
    most once per interval (one increment per version and position that changed), by the next
    call or else by a daemon thread: the exported counts lag by at most the interval and are
    never dropped. Clicks and add-to-carts are rare next to impressions and go straight through.

    Args:
        counters: ``{"impressions": c, "clicks": c, "add_to_cart": c}``; default: Ray Serve
            metrics named ``intentrec_<key>`` (exported by Ray's metrics agent).
        flush_every_s: Longest time impressions are held before they reach the counter; 0
            hands over every response at once.
        clock: Monotonic seconds (tests inject one).
    """

    def __init__(self, counters: dict[str, _Counter] | None = None, *,
                 flush_every_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if counters is None:
            from ray.serve.metrics import Counter

            tags = ("model_version", "position")
            counters = {
                "impressions": Counter("intentrec_impressions",
                                       "Items shown in recommendation responses",
                                       tag_keys=tags),  # type: ignore[arg-type]
                "clicks": Counter("intentrec_clicks", "Click events credited to a response",
                                  tag_keys=tags),  # type: ignore[arg-type]
                "add_to_cart": Counter("intentrec_add_to_cart",
                                       "Add-to-cart events credited to a response",
                                       tag_keys=tags),  # type: ignore[arg-type]
            }
        self.counters = counters
        self.flush_every_s = flush_every_s
        self._clock = clock
        self._pending: dict[tuple[str, int], int] = {}
        self._flushed_at = clock()
        self._lock = threading.Lock()
        if flush_every_s > 0:
            threading.Thread(target=self._flush_idle, name="impressions-flush", daemon=True).start()

    def shown(self, model_version: str, num_items: int) -> None:
        """Count one response that showed ``num_items`` items (positions 1 to ``num_items``)."""
        with self._lock:
            for n in range(1, num_items + 1):
                key = (model_version, n)
                self._pending[key] = self._pending.get(key, 0) + 1
            due = self._clock() - self._flushed_at >= self.flush_every_s
        if due:
            self.flush()

    def flush(self) -> None:
        """Hand the impressions held so far to the counter."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flushed_at = self._clock()
        c = self.counters["impressions"]
        for (version, n), count in pending.items():
            c.inc(float(count), tags={"model_version": version, "position": str(n)})

    def _flush_idle(self) -> None:
        """Flush impressions held longer than the interval when no new response comes to do it."""
        while True:
            time.sleep(self.flush_every_s)
            with self._lock:
                due = bool(self._pending) and \
                    self._clock() - self._flushed_at >= self.flush_every_s
            if due:
                self.flush()

    def credited(self, event: str, attribution: Attribution | None) -> None:
        name = CREDITED.get(event)
        if name is None:
            return
        version = attribution.model_version if attribution else UNKNOWN_VERSION
        position = attribution.position if attribution else None
        self.counters[name].inc(1.0, tags={"model_version": version,
                                           "position": position_tag(position)})


class Feedback:
    """One replica's feedback loop: remember responses, credit events, count both.

    Args:
        impressions: This replica's own recent responses.
        metrics: The counters.
        shared: The app's shared book (:class:`SharedImpressions`); None: this replica credits
            only the responses it gave itself.
    """

    def __init__(self, impressions: Impressions | None = None,
                 metrics: FeedbackMetrics | None = None,
                 shared: SharedImpressions | None = None) -> None:
        self.impressions = impressions if impressions is not None else Impressions()
        self.metrics = metrics if metrics is not None else FeedbackMetrics(
            flush_every_s=FLUSH_EVERY_S)
        self.shared = shared

    def served(self, response: dict[str, Any]) -> str:
        """Give a response its ``request_id``, remember what it showed and count it."""
        request_id = new_request_id()
        items = [it["item_id"] for it in response["items"]]
        shown = Impressions.pack(items)
        self.impressions.record_packed(request_id, response["model_version"], shown)
        if self.shared is not None:
            self.shared.add(request_id, response["model_version"], shown)
        self.metrics.shown(response["model_version"], len(items))
        return request_id

    async def credit(self, event: str, item_id: str | None,
                     from_request: str | None) -> Attribution | None:
        """Attribute one accepted event that carries ``from_request`` and count it: from this
        replica's own responses, else from the shared book. An event without ``from_request``
        is credited to nothing and counted nowhere."""
        if from_request is None:
            return None
        attribution = self.impressions.attribute(from_request, item_id)
        if attribution is None and self.shared is not None:
            attribution = await self.shared.attribute(from_request, item_id)
        self.metrics.credited(event, attribution)
        return attribution
