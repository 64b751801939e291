"""The request-body limit (actors/body_limit.py): 413 before the body is read, as plain ASGI."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from actors.body_limit import BodyLimit

LIMIT = 1000


class Recorder:
    """An app behind the middleware: records whether it ran and what body it read."""

    def __init__(self) -> None:
        self.body: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        self.body = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _call(chunks: list[bytes], content_length: int | None) -> tuple[int, dict[str, Any] | None,
                                                                    Recorder, int]:
    """Send one POST through the middleware; returns (status, JSON body or None, app, chunks
    the middleware or the app pulled from the client)."""
    app = Recorder()
    headers = [(b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/events", "headers": headers}
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        i = pulled - 1
        return {"type": "http.request", "body": chunks[i] if i < len(chunks) else b"",
                "more_body": i < len(chunks) - 1}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    asyncio.run(BodyLimit(app, lambda: LIMIT)(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(payload) if status != 200 else None, app, pulled


def test_a_declared_length_over_the_limit_is_refused_without_reading_the_body() -> None:
    status, body, app, pulled = _call([b"x" * 600] * 10, content_length=6000)
    assert status == 413 and pulled == 0 and app.body is None
    assert body is not None and body["error"] == "PayloadTooLargeError" and body["field"] == "body"
    assert "6000 bytes" in body["message"] and str(LIMIT) in body["message"]


def test_a_chunked_body_is_cut_off_once_past_the_limit() -> None:
    status, body, app, pulled = _call([b"x" * 300] * 100, content_length=None)
    assert status == 413 and app.body is None
    assert pulled == 4  # 1,200 bytes: the first chunk over 1,000, not the 30,000 sent
    assert body is not None and "over the limit of 1000 bytes" in body["message"]


@pytest.mark.parametrize("content_length", [LIMIT, None])
def test_a_body_at_the_limit_reaches_the_app_unchanged(content_length: int | None) -> None:
    chunks = [b"a" * 400, b"b" * 400, b"c" * 200]
    status, _, app, _ = _call(chunks, content_length)
    assert status == 200 and app.body == b"".join(chunks)


def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    async def nothing() -> dict[str, Any]:
        raise AssertionError("not read")

    async def drop(msg: Any) -> None:
        pass

    asyncio.run(BodyLimit(app, lambda: 1)({"type": "lifespan"}, nothing, drop))
    assert seen == ["lifespan"]
