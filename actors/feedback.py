"""The feedback loop's online half: what each recommendation response showed, and the clicks and
add-to-carts that come back with its ``request_id`` (``from_request`` on an event).

Each ingress replica remembers its recent responses (:class:`Impressions`, bounded, newest kept)
and exports Prometheus counters through Ray's metrics agent (:class:`FeedbackMetrics`), tagged
with the model version and the 1-based position, so that click-through and add-to-cart rates per
version are one division in Prometheus or Grafana::

    sum by (model_version) (rate(ray_intentrec_clicks_total[5m]))
      / sum by (model_version) (rate(ray_intentrec_impressions_total[5m]))

An event whose response another replica served (or one this replica forgot) is still accepted;
it is counted with ``model_version="unknown"``. The offline half, exporting accepted events for
retraining, is :mod:`graph.online_events`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from graph import schema as S

DEFAULT_CAPACITY = 100_000
FLUSH_EVERY_S = 1.0  # impressions reach the Ray counters at most this late (FeedbackMetrics)
UNKNOWN_VERSION = "unknown"
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

    def record(self, request_id: str, model_version: str, item_ids: Sequence[str]) -> None:
        # A catalogue id with the separator in it (not from the API) keeps the plain tuple.
        shown = (tuple(item_ids) if any(self.SEP in i for i in item_ids)
                 else self.SEP.join(item_ids))
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
    """One replica's feedback loop: remember responses, credit events, count both."""

    def __init__(self, impressions: Impressions | None = None,
                 metrics: FeedbackMetrics | None = None) -> None:
        self.impressions = impressions if impressions is not None else Impressions()
        self.metrics = metrics if metrics is not None else FeedbackMetrics(
            flush_every_s=FLUSH_EVERY_S)

    def served(self, response: dict[str, Any]) -> str:
        """Give a response its ``request_id``, remember what it showed and count it."""
        request_id = new_request_id()
        items = [it["item_id"] for it in response["items"]]
        self.impressions.record(request_id, response["model_version"], items)
        self.metrics.shown(response["model_version"], len(items))
        return request_id

    def credit(self, event: str, item_id: str | None, from_request: str) -> Attribution | None:
        """Attribute one accepted event that carries ``from_request`` and count it."""
        attribution = self.impressions.attribute(from_request, item_id)
        self.metrics.credited(event, attribution)
        return attribution
