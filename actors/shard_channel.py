"""The session shards' data plane: reads and appends over a direct gRPC connection.

A Ray actor call costs the caller and the actor about 1.6 ms of CPU together on the 2-core box
(``python bench/shard_rpc.py``: 0.9 ms in the actor, 0.7 ms in the caller), most of it Ray's
task machinery (task specs, the hand-over from the core worker's thread to the actor's event
loop, task events), while the shard's own read takes microseconds. A unary gRPC call served on
the actor's own event loop costs about 0.6 ms. Ray Serve makes the same trade between replicas
(gRPC instead of actor calls, ``RAY_SERVE_THROUGHPUT_OPTIMIZED``); this module makes it for the
two calls every request makes: ``get_sessions`` and ``append_many``.

- Control stays with Ray: the shard is the same named, detached, restartable actor, and a client
  finds the data port by asking it (:meth:`ShardServer.endpoint` behind
  ``SessionShard.endpoint``), over Ray, whose own authentication (``RAY_AUTH_MODE=token``)
  covers the answer. Everything else (``claim``, ``forget_user``, ``stats``, ``ping``) stays a Ray
  call.
- The port listens on the node's Ray address only (127.0.0.1 on a local cluster) and accepts a
  call only with the shard's token: a random secret made when the shard starts, handed out with
  the address. The payload is unpickled only after the token matched, so nobody who could not
  already call the actor through Ray can make the shard load a pickle.
- Ray stays the fallback, never a second source of truth: :class:`ShardChannel` sends a call the
  gRPC way when it can and the Ray way when it cannot (a shard of an earlier release without the
  port, ``session.transport: ray``, a refused connection, a shard that died: Ray's call waits for
  the restart as before). Both ways reach the same methods, and a resent append is stored once
  (events are deduplicated by id), so a call that fails half-way over gRPC and is resent over Ray
  neither loses nor doubles anything.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

logger = logging.getLogger(__name__)

SERVICE = "intentrec.SessionShard"
# The shard methods that go over the data plane (the hot ones); the rest stay Ray calls.
METHODS = ("get_sessions", "append_many")
TOKEN_HEADER = "x-intentrec-shard-token"
# A coalesced batch is a few kB; the bound only guards against a runaway one.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# After this many failed gRPC calls in a row a channel sends over Ray alone, and tries its port
# again after RETRY_AFTER_CALLS calls (counted, not timed: no clock in the transport).
MAX_FAILURES = 3
RETRY_AFTER_CALLS = 1000


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a shard's data plane listens and the token it asks for."""

    address: str
    token: str


class ShardServer:
    """The gRPC server inside one shard actor, on the actor's event loop.

    Args:
        handlers: The shard's coroutine per method name in :data:`METHODS`; each takes the
            unpickled payload and returns what the Ray call would return.
    """

    def __init__(self, handlers: Mapping[str, Callable[[Any], Awaitable[Any]]]) -> None:
        missing = set(METHODS) - set(handlers)
        if missing:
            raise ValueError(f"no handler for {sorted(missing)}")
        self._handlers = dict(handlers)
        self._token = secrets.token_urlsafe(32)
        self._server: grpc.aio.Server | None = None
        self._endpoint: Endpoint | None = None

    async def endpoint(self, host: str) -> Endpoint:
        """Start listening on ``host`` (once; a free port) and say where."""
        if self._endpoint is None:
            server = grpc.aio.server(options=_OPTIONS)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                SERVICE, {name: grpc.unary_unary_rpc_method_handler(self._method(name))
                          for name in METHODS}),))
            port = server.add_insecure_port(f"{host}:0")
            await server.start()
            self._server = server
            self._endpoint = Endpoint(f"{host}:{port}", self._token)
        return self._endpoint

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
            self._endpoint = None

    def _method(self, name: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        handler = self._handlers[name]
        token = self._token.encode()

        async def serve(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            sent = dict(context.invocation_metadata() or ()).get(TOKEN_HEADER, "")
            if not hmac.compare_digest(str(sent).encode(), token):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "wrong or missing shard token; ask the shard actor for its endpoint")
            payload = pickle.loads(request)  # only after the token matched
            try:
                reply: tuple[bool, Any] = (True, await handler(payload))
            except Exception as exc:  # raised on the caller's side, as a Ray call would
                reply = (False, exc)
            return pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)

        return serve


class ShardChannel:
    """One client's way to one shard's reads and appends: gRPC when it can, Ray otherwise.

    Bound to the event loop it is first used on (a gRPC channel is); the store keeps one per shard
    and loop.

    Args:
        handle: The shard's Ray actor handle (or anything with ``.method.remote(payload)``
            awaitables; without an ``endpoint`` method every call is a Ray call).
        shard: The shard's index (for logs).
        use_grpc: False sends every call over Ray (``session.transport: ray``).
    """

    def __init__(self, handle: Any, shard: int, use_grpc: bool = True) -> None:
        self.loop = asyncio.get_running_loop()
        self._handle = handle
        self._shard = shard
        self._use_grpc = use_grpc and _has_method(handle, "endpoint")
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[str, Any] = {}
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._address = ""
        self._failures = 0
        self._skip = 0
        self.grpc_calls = 0
        self.ray_calls = 0
        self.failed_grpc_calls = 0

    async def call(self, method: str, payload: Any) -> Any:
        """``method(payload)`` on the shard: its result, or its exception raised here."""
        if self._use_grpc and self._skip == 0:
            stubs = await self._connect()
            if stubs is not None:
                try:
                    raw = await stubs[method](pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL),
                                              metadata=self._metadata)
                except grpc.aio.AioRpcError as exc:
                    await self._failed(f"{exc.code().name} {exc.details()}")
                else:
                    self._failures = 0
                    self.grpc_calls += 1
                    ok, value = pickle.loads(raw)
                    if ok:
                        return value
                    raise value
        elif self._skip:
            self._skip -= 1
        self.ray_calls += 1
        return await getattr(self._handle, method).remote(payload)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stubs = {}

    async def _connect(self) -> dict[str, Any] | None:
        if self._channel is None:
            try:
                ep: Endpoint | None = await self._handle.endpoint.remote()
            except Exception as exc:  # the Ray call below reports a dead shard
                await self._failed(f"no endpoint: {exc!r}")
                return None
            if ep is None:  # the shard runs without a data plane
                self._use_grpc = False
                return None
            if self._channel is not None:  # another call connected meanwhile
                return self._stubs
            self._channel = grpc.aio.insecure_channel(ep.address, options=_OPTIONS)
            self._stubs = {m: self._channel.unary_unary(f"/{SERVICE}/{m}") for m in METHODS}
            self._metadata = ((TOKEN_HEADER, ep.token),)
            self._address = ep.address
        return self._stubs

    async def _failed(self, why: str) -> None:
        """A failed gRPC call (or endpoint ask): forget the endpoint (the shard may have restarted
        elsewhere) and let this call go over Ray; after :data:`MAX_FAILURES` in a row, use Ray
        for a while."""
        self.failed_grpc_calls += 1
        self._failures += 1
        address = self._address
        await self.close()
        if self._failures >= MAX_FAILURES:
            self._failures = 0
            self._skip = RETRY_AFTER_CALLS
            logger.warning(
                "session shard %d: %d gRPC calls in a row to its data port %s failed (last: %s); "
                "the next %d calls go through Ray actor calls, then the port is tried again. "
                "If this repeats, check that the port is reachable from this node (firewall, "
                "security group), or set session.transport: ray",
                self._shard, MAX_FAILURES, address or "(unknown)", why, RETRY_AFTER_CALLS)
        else:
            logger.info("session shard %d: gRPC call to %s failed (%s); resending over Ray",
                        self._shard, address or "(unknown)", why)


def _has_method(handle: Any, name: str) -> bool:
    try:
        getattr(handle, name)
    except AttributeError:
        return False
    return True
