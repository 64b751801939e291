"""Context enrichment: what the request's time, place and device mean, and what the session wants.

Two pure functions, testable without Ray, and one Serve deployment:

- :func:`enrich_context` turns the request's ``context`` and the server clock into the local hour,
  weekday, weekend flag, public holiday (the ``holidays`` library, country from the context),
  season, device and region. It returns the :class:`graph.ranking.ContextSignal` the ranker
  scores with and the display fields the API returns. How much the context moves the ranking is
  not decided here: the ranker looks the signal up in ``RankingSignals.context_lift`` /
  ``holiday_lift`` / ``attribute_lift``, tables estimated from the training data (category
  affinity by weekday, hour and holiday, and by device and region where the events carry them),
  so no hand-written rule ("cereal in the morning") exists anywhere.
- :func:`infer_intent` turns the session's events into a recency- and event-weighted
  distribution over categories (the session's intent).
- :class:`ContextEnricher` serves :func:`enrich_context`. The ingress calls it concurrently with
  the session-state read, so it cannot see the session: the intent is computed next to the
  catalogue, in the ranker, with :func:`infer_intent` from this module.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from ray import serve

from actors.deployment_options import ENRICHER, options
from graph import schema as S

WEEKDAYS: tuple[str, ...] = (
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
)
# Countries whose seasons are the reverse of the northern hemisphere's.
SOUTHERN_HEMISPHERE: frozenset[str] = frozenset(
    {"AR", "AU", "BO", "BR", "CL", "NZ", "PE", "PY", "UY", "ZA", "NA", "BW", "MZ", "MG", "ID"}
)
_NORTH_SEASONS = {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring",
                  6: "summer", 7: "summer", 8: "summer", 9: "autumn", 10: "autumn", 11: "autumn"}
_FLIP = {"winter": "summer", "summer": "winter", "spring": "autumn", "autumn": "spring"}
UNKNOWN = "unknown"
# Half-life of a session event's weight in the intent: a view from an hour ago still counts a
# quarter as much as one from now.
INTENT_HALF_LIFE_S = 1800.0
# The span over which an enrichment holds (`EnrichedContext.valid`): a UTC quarter-hour. Every
# zone in use today is a whole number of quarter-hours off UTC, so within one the local date,
# hour and offset stay the same.
VALID_S = 900


@dataclass(frozen=True)
class EnrichedContext:
    """Everything the enricher derived from one request's context.

    Attributes:
        local: The request's local wall-clock time (timezone-aware).
        hour: Local hour 0–23.
        weekday: 0 = Monday … 6 = Sunday.
        weekend: Saturday or Sunday.
        holiday: Name of the public holiday on that local date in ``country``, if any.
        season: ``winter``/``spring``/``summer``/``autumn`` (hemisphere from the country).
        device: As sent, or ``unknown``.
        region: As sent, or ``unknown``.
        country: ISO alpha-2, as sent or the configured default.
    """

    local: datetime
    hour: int
    weekday: int
    weekend: bool
    holiday: str | None
    season: str
    device: str
    region: str
    country: str

    def display(self) -> dict[str, Any]:
        """The fields of :class:`actors.api.ContextOut`."""
        return {
            "local_time": self.local.isoformat(timespec="seconds"),
            "hour": self.hour,
            "weekday": WEEKDAYS[self.weekday],
            "weekend": self.weekend,
            "holiday": self.holiday,
            "season": self.season,
            "device": self.device,
            "region": self.region,
            "country": self.country,
        }

    @property
    def ts(self) -> float:
        """The request time in unix seconds: the one "now" every time-dependent part of answering
        the request uses (session decay, intent, context)."""
        return self.local.timestamp()

    @property
    def valid(self) -> tuple[float, float] | None:
        """The request times ``[from, until)`` (unix seconds) over which this answer, for the
        same context but its ``ts``, changes only in the clock (``local_time``, ``ts``): the
        UTC quarter-hour of the request, when the local offset is a whole number of
        quarter-hours and the same at both ends of it (so the local date and hour are too).
        None otherwise (a local mean time of the 1800s, an offset of +05:53)."""
        start = math.floor(self.ts / VALID_S) * VALID_S
        zone = self.local.tzinfo
        first = datetime.fromtimestamp(start, zone).utcoffset()
        last = datetime.fromtimestamp(start + VALID_S - 1, zone).utcoffset()
        if first is None or first != last or first.total_seconds() % VALID_S:
            return None
        return float(start), float(start + VALID_S)

    def wire(self) -> dict[str, Any]:
        """What the enricher sends the ingress: ``{"signal", "display", "ts", "valid"}``
        (``valid``: :attr:`valid` as a list, or None; the ingress's :class:`ContextCache`
        reuses the answer within it)."""
        valid = self.valid
        return {"signal": self.signal_fields(), "display": self.display(), "ts": self.ts,
                "valid": None if valid is None else list(valid)}

    def signal_fields(self) -> dict[str, Any]:
        """Keyword arguments of :class:`graph.ranking.ContextSignal` (what crosses the wire:
        plain values keep torch, which ``graph.ranking`` imports, out of the ingress process).
        ``device`` and ``region`` are sent as given (None when the request named none); the
        ranker's lift tables normalise them the way they were fitted."""
        return {"weekday": self.weekday, "hour": self.hour, "is_holiday": self.holiday is not None,
                "device": None if self.device == UNKNOWN else self.device,
                "region": None if self.region == UNKNOWN else self.region}

    def signal(self) -> Any:
        """The :class:`graph.ranking.ContextSignal` the ranker scores with."""
        from graph.ranking import ContextSignal

        return ContextSignal(**self.signal_fields())


@functools.lru_cache(maxsize=256)
def _holiday_calendar(country: str, year: int) -> Any | None:
    import holidays

    try:
        return holidays.country_holidays(country, years=year)
    except (NotImplementedError, KeyError):
        return None


def holiday_name(country: str, day: date) -> str | None:
    """The public holiday on ``day`` in ``country`` (ISO alpha-2), or None.

    Unknown countries have no holidays rather than an error: context is a hint, not a contract.
    """
    cal = _holiday_calendar(country.upper(), day.year)
    if cal is None:
        return None
    name = cal.get(day)
    return None if name is None else str(name)


def season_of(month: int, country: str) -> str:
    """Meteorological season of ``month`` in ``country``'s hemisphere."""
    season = _NORTH_SEASONS[month]
    return _FLIP[season] if country.upper() in SOUTHERN_HEMISPHERE else season


@functools.lru_cache(maxsize=128)
def _zone(name: str) -> tzinfo:
    return ZoneInfo(name)


def local_time(ts: datetime | None, timezone: str | None, default_timezone: str,
               now: datetime | None = None) -> datetime:
    """The request's local wall-clock time.

    - ``timezone`` given: ``ts`` (or now) shown in that zone; a naive ``ts`` is read in it.
    - else an aware ``ts`` keeps its own offset (the client's local time);
    - else a naive ``ts`` (or now) is read in ``default_timezone``.
    """
    zone = _zone(timezone or default_timezone)
    if ts is None:
        return (now or datetime.now(UTC)).astimezone(zone)
    if ts.tzinfo is None:
        return ts.replace(tzinfo=zone)
    return ts.astimezone(zone) if timezone else ts


def request_local_time(context: dict[str, Any] | None, default_timezone: str,
                       now: datetime | None = None) -> datetime:
    """:func:`local_time` of a request's ``context`` object (``ts`` as a datetime or an ISO
    string, ``timezone``); what :func:`enrich_context` and :class:`ContextCache` both place a
    request by."""
    ctx = context or {}
    ts = ctx.get("ts")
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    return local_time(ts, ctx.get("timezone"), default_timezone, now)


def enrich_context(
    context: dict[str, Any] | None,
    *,
    default_country: str = "US",
    default_timezone: str = "UTC",
    now: datetime | None = None,
) -> EnrichedContext:
    """Derive the context features of one request.

    Args:
        context: The request's ``context`` object (:class:`actors.api.ContextIn` as a dict:
            ``ts``, ``timezone``, ``device``, ``region``, ``country``), or None.
        default_country: Holiday calendar and hemisphere when the request names no country.
        default_timezone: Zone of a naive or missing ``ts``.
        now: The server clock: the request time when the context has no ``ts``.
    """
    ctx = context or {}
    local = request_local_time(ctx, default_timezone, now)
    country = (ctx.get("country") or default_country).upper()
    weekday = local.weekday()
    return EnrichedContext(
        local=local,
        hour=local.hour,
        weekday=weekday,
        weekend=weekday >= 5,
        holiday=holiday_name(country, local.date()),
        season=season_of(local.month, country),
        device=ctx.get("device") or UNKNOWN,
        region=ctx.get("region") or UNKNOWN,
        country=country,
    )


@dataclass(frozen=True)
class ContextProbe:
    """One request's place in :class:`ContextCache`: its context without the time, with the UTC
    offset of its local time (what the enrichment depends on besides the local date and hour),
    and that local time."""

    key: tuple[Any, ...]
    local: datetime


class ContextCache:
    """The ingress's copy of the enricher's recent answers, reused while the enricher says they
    hold.

    A request whose context equals an earlier one's but for its time, at a request time within
    the span the enricher declared for that answer (``wire()["valid"]``, see
    :attr:`EnrichedContext.valid`), gets the earlier answer with its own clock: the local time
    and ``ts``, which the ingress computes with :func:`request_local_time`, the enricher's own function.
    Requests sent with the server clock or the client's current time hit it all quarter-hour
    long; each distinct context (device, region, country, zone) costs one enricher call per
    quarter-hour.

    An answer is kept only when the enricher placed the request at the time the ingress computes
    (so an enricher configured with another default zone, during a rolling update, is never
    shortcut) and declared a span: an enricher that declares none (an earlier release, or one
    whose answers change by the minute) is called every time.

    Args:
        default_timezone: ``AppArgs.default_timezone``: the zone of a request time without an
            offset, as the enricher is configured.
        capacity: Contexts kept; past it the cache starts over (clients choose the device and
            region strings, so the memory is bounded). 0 turns the cache off.
    """

    def __init__(self, default_timezone: str, capacity: int = 1024) -> None:
        self.default_timezone = default_timezone
        self.capacity = capacity
        self._entries: dict[tuple[Any, ...], tuple[float, float, dict[str, Any]]] = {}

    def probe(self, context: dict[str, Any] | None, now: float) -> ContextProbe | None:
        """Where the request with ``context`` at server time ``now`` stands; None when the cache
        is off or cannot place the request's time (an unknown zone: the enricher refuses it
        with the error the client should see)."""
        if self.capacity <= 0:
            return None
        ctx = context or {}
        try:
            local = request_local_time(ctx, self.default_timezone, datetime.fromtimestamp(now, UTC))
        except Exception:  # the enricher answers it, with the client's error
            return None
        fields = tuple(sorted((k, v) for k, v in ctx.items() if k != "ts"))
        return ContextProbe((fields, local.utcoffset()), local)

    def get(self, probe: ContextProbe) -> dict[str, Any] | None:
        """The kept answer for ``probe`` with the request's own clock, or None."""
        entry = self._entries.get(probe.key)
        t = probe.local.timestamp()
        if entry is None or not entry[0] <= t < entry[1]:
            return None
        wire = entry[2]
        return {**wire, "ts": t,
                "display": {**wire["display"],
                            "local_time": probe.local.isoformat(timespec="seconds")}}

    def put(self, probe: ContextProbe, wire: dict[str, Any]) -> bool:
        """Keep the enricher's answer ``wire`` to the request of ``probe``, if it declares a span
        around the request time and places the request where the ingress does; True if kept."""
        valid = wire.get("valid")
        t = probe.local.timestamp()
        if (not valid or not valid[0] <= t < valid[1] or wire.get("ts") != t
                or wire.get("display", {}).get("local_time")
                != probe.local.isoformat(timespec="seconds")):
            return False
        if len(self._entries) >= self.capacity and probe.key not in self._entries:
            self._entries.clear()
        self._entries[probe.key] = (float(valid[0]), float(valid[1]), wire)
        return True

    def __len__(self) -> int:
        return len(self._entries)


def infer_intent(
    events: Iterable[tuple[str | None, str, float]],
    category_of: Callable[[str], str | None],
    now_s: float,
    *,
    half_life_s: float = INTENT_HALF_LIFE_S,
    top: int = 5,
) -> list[tuple[str, float]]:
    """The session's intent: a recency- and event-weighted distribution over categories.

    Each event adds ``EVENT_WEIGHTS[event] * 0.5 ** (age / half_life)`` to its item's category
    (a ``remove_from_cart`` subtracts). Categories with no positive mass are dropped and the rest
    normalised to sum to 1. Events of items the catalogue does not know are skipped here (they
    stay in the session).

    Args:
        events: ``(item_id, event, ts_seconds)`` per session event, any order.
        category_of: Item id → category label (None when unknown).
        now_s: Reference time (unix seconds).
        half_life_s: Half-life of an event's weight.
        top: How many categories to return.

    Returns:
        ``[(category, weight)]``, heaviest first, weights summing to 1 over all positive
        categories (so the top few may sum to less).
    """
    mass: dict[str, float] = {}
    for item_id, event, ts in events:
        w = S.EVENT_WEIGHTS.get(event, 0.0)
        if item_id is None or w == 0.0:
            continue
        cat = category_of(item_id)
        if cat is None:
            continue
        age = max(0.0, now_s - ts)
        mass[cat] = mass.get(cat, 0.0) + w * math.pow(0.5, age / half_life_s)
    positive = {c: m for c, m in mass.items() if m > 1e-12}
    total = sum(positive.values())
    if total <= 0.0:
        return []
    ranked = sorted(positive.items(), key=lambda cm: (-cm[1], cm[0]))[:top]
    return [(c, m / total) for c, m in ranked]


@serve.deployment(**options(ENRICHER))
class ContextEnricher:
    """Serve deployment around :func:`enrich_context`.

    Args:
        default_country: Holiday calendar when a request names no country.
        default_timezone: Zone of requests without a ``ts`` offset or ``timezone``.
    """

    def __init__(self, default_country: str = "US", default_timezone: str = "UTC") -> None:
        self.default_country = default_country
        self.default_timezone = default_timezone
        # Fail at replica start, not on the first request, when a default is wrong.
        _zone(default_timezone)

    async def enrich(self, context: dict[str, Any] | None, now: float) -> dict[str, Any]:
        """:meth:`EnrichedContext.wire` of one request.

        Args:
            context: The request's ``context``.
            now: The ingress's clock (unix seconds): the request time when ``context`` has no
                ``ts``. Taken by the ingress, not here, so a request has one time.
        """
        return enrich_context(context, default_country=self.default_country,
                              default_timezone=self.default_timezone,
                              now=datetime.fromtimestamp(now, UTC)).wire()

    async def enrich_many(self, requests: list[tuple[dict[str, Any] | None, float]]
                          ) -> list[dict[str, Any] | Exception]:
        """:meth:`enrich` of several requests in one call, in order.

        The ingress sends the contexts of requests that arrive while its previous call is in
        flight together (``actors.session_state.Coalescer``): one Serve call instead of one
        each. A context that is refused (an unknown timezone, say) gets its own error back; the
        others are answered.
        """
        out: list[dict[str, Any] | Exception] = []
        for context, now in requests:
            try:
                out.append(await self.enrich(context, now))
            except Exception as exc:  # returned to that request alone, raised there
                out.append(exc)
        return out
