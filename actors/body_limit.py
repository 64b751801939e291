"""A request-body limit for the ingress, enforced before the body is read.

Every request model bounds its strings and lists, but only after FastAPI has read and parsed the
whole body; without a limit in front, one request with a 2 GB body makes a replica allocate 2 GB.
:class:`BodyLimit` is ASGI middleware that answers 413 first:

- a ``Content-Length`` over the limit is refused at once, without reading a byte of the body (the
  HTTP server discards what the client still sends, and keeps the connection);
- a body without one (``Transfer-Encoding: chunked``) is read chunk by chunk up to the limit and
  refused as soon as it passes it, so at most the limit plus one chunk is ever held; a body
  within the limit is handed on unchanged.

The limit is ``AppArgs.max_body_bytes`` (1 MiB by default). It runs in the ingress replica: put
the same limit in a load balancer in front of the cluster to keep large bodies off the proxy too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from graph.errors import PayloadTooLargeError

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full batch of 500 events is about 80 KB

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes()`` bytes get a 413 with a JSON error body.

    Args:
        app: The application behind it.
        max_bytes: The limit, read per request (the ingress sets it from its arguments after the
            FastAPI app, and this middleware with it, was created).
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        declared = _content_length(scope)
        if declared is not None:
            # The HTTP server never delivers more than Content-Length: checking it is enough.
            if declared > limit:
                await _too_large(send, limit, declared)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            chunks.append(message)
            if message["type"] != "http.request":  # the client went away
                break
            size += len(message.get("body", b""))
            if size > limit:
                await _too_large(send, limit, None)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, limit: int, declared: int | None) -> None:
    what = (f"the request body has {declared} bytes, over the limit of {limit} bytes"
            if declared is not None else f"the request body is over the limit of {limit} bytes")
    if limit % (1 << 20) == 0:
        what += f" ({limit >> 20} MiB)"
    err = PayloadTooLargeError(f"{what}: send fewer events per request, or raise max_body_bytes "
                               "in the app's args", "body")
    body = json.dumps(err.to_dict()).encode()
    await send({"type": "http.response.start", "status": err.http_status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
