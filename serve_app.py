"""The intentrec Serve application: one HTTP endpoint over session state, context and the ranker.

Hot path of ``POST /v1/recommendations`` (three hops, two of them concurrent)::

    HTTP ─▶ Ingress ─┬─▶ SessionStore.get  (session shard actor; 1–2 calls)  ─┐
                     └─▶ ContextEnricher.enrich (Serve handle)               ─┴─▶ GNNRanker.recommend

``POST /v1/events`` is one hop (the session shards, durable before the 202), which is what makes
an accepted event visible to the very next recommendation (read-your-writes).

Run it:

- ``serve run serve_app:app`` — defaults: the ``latest`` model under ``./artifacts``. Before the
  first model exists (first boot) the app still answers: recommendations are empty with
  ``model_version`` saying so, and the ranker picks up the first ``LATEST`` that appears.
- ``serve deploy serve_config.yaml`` — ``import_path: serve_app:build_app`` with typed ``args``
  (:class:`AppArgs`, unknown keys rejected).

Either way the app is closed by default: it refuses to start without an API key in the replicas'
environment (``INTENTREC_API_KEY``, the client key; ``INTENTREC_ADMIN_KEY``, the admin key) unless
anonymous access is asked for explicitly (:mod:`actors.auth`).

This module deliberately has no ``from __future__ import annotations``: Ray Serve reads the
annotation of ``build_app``'s parameter at run time to turn the config's ``args`` into
:class:`AppArgs`.
"""

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, cast

from fastapi import Body, FastAPI, Header, Request, Security
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.added_items import ADDED_ITEMS_DIR
from actors.api import (
    MAX_ID_LEN,
    MAX_K,
    AcceptedEvent,
    Attribution,
    CatalogueResponse,
    ContextOut,
    ErrorBody,
    EventBatch,
    EventIn,
    EventsAccepted,
    EventsBody,
    ForgetResponse,
    Health,
    ModelInfo,
    RecommendationRequest,
    RecommendationResponse,
    ReloadRequest,
    ReloadResponse,
    ShoppersResponse,
    SimilarResponse,
    body_fingerprint,
    field_path,
    idempotency_key,
    path_id,
)
from actors.auth import ADMIN_KEY_ENV, API_KEY_HEADER, CLIENT_KEY_ENV, ApiKeys, Scope
from actors.body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimit
from actors.clock import Clock, system_clock
from actors.context import ContextCache, ContextEnricher, enrich_context
from actors.demo_page import add_demo_routes
from actors.deployment_options import INGRESS, inline_ranker_options, options
from actors.feedback import DEFAULT_CAPACITY as IMPRESSIONS_CAPACITY
from actors.feedback import Attribution as Credit
from actors.feedback import Feedback, Impressions, SharedImpressions, attach_book, book_name
from actors.items_api import ItemBatch, ItemBatchResponse, ItemUpsert, ItemUpsertResponse
from actors.local_handle import LocalHandle
from actors.overload import (
    TRANSIENT_ERRORS,
    bounded,
    retry_after_headers,
    unavailable,
)
from actors.ranker import GNNRanker, RankQuery
from actors.rollout import ranker_deployment, roll_out, start_split, stop_split
from actors.session_events import SessionEvent
from actors.session_state import Coalescer, SessionSnapshot, SessionStateConfig, SessionStore
from actors.shard_attach import check_attached
from actors.split import SplitConfig, SplitResponse
from graph import storage
from graph.artifacts import latest_version
from graph.errors import ArtifactError, BadRequestError, IntentrecError, UnavailableError
from graph.forgotten import FORGOTTEN_FILE

log = logging.getLogger("intentrec.serve")


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of ``serve_config.yaml``). Strict.

    Args:
        artifacts_root: Folder or URI with model versions; relative paths are resolved against
            the working directory of the process that builds the app.
        model_version: ``latest`` (follow the ``LATEST`` pointer) or a version name (pinned).
        reload_poll_s: Seconds between checks of ``LATEST`` for a new version; 0 turns automatic
            pickup off (``POST /v1/admin/reload`` still works).
        api_key_env: Name of the environment variable holding the client key (events, a user's
            recommendations), sent in the ``X-API-Key`` header.
        admin_key_env: Name of the environment variable holding the admin key (deleting users,
            ``/v1/admin/*``; it also does what the client key does). Without either key the app
            refuses to start, unless anonymous access is allowed.
        allow_anonymous: Start without keys (also ``INTENTREC_ALLOW_ANONYMOUS=1`` in the
            environment): requests without a key may then post events; a user's recommendations
            and the admin endpoints still need a configured key. For local development.
        max_body_bytes: Largest request body accepted; a larger one is a 413, refused before it
            is read (:mod:`actors.body_limit`).
        default_country: Holiday calendar when a request names no country (ISO alpha-2).
        default_timezone: Zone of request times that carry no offset (IANA name).
        state_dir: Serving state besides sessions (the forgotten users); relative paths are
            resolved like ``artifacts_root``.
        storage: Shared storage root (a pyarrow URI such as ``s3://bucket/intentrec``, or a
            shared folder) under which the relative ``artifacts_root``, ``state_dir`` and
            ``session.wal_uri`` live, so that no state is on a node's own disk. Empty: the
            ``INTENTREC_STORAGE`` environment variable of the replicas (``cluster.yaml`` sets
            it), else the working directory (the single-machine default).
        inline_context: Compute the context in the ingress instead of calling the
            ContextEnricher deployment: one handle call less per recommendation (the enricher is
            then not deployed). The enrichment is the same function either way.
        inline_ranker: Rank in the ingress process instead of calling the GNNRanker deployment:
            each ingress replica loads the model (the same ``GNNRanker`` code: ``LATEST``
            polling, added items, forgotten users, rollouts and A/B splits, which then reach the
            ``Ingress`` deployment's ``user_config``), and the GNNRanker is not deployed. One
            hop less: 1.2-1.8x less CPU per recommendation at concurrency 1 and 1.2-1.35x the
            recommendations per second at 8 on a 2-core node (docs/PERFORMANCE.md); the ranking
            then scales with the ingress replicas, each holds a model in memory, and an event
            that reaches a replica while it ranks waits for that ranking.
        session: Session-state configuration (shards, window, TTL, write-ahead log);
            ``session.call_timeout_s`` bounds each shard call.
        ranker_timeout_s: Longest wait for the ranker (and the context enricher) per request;
            past it the request gets a 503 with ``Retry-After``. Keep it, and
            ``session.call_timeout_s``, below the HTTP ``request_timeout_s`` of the Serve config,
            so the client gets that answer rather than the proxy's timeout.
        health_timeout_s: Longest wait for each component ``/healthz`` checks.
        impressions_capacity: Recommendation responses each ingress replica remembers, to credit
            clicks and add-to-carts to the version and position that showed the item
            (:class:`actors.feedback.Impressions`, about 0.39 KB each, oldest dropped first).
        shared_impressions: Also hand every response to one shared book
            (:class:`actors.feedback.ImpressionBook`, a detached actor named
            ``<session.actor_prefix>-impressions`` holding the last ``impressions_capacity``
            responses of all replicas), so that a click is credited whichever ingress replica
            Serve's proxy sends it to. Off: a click reaching another replica than the one that
            answered counts as ``unknown``.
        context_cache_size: Request contexts (device, region, country, zone) whose enrichment
            each ingress replica keeps while the enricher says it holds (a UTC quarter-hour for
            the built-in one): a request with one of them skips the enricher call
            (:class:`actors.context.ContextCache`). 0 calls the enricher for every request.
        ranker_calls_in_flight: Recommendation calls each ingress replica keeps out to the
            ranker while they keep up; the requests that arrive while that many are out go to
            the ranker together in the next call (one Serve call for several requests: 1.1 ms
            less CPU per recommendation at concurrency 8, 1.5x the recommendations per second
            at 32). 0: one call per request.
        ranker_batch_size: Most requests in one ranker call. A full batch that finds every call
            busy goes out at once as one more call, so under load the calls in flight grow with
            it: Serve's autoscaler, which counts the ranker's calls (``target_ongoing_requests``
            of the GNNRanker), still sees the load, and more ranker replicas get calls.
    """

    model_config = ConfigDict(extra="forbid")

    artifacts_root: str = "artifacts"
    model_version: str = Field(default="latest", min_length=1, max_length=128)
    reload_poll_s: float = Field(default=30.0, ge=0.0, le=86_400.0)
    api_key_env: str = Field(default=CLIENT_KEY_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    admin_key_env: str = Field(default=ADMIN_KEY_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    allow_anonymous: bool = False
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024, le=64 << 20)
    default_country: str = Field(default="US", pattern=r"^[A-Z]{2}$")
    default_timezone: str = "UTC"
    state_dir: str = "state"
    storage: str = ""
    inline_context: bool = False
    inline_ranker: bool = False
    session: SessionStateConfig = Field(default_factory=SessionStateConfig)
    ranker_timeout_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    health_timeout_s: float = Field(default=2.0, gt=0.0, le=60.0)
    impressions_capacity: int = Field(default=IMPRESSIONS_CAPACITY, ge=1, le=10_000_000)
    shared_impressions: bool = True
    context_cache_size: int = Field(default=1024, ge=0, le=1_000_000)
    ranker_calls_in_flight: int = Field(default=2, ge=0, le=1024)
    ranker_batch_size: int = Field(default=8, ge=1, le=1024)

    @field_validator("default_timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"default_timezone ({v!r}) is not an IANA zone; use e.g. 'UTC'") from exc
        return v

    def resolved(self, environ: Mapping[str, str] | None = None) -> "AppArgs":
        """Locations made final here (replicas may run in another directory, on another node):
        relative ones go under ``storage`` (or the cluster's ``INTENTREC_STORAGE``) when set,
        else into the working directory (:func:`graph.storage.place`)."""
        root = self.storage or storage.shared_root(environ)
        session = self.session.model_copy(
            update={"wal_uri": storage.place(self.session.wal_uri, root)})
        return self.model_copy(update={
            "storage": root or "",
            "artifacts_root": storage.place(self.artifacts_root, root),
            "state_dir": storage.place(self.state_dir, root),
            "session": session.resolved(),
        })

    @property
    def tombstones_path(self) -> str:
        return storage.join(self.state_dir, FORGOTTEN_FILE)

    @property
    def items_path(self) -> str:
        """Folder of the items added with ``PUT /v1/items`` (actors/added_items.py)."""
        return storage.join(self.state_dir, ADDED_ITEMS_DIR)


def api_keys(args: AppArgs, environ: Mapping[str, str]) -> ApiKeys:
    """The keys the ingress accepts, from ``environ`` (:meth:`actors.auth.ApiKeys.from_env`).

    Raises:
        ConfigError: No key and no explicit anonymous mode (the message says how to fix it), or a
            malformed key.
    """
    return ApiKeys.from_env(environ, client_env=args.api_key_env, admin_env=args.admin_key_env,
                            allow_anonymous=args.allow_anonymous)


# --------------------------------------------------------------------------------------
# FastAPI app: error mapping
# --------------------------------------------------------------------------------------

api = FastAPI(
    title="intentrec",
    version="0.1.0",
    description=(
        "Real-time, session-aware recommendations. Events posted to `/v1/events` change the very "
        "next recommendation for that session. The `X-API-Key` header carries the client key "
        "(events, recommendations for a `user_id`) or the admin key (deleting users, "
        "`/v1/admin/*`, and everything the client key does); a session's recommendations and "
        "the read-only endpoints need no key. Request bodies are limited to 1 MiB by default."
    ),
)
_api_key = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False,
    description="the client key (events, a user's recommendations) or the admin key (deleting "
    "users, /v1/admin/*)",
)
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody},
    413: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody},
}


def _max_body_bytes() -> int:
    """``AppArgs.max_body_bytes`` of this replica's ingress. Read from the replica, not from a
    module global: ``@serve.ingress`` pickles the app with copies of this module's globals."""
    try:
        args = getattr(serve.get_replica_context().servable_object, "args", None)
    except Exception:  # not inside a replica
        args = None
    return args.max_body_bytes if isinstance(args, AppArgs) else DEFAULT_MAX_BODY_BYTES


api.add_middleware(BodyLimit, max_bytes=_max_body_bytes)
add_demo_routes(api)  # GET /demo: the live shop page (static files, public API only)
# An id in a URL: the same rule as in a body; "/" allowed (the route takes the rest of the path).
PathId = Annotated[str, PathParam(min_length=1, max_length=MAX_ID_LEN), AfterValidator(path_id)]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=MAX_ID_LEN, description=(
        "makes the request safe to retry: a request with the same key and the same body gets "
        "the first one's 202 answer and stores nothing new; the same key with another body is a "
        "409. Use a new random key (a UUID) per request; keys are shared by every client")),
    AfterValidator(lambda v: None if v is None else idempotency_key(v)),
]


def _cause(exc: BaseException) -> BaseException:
    """The user exception inside a Ray task error (``RayTaskError.cause``), else ``exc``."""
    return getattr(exc, "cause", None) or exc


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    details = [{"field": field_path(e.get("loc", ())), "message": str(e.get("msg", ""))}
               for e in errors]
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    _count(request, 422)
    return JSONResponse(
        status_code=422,
        content={"error": "ValidationError", "field": first["field"],
                 "message": f"{first['field']}: {first['message']}", "details": details},
    )


def _error_response(err: IntentrecError) -> JSONResponse:
    # Every 503 says when to retry (RFC 9110 Retry-After).
    headers = retry_after_headers() if err.http_status == 503 else None
    return JSONResponse(status_code=err.http_status, content=err.to_dict(), headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Errors FastAPI raises itself, in the one error format. A body it cannot even decode (not
    UTF-8: FastAPI's 400) is a 422 naming ``body``, like a body that is not JSON."""
    _count(request, 422 if exc.status_code == 400 else exc.status_code)
    if exc.status_code == 400:
        return JSONResponse(status_code=422, content={
            "error": "ValidationError", "field": "body",
            "message": f"body: {exc.detail}; send JSON encoded as UTF-8"})
    return JSONResponse(status_code=exc.status_code, headers=exc.headers, content={
        "error": "HTTPError", "message": str(exc.detail)})


@api.exception_handler(IntentrecError)
async def _project_error(request: Request, exc: IntentrecError) -> JSONResponse:
    err = _cause(exc)
    if not isinstance(err, IntentrecError):  # pragma: no cover - defensive
        err = exc
    return _error_response(err)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    err = _cause(exc)
    if isinstance(err, IntentrecError):  # a project error wrapped by Ray on its way here
        return _error_response(err)
    if isinstance(exc, TRANSIENT_ERRORS) or isinstance(err, TRANSIENT_ERRORS):
        # A replica or actor died under the request, or a queue was full: a 503, not a 500.
        return _error_response(unavailable(err, "a serving component"))
    log.exception("unexpected error on %s", request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content={
        "error": "InternalError", "message": "unexpected server error; it has been logged"})


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


class _Metrics:
    """Prometheus metrics of the ingress (exported by Ray's metrics agent)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        # Ray's stubs type tag_keys as a 1-tuple; any tuple of names is accepted.
        self.requests = Counter("intentrec_requests", "HTTP requests by endpoint and status",
                                tag_keys=("endpoint", "status"))  # type: ignore[arg-type]
        self.latency = Histogram(
            "intentrec_request_latency_ms", "Ingress time per request (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=("endpoint",),
        )
        self.events = Counter("intentrec_events_accepted", "Session events accepted")
        self.enrichments = Counter(
            "intentrec_context_enricher_calls",
            "Request contexts sent to the context enricher (not answered from the ingress's "
            "cache of its answers)")


_METRICS: _Metrics | None = None


def _count(request: Request, status: int) -> None:
    if _METRICS is not None:
        route = request.scope.get("route")
        endpoint = getattr(route, "name", None) or "unmatched"
        _METRICS.requests.inc(tags={"endpoint": endpoint, "status": str(status)})


@asynccontextmanager
async def _observed(endpoint: str) -> AsyncIterator[None]:
    """Count and time one request; the status of a raised project error is its HTTP status."""
    t0 = time.perf_counter()
    status = 200
    try:
        yield
    except BaseException as exc:
        err = _cause(exc)
        status = (err.http_status if isinstance(err, IntentrecError)
                  else 503 if isinstance(err, TRANSIENT_ERRORS) else 500)
        raise
    finally:
        if _METRICS is not None:
            _METRICS.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
            _METRICS.latency.observe((time.perf_counter() - t0) * 1000.0,
                                     tags={"endpoint": endpoint})


async def _batch_or_each(handle: Any, many: str, one: Callable[[Any], Any], items: list[Any],
                         bounded_call: Callable[[Any], Awaitable[Any]]) -> tuple[list[Any], int]:
    """One call of ``handle``'s method ``many`` with every item, or, from a replica of an earlier
    release that has no such method yet (during a rolling update), one call ``one(item)`` per
    item, as that release's ingress made. Returns one result per item (an exception fails its
    item alone) and the calls answered."""
    try:
        out: list[Any] = await bounded_call(getattr(handle, many).remote(items))
        return out, 1
    except RayServeException as exc:
        if f"'{many}'" not in str(exc):
            raise
    return list(await asyncio.gather(*(bounded_call(one(item)) for item in items),
                                     return_exceptions=True)), len(items)


def _unix(ts: datetime | None) -> float | None:
    """Unix seconds of an event time; a time without an offset is UTC (the schema's rule)."""
    if ts is None:
        return None
    return (ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)).timestamp()


def _remains(versions: Sequence[str]) -> list[str]:
    """What ``DELETE /v1/users/{id}`` leaves behind, in words (``ForgetResponse.remains``)."""
    out = []
    if versions:
        out.append(
            f"the user's embedding and purchase history in model version(s) {', '.join(versions)}: "
            "not used for serving from now on; the next `python train_job.py` that reads this "
            "forgotten-users file (`--forgotten`, default `state/forgotten_users.txt`) publishes a "
            "version without them, and these versions are gone when their folders are deleted"
        )
    out.append(
        f"the user id itself, in the app's forgotten-users file (<state_dir>/{FORGOTTEN_FILE}): "
        "it is what keeps serving and every retraining from using the user again"
    )
    return out


def _wire_events(snapshot: SessionSnapshot, user_only: bool) -> tuple[Any, ...]:
    """Session events for the ranker: ``(item_id, event, ts, query)``, oldest first.

    A request with only a user reads the user's recent events across sessions; one with a
    session reads that session.
    """
    events: Sequence[SessionEvent] = snapshot.events
    if user_only and snapshot.user_events:
        seen = {e.event_id for e in snapshot.events}
        events = sorted([*snapshot.events, *(e for e in snapshot.user_events
                                             if e.event_id not in seen)], key=lambda e: e.ts)
    return tuple((e.item_id, e.event, e.ts, e.query) for e in events)


def _session_context(enriched: dict[str, Any], events: Sequence[SessionEvent],
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The context signal and display of a request, with the device and region it did not name
    taken from its session: the latest event that carries one. A shop that sends them with its
    events but not with its recommendation calls still gets their lift, and the answer's
    ``context`` says which were used. New dicts: the enricher's answer may be a cached one."""
    signal, display = enriched["signal"], enriched["display"]
    want_device, want_region = signal.get("device") is None, signal.get("region") is None
    found: dict[str, str] = {}
    for e in reversed(events):
        if not (want_device or want_region):
            break
        if want_device and e.device is not None:
            found["device"], want_device = e.device, False
        if want_region and e.region is not None:
            found["region"], want_region = e.region, False
    if not found:
        return signal, display
    return {**signal, **found}, {**display, **found}


# --------------------------------------------------------------------------------------
# The ingress deployment
# --------------------------------------------------------------------------------------


@serve.deployment(**options(INGRESS))
@serve.ingress(api)
class Ingress:
    """HTTP endpoints of SPEC.md ("Online API").

    Args:
        ranker: Handle to :class:`actors.ranker.GNNRanker`; None with ``args.inline_ranker``:
            the replica builds its own ranker and calls it in process.
        enricher: Handle to :class:`actors.context.ContextEnricher` (None: enrich inline).
        args: :class:`AppArgs` as a dict (resolved paths).
        store: The session-state client; None (always, under Serve): the shard actors named by
            ``args.session``. The in-process bound of ``bench/serve_bench.py`` passes one whose
            shards live in its own process.
        clock: The server clock (:mod:`actors.clock`): the time of a request without
            ``context.ts`` and of an event without ``ts``; also given to the session shards.
    """

    def __init__(self, ranker: DeploymentHandle | None, enricher: DeploymentHandle | None,
                 args: dict[str, Any], store: SessionStore | None = None,
                 clock: Clock = system_clock) -> None:
        global _METRICS
        self.args = AppArgs.model_validate(args)
        # First: without a key (and without explicit anonymous mode) the replica does not start.
        self.keys = api_keys(self.args, os.environ)
        self.ranker: Any = (self._own_ranker() if self.args.inline_ranker and ranker is None
                            else ranker)
        self.ranker_deployment = ranker_deployment(self.args.inline_ranker)
        self.enricher = enricher
        self._enricher_coalescer: Coalescer | None = None
        self._ranker_coalescer: Coalescer | None = None
        # Recommendation calls to the ranker and the requests they carried (/healthz).
        self._ranker_calls_made = 0
        self._ranker_requests = 0
        self.contexts = ContextCache(self.args.default_timezone, self.args.context_cache_size)
        self.clock = clock
        in_ray = store is None  # the in-process bound passes its own store and has no Ray
        if store is None:
            store = SessionStore(self.args.session, clock)
            self.store = store
            self._wait_for_shards()
            try:
                check_attached(store)  # shards left running with other settings: refuse to start
            except UnavailableError as exc:  # down, not drifted: answer degraded meanwhile
                log.warning("could not check the session shards' settings: %s", exc.message)
        else:
            self.store = store
        _METRICS = _Metrics()
        self.feedback = Feedback(Impressions(self.args.impressions_capacity),
                                 shared=self._shared_impressions() if in_ray else None)
        log.info("intentrec ingress ready (%s; bodies up to %d bytes)", self.keys.describe(),
                 self.args.max_body_bytes)

    def _shared_impressions(self) -> SharedImpressions | None:
        """This replica's side of the app's shared impression book (``shared_impressions``)."""
        if not self.args.shared_impressions:
            return None
        cfg = self.args.session
        book = attach_book(book_name(cfg.actor_prefix), cfg.namespace,
                           self.args.impressions_capacity)
        return SharedImpressions.over_actor(book)

    def _own_ranker(self) -> LocalHandle:
        """The ranker in this replica (``inline_ranker``): the GNNRanker deployment's own class,
        called without a hop, so nothing to coalesce (``ranker_calls_in_flight`` 0)."""
        self.args = self.args.model_copy(update={"ranker_calls_in_flight": 0})
        ranker_cls = cast(Any, GNNRanker).func_or_class  # the class under @serve.deployment
        return LocalHandle(ranker_cls(
            self.args.artifacts_root, self.args.model_version, self.args.reload_poll_s,
            self.args.tombstones_path, self.args.items_path))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's hook for the ingress's ``user_config``: a rollout or A/B split for the ranker
        in this replica (``inline_ranker``; :mod:`actors.rollout` writes it). Without an own
        ranker the ingress takes no ``user_config``: the ranker's is on the GNNRanker."""
        if not self.args.inline_ranker:
            if user_config:
                log.warning("the Ingress deployment's user_config is ignored: the ranker runs "
                            "in the GNNRanker deployment (set it there, or inline_ranker: true)")
            return
        await self.ranker.reconfigure.remote(user_config)

    async def serving(self) -> dict[str, Any]:
        """The ranker replica that answers this call: its id, version and split (rollout checks
        and tests; with ``inline_ranker`` this ingress replica's own)."""
        out: dict[str, Any] = await self.ranker.serving.remote()
        return out

    def _wait_for_shards(self, timeout_s: float = 60.0) -> None:
        """Readiness: the replica starts answering once the session shards answer (a first start
        or a log replay), so a fresh app does not refuse its first events with 503s. A shard
        still down after ``timeout_s`` does not stop the replica: it then answers degraded and
        ``/healthz`` names the shard."""
        import ray

        try:
            ray.get([h.ping.remote() for h in self.store.handles], timeout=timeout_s)
        except Exception as exc:
            log.warning("starting with session shard(s) down (%s); /healthz names them", exc)

    def _enricher_calls(self, enricher: DeploymentHandle) -> Coalescer:
        """The enricher's calls on the running loop: one in flight; the contexts of requests
        arriving meanwhile go together in the next (one Serve call, not one each)."""
        loop = asyncio.get_running_loop()
        calls = self._enricher_coalescer
        if calls is None or calls.loop is not loop:
            timeout_s = self.args.ranker_timeout_s

            def bounded_call(call: Any) -> Any:
                return bounded(call, timeout_s, "the context enricher", "ranker_timeout_s")

            async def send(items: list[tuple[dict[str, Any] | None, float]]) -> list[Any]:
                out, _ = await _batch_or_each(
                    enricher, "enrich_many", lambda item: enricher.enrich.remote(*item), items,
                    bounded_call)
                return out

            calls = Coalescer(send)
            self._enricher_coalescer = calls
        return calls

    def _ranker_calls(self) -> Coalescer:
        """The ranker's recommendation calls on the running loop: ``ranker_calls_in_flight`` at
        a time; the requests arriving meanwhile go together in the next (``recommend_many``)."""
        loop = asyncio.get_running_loop()
        calls = self._ranker_coalescer
        if calls is None or calls.loop is not loop:
            ranker, timeout_s = self.ranker, self.args.ranker_timeout_s

            def bounded_call(call: Any) -> Any:
                return bounded(call, timeout_s, "the ranker", "ranker_timeout_s")

            async def send(queries: list[RankQuery]) -> list[Any]:
                self._ranker_requests += len(queries)
                if len(queries) == 1:
                    self._ranker_calls_made += 1
                    return [await bounded_call(ranker.recommend.remote(queries[0]))]
                out, made = await _batch_or_each(
                    ranker, "recommend_many", ranker.recommend.remote, queries, bounded_call)
                self._ranker_calls_made += made
                return out

            calls = Coalescer(send, max_in_flight=self.args.ranker_calls_in_flight,
                              max_batch=self.args.ranker_batch_size)
            self._ranker_coalescer = calls
        return calls

    async def _enrich(self, ctx: dict[str, Any] | None, now: float) -> dict[str, Any]:
        """The context of one request (:meth:`actors.context.EnrichedContext.wire`), whose
        ``ts`` is the request time: ``context.ts`` when given, else ``now``. From the ingress's
        cache of the enricher's answers while they hold, else from the enricher."""
        if self.enricher is not None:
            probe = self.contexts.probe(ctx, now)
            if probe is not None and (kept := self.contexts.get(probe)) is not None:
                return kept
            out: dict[str, Any] = await bounded(
                self._enricher_calls(self.enricher).submit((ctx, now)), self.args.ranker_timeout_s,
                "the context enricher", "ranker_timeout_s")
            if _METRICS is not None:
                _METRICS.enrichments.inc()
            if probe is not None:
                self.contexts.put(probe, out)
            return out
        return enrich_context(ctx, default_country=self.args.default_country,
                              default_timezone=self.args.default_timezone,
                              now=datetime.fromtimestamp(now, UTC)).wire()

    @api.post("/v1/events", status_code=202, response_model=EventsAccepted,
              responses={**_ERROR_RESPONSES, 409: {"model": ErrorBody}},
              summary="Post one event or a batch")
    async def post_events(
        self,
        body: Annotated[EventsBody, Body(openapi_examples={
            "one": {"value": {"session_id": "s1", "user_id": "u1", "event": "add_to_cart",
                              "item_id": "1082185"}},
            "batch": {"value": {"events": [
                {"session_id": "s1", "event": "view", "item_id": "1082185"},
                {"session_id": "s1", "event": "search", "query": "kids cereal"}]}},
        })],
        api_key: Annotated[str | None, Security(_api_key)] = None,
        idempotency: IdempotencyKey = None,
    ) -> EventsAccepted:
        async with _observed("events"):
            self.keys.require(api_key, Scope.CLIENT, "posting events", anonymous_ok=True)
            events: list[EventIn] = body.events if isinstance(body, EventBatch) else [body]
            now = self.clock()  # one time for every event of the batch sent without ts
            # Ids: the client's event_id; else from the Idempotency-Key; else from the content
            # and ts; an event with neither ts nor key is stamped now and deduplicated by the
            # shard within session.dedupe_window_s (actors/session_events.py).
            batch = [
                SessionEvent.create(
                    e.event, session_id=e.session_id, user_id=e.user_id, item_id=e.item_id,
                    ts=_unix(e.ts), query=e.query, event_id=e.event_id,
                    clock=lambda: now, idempotency_key=idempotency, index=n,
                    device=e.device, region=e.region,
                )
                for n, e in enumerate(events)
            ]
            claim = None if idempotency is None else (idempotency, body_fingerprint(events))
            try:
                stored = await self.store.append(batch, claim)
            except BadRequestError as exc:
                if not isinstance(body, EventBatch) and exc.field and exc.field.startswith("events[0]"):
                    raise BadRequestError(exc.message.replace("events[0].", ""),
                                          exc.field.removeprefix("events[0].") or "body") from exc
                raise
            if _METRICS is not None:
                _METRICS.events.inc(len(stored))
            # Only events that answer a response are credited: most carry no from_request,
            # and each awaited credit would cost a task on this hot path for nothing.
            credited: list[Credit | None] = [None] * len(events)
            answering = [n for n, e in enumerate(events) if e.from_request is not None]
            if answering:
                found = await asyncio.gather(*(
                    self.feedback.credit(events[n].event, events[n].item_id,
                                         events[n].from_request) for n in answering))
                for n, a in zip(answering, found, strict=True):
                    credited[n] = a
            return EventsAccepted(accepted=len(stored), events=[
                AcceptedEvent(index=n, session_id=ev.session_id, event=ev.event,
                              item_id=ev.item_id, event_id=event_id,
                              attributed=None if a is None else Attribution(
                                  model_version=a.model_version, position=a.position))
                for n, (ev, event_id, a) in enumerate(zip(batch, stored, credited, strict=True))
            ])

    @api.post("/v1/recommendations", response_model=RecommendationResponse,
              responses=_ERROR_RESPONSES,
              # The key is optional here: a session's recommendations need none (the empty
              # requirement says so in OpenAPI); a user_id needs the client key (401 without).
              openapi_extra={"security": [{}]},
              summary="Recommend items for a user (client key) and/or a session (no key)")
    async def recommend(
        self,
        req: RecommendationRequest,
        api_key: Annotated[str | None, Security(_api_key)] = None,
    ) -> dict[str, Any]:
        async with _observed("recommendations"):
            if req.user_id is not None:
                # Everything personal (buy-again, "you buy this every week", the user's events
                # across sessions) comes with a user_id, so a user_id needs the client key.
                self.keys.require(api_key, Scope.CLIENT, "a recommendation for a user_id",
                                  hint="; without a key, ask with session_id alone "
                                       "(nothing personal is used then)")
            ctx = req.context.model_dump(exclude_none=True) if req.context is not None else None
            # One request time for everything time-dependent in answering it (session decay,
            # intent, context): context.ts when given, else the server clock.
            (snapshot, degraded), enriched = await asyncio.gather(
                self._session(req.session_id, req.user_id), self._enrich(ctx, self.clock())
            )
            signal, display = _session_context(enriched, snapshot.events)
            query = RankQuery(
                user_id=req.user_id,
                session_id=req.session_id,
                events=_wire_events(snapshot, user_only=req.session_id is None),
                context=signal,
                k=req.k,
                query=req.query,
                exclude_items=tuple(req.exclude_items),
                category=req.category,
                now=enriched["ts"],
            )
            if self.args.ranker_calls_in_flight:
                out: dict[str, Any] = await bounded(
                    self._ranker_calls().submit(query), self.args.ranker_timeout_s, "the ranker",
                    "ranker_timeout_s")
            else:
                self._ranker_calls_made += 1
                self._ranker_requests += 1
                out = await self._ranker(self.ranker.recommend.remote(query))
            return {**out, "context": ContextOut(**display), "degraded": degraded,
                    "request_id": self.feedback.served(out)}

    async def _session(self, session_id: str | None,
                       user_id: str | None) -> tuple[SessionSnapshot, list[str]]:
        """The session state of a request, and what the answer lacks (``degraded``).

        A shard that is down or slower than ``session.call_timeout_s`` does not fail the
        recommendation: it is answered without the session (the user's model history and the
        context still count), flagged ``degraded: ["session"]``.

        One shard call either way: the session's shard for a request with a session, the user's
        for one with only a user (the user's implicit session lives there too).
        """
        # The user's events across sessions only reach the ranker for a request without a
        # session (_wire_events): with a session they are not read, which would cost a second
        # shard call whenever the user's shard is not the session's (and fail the read with it).
        reader = user_id if session_id is None else None
        try:
            snapshot = await bounded(self.store.get(session_id, reader),
                                     self.args.session.call_timeout_s, "session state",
                                     "session.call_timeout_s")
        except UnavailableError as exc:
            log.warning("recommending without the session: %s", exc.message)
            sid = session_id or (None if user_id is None else f"user:{user_id}")
            return SessionSnapshot(sid, user_id, (), ()), ["session"]
        return snapshot, []

    async def _ranker(self, call: Any) -> dict[str, Any]:
        out: dict[str, Any] = await bounded(call, self.args.ranker_timeout_s, "the ranker",
                                            "ranker_timeout_s")
        return out

    @api.get("/v1/items/{item_id:id}/similar", response_model=SimilarResponse,
             responses=_ERROR_RESPONSES, summary="Item-to-item neighbours")
    async def similar(
        self,
        item_id: PathId,
        k: Annotated[int, QueryParam(ge=1, le=MAX_K)] = 20,
    ) -> dict[str, Any]:
        async with _observed("similar"):
            return await self._ranker(self.ranker.similar.remote(item_id, k))

    @api.delete("/v1/users/{user_id:id}", response_model=ForgetResponse,
                responses=_ERROR_RESPONSES,
                summary="Forget a user (admin key); a '/' in the id may be sent as it is or as %2F")
    async def forget_user(
        self,
        user_id: PathId,
        api_key: Annotated[str | None, Security(_api_key)] = None,
    ) -> ForgetResponse:
        async with _observed("forget_user"):
            self.keys.require(api_key, Scope.ADMIN, "deleting a user")
            removed, kept = await asyncio.gather(
                self.store.forget_user(user_id), self.ranker.forget_user.remote(user_id)
            )
            versions: list[str] = kept["model_versions"]
            return ForgetResponse(
                user_id=user_id, sessions_removed=removed.sessions,
                events_removed=removed.events, serving_stopped=True,
                model_versions_with_user=versions, personal_data_removed=not versions,
                remains=_remains(versions),
            )

    @api.put("/v1/items/{item_id:id}", response_model=ItemUpsertResponse,
             responses={**_ERROR_RESPONSES, 400: {"model": ErrorBody}},
             summary="Add or update a catalogue item without retraining (admin key)")
    async def put_item(
        self,
        item_id: PathId,
        body: ItemUpsert,
        api_key: Annotated[str | None, Security(_api_key)] = None,
    ) -> dict[str, Any]:
        """Embedded by the served model's item encoder and searchable on the replica that
        answers at once, on every replica within about a second plus a catalogue rebuild; kept
        under the state root across restarts and model versions (actors/added_items.py)."""
        async with _observed("put_item"):
            self.keys.require(api_key, Scope.ADMIN, "adding or updating catalogue items")
            # Not bounded by ranker_timeout_s: the catalogue rebuild takes seconds.
            out: dict[str, Any] = await self.ranker.upsert_item.remote(body.to_item(item_id))
            return out

    @api.put("/v1/items", response_model=ItemBatchResponse,
             responses={**_ERROR_RESPONSES, 400: {"model": ErrorBody}},
             summary="Add or update up to 1,000 catalogue items at once (admin key)")
    async def put_items(
        self,
        body: ItemBatch,
        api_key: Annotated[str | None, Security(_api_key)] = None,
    ) -> dict[str, Any]:
        """A catalogue import: like ``PUT /v1/items/{item_id}`` for each item, with one
        catalogue rebuild for the whole batch instead of one per item. All or nothing: an item
        that cannot be served refuses the batch, and nothing is stored."""
        async with _observed("put_items"):
            self.keys.require(api_key, Scope.ADMIN, "adding or updating catalogue items")
            out: dict[str, Any] = await self.ranker.upsert_items.remote(body.to_items())
            return out

    @api.get("/v1/model", response_model=ModelInfo, responses=_ERROR_RESPONSES,
             summary="The model version in use, its offline metrics and the answering ranker "
             "replica's training-serving skew")
    async def model(self) -> dict[str, Any]:
        async with _observed("model"):
            return await self._ranker(self.ranker.model_info.remote())

    @api.get("/v1/catalogue", response_model=CatalogueResponse, responses=_ERROR_RESPONSES,
             summary="Departments and their categories, for browsing")
    async def catalogue(self) -> dict[str, Any]:
        async with _observed("catalogue"):
            return await self._ranker(self.ranker.catalogue.remote())

    @api.get("/v1/catalogue/shoppers", response_model=ShoppersResponse,
             responses=_ERROR_RESPONSES, summary="A sample of known shoppers (client key)")
    async def shoppers(
        self,
        api_key: Annotated[str | None, Security(_api_key)] = None,
    ) -> dict[str, Any]:
        async with _observed("shoppers"):
            self.keys.require(api_key, Scope.CLIENT, "listing shoppers")
            return await self._ranker(self.ranker.shoppers.remote())

    @api.post("/v1/admin/reload", response_model=ReloadResponse,
              responses={**_ERROR_RESPONSES, 409: {"model": ErrorBody}},
              summary="Load LATEST again, or roll every ranker replica to a named version (admin key)")
    async def reload(
        self,
        body: ReloadRequest | None = None,
        api_key: Annotated[str | None, Security(_api_key)] = None,
    ) -> dict[str, Any]:
        async with _observed("reload"):
            self.keys.require(api_key, Scope.ADMIN, "reloading the model")
            # Validated on one replica, then LATEST, then every replica (actors/rollout.py).
            return await roll_out(
                self.ranker, app_name=serve.get_replica_context().app_name,
                artifacts_root=self.args.artifacts_root,
                follow_latest=self.args.model_version == "latest",
                reload_poll_s=self.args.reload_poll_s, version=body.version if body else None,
                deployment=self.ranker_deployment)

    @api.post("/v1/admin/split", response_model=SplitResponse,
              responses={**_ERROR_RESPONSES, 409: {"model": ErrorBody}},
              summary="Start (or change) an A/B split: a second version for a share of the "
                      "users, on every ranker replica (admin key)")
    async def split_start(
        self,
        body: SplitConfig,
        api_key: Annotated[str | None, Security(_api_key)] = None,
    ) -> dict[str, Any]:
        async with _observed("split"):
            self.keys.require(api_key, Scope.ADMIN, "starting a traffic split")
            return await start_split(self.ranker, app_name=serve.get_replica_context().app_name,
                                     split=body, deployment=self.ranker_deployment)

    @api.delete("/v1/admin/split", response_model=SplitResponse,
                responses={**_ERROR_RESPONSES, 409: {"model": ErrorBody}},
                summary="Stop the A/B split: one version answers every request (admin key)")
    async def split_stop(
        self,
        api_key: Annotated[str | None, Security(_api_key)] = None,
    ) -> dict[str, Any]:
        async with _observed("split"):
            self.keys.require(api_key, Scope.ADMIN, "stopping a traffic split")
            return await stop_split(self.ranker, app_name=serve.get_replica_context().app_name,
                                    deployment=self.ranker_deployment)

    @api.get("/healthz", response_model=Health, responses=_ERROR_RESPONSES,
             summary="Liveness and readiness: the ranker and every session shard")
    async def healthz(self) -> dict[str, Any]:
        """200 while recommendations can be answered: ``status`` is ``degraded`` (still a 200)
        while a session shard is down, since every ingress replica shares the shards and
        answers without the session meanwhile; a 503 when the ranker does not answer."""
        timeout = self.args.health_timeout_s
        info, shards = await asyncio.gather(
            bounded(self.ranker.model_info.remote(), timeout, "the ranker", "health_timeout_s"),
            self.store.shard_health(timeout),
        )
        down = [s for s in shards if s["status"] != "ok"]
        return {"status": "degraded" if down else "ok", "model_version": info["version"],
                "shards": shards,
                "wal_corrupt_records": sum(int(s.get("corrupt_records", 0))
                                           + int(s.get("corrupt_snapshots", 0)) for s in shards),
                # This replica's session reads and appends by way: gRPC, Ray (the fallback, or
                # session.transport: ray), and gRPC calls that failed and were resent over Ray.
                "session_calls": self.store.transport_stats(),
                # This replica's recommendation calls to the ranker and the requests they carried
                # (more requests than calls: calls were coalesced, ranker_calls_in_flight).
                "ranker_calls": {"calls": self._ranker_calls_made,
                                 "requests": self._ranker_requests}}


# --------------------------------------------------------------------------------------
# Application builders
# --------------------------------------------------------------------------------------


def compose(args: AppArgs, *, env_vars: dict[str, str] | None = None,
            clock: Clock = system_clock,
            deployments: Mapping[str, Mapping[str, Any]] | None = None) -> Application:
    """Bind the deployments into one application.

    Args:
        args: The application arguments (relative paths are resolved here).
        env_vars: Extra environment variables for every replica (merged with the cluster's
            runtime environment), e.g. the API keys in tests and the demo. Production puts the
            keys in the environment of ``ray start`` instead (docs/DEPLOY.md).
        clock: The server clock of the ingress and the session shards it starts (tests run
            the app ten years ahead with :class:`actors.clock.OffsetClock`).
        deployments: Deployment options by deployment name (``.options(...)`` keywords, e.g.
            ``{"Ingress": {"max_ongoing_requests": 4}}``), over the decorators' defaults
            (:mod:`actors.deployment_options`); the overload test sizes a small app with it.
            ``ray_actor_options`` given here are merged over the deployment's own.
            ``serve deploy`` takes these from the ``deployments`` of ``serve_config.yaml``,
            which is generated from the same module.

    Raises:
        ConfigError: No API key in this process's environment plus ``env_vars``, and anonymous
            access not allowed: the ingress replicas would refuse to start for the same reason,
            so the app is refused here, before anything is deployed.
    """
    api_keys(args, {**os.environ, **(env_vars or {})})
    args = args.resolved()
    opts: dict[str, Any] = {}
    if env_vars:
        opts = {"runtime_env": {"env_vars": dict(env_vars)}}

    def with_env(dep: Any) -> Any:
        if opts:  # the decorator's sizes (actors/deployment_options.py) plus the environment
            dep = dep.options(ray_actor_options={**(dep.ray_actor_options or {}), **opts})
        extra = dict((deployments or {}).get(dep.name, {}))
        if "num_replicas" in extra:  # a fixed size replaces the decorator's autoscaling
            extra.setdefault("autoscaling_config", None)
        if "ray_actor_options" in extra:  # over the deployment's (its runtime_env stays)
            extra["ray_actor_options"] = {**(dep.ray_actor_options or {}),
                                          **extra["ray_actor_options"]}
        return dep.options(**extra) if extra else dep

    ranker = None if args.inline_ranker else with_env(GNNRanker).bind(
        args.artifacts_root, args.model_version, args.reload_poll_s, args.tombstones_path,
        args.items_path)
    enricher = None if args.inline_context else with_env(ContextEnricher).bind(
        args.default_country, args.default_timezone)
    ingress = (cast(Any, Ingress).options(**inline_ranker_options()) if args.inline_ranker
               else Ingress)
    return with_env(ingress).bind(ranker, enricher, args.model_dump(), None, clock)


def _inside_an_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def build_app(args: AppArgs) -> Application:
    """Typed application builder for ``serve deploy serve_config.yaml`` / ``serve run``.

    Never fails for a missing model (``serve_app:app`` must import anywhere): when following
    ``latest``, the ranker serves the cold-start answer until the first model is published (a
    pinned version that does not exist fails the ranker's start). Fails, saying how to fix it,
    without an API key and without explicit anonymous access (:func:`compose`).
    """
    if not isinstance(args, AppArgs):  # Serve validates already; plain callers may pass a dict
        args = AppArgs.model_validate(args)
    # Early hint for `serve run` / `serve deploy` (not inside replicas, which import this module
    # from another working directory and only need the Ingress class).
    if args.model_version == "latest" and not _inside_an_actor():
        try:
            latest_version(args.resolved().artifacts_root)
        except ArtifactError as exc:
            log.warning("%s", exc.message)
    return compose(args)


_default_app: Application | None = None


def __getattr__(name: str) -> Any:
    """``serve_app.app``: the application with default arguments, built on first access (PEP 562),
    so that ``serve run serve_app:app`` gets the missing-model hint and a plain ``import
    serve_app`` (tests, benchmarks, replicas) builds nothing and prints nothing."""
    global _default_app
    if name == "app":
        if _default_app is None:
            _default_app = build_app(AppArgs())
        return _default_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
