"""The session shards' gRPC data plane without Ray: a real gRPC server on 127.0.0.1 stands in
for the shard's, a stand-in handle for its Ray actor handle. The same paths run against real
shard actors in ``tests/integration/test_session_actor.py``."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import pytest

from actors.shard_channel import (
    MAX_FAILURES,
    METHODS,
    RETRY_AFTER_CALLS,
    SERVICE,
    TOKEN_HEADER,
    Endpoint,
    ShardChannel,
    ShardServer,
)
from graph.errors import BadRequestError


class _Call:
    """``handle.method``: ``.remote(payload)`` answers with ``answer(payload)`` (a coroutine)
    and counts the calls."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls = 0

    def remote(self, *args: Any) -> Any:
        self.calls += 1
        return self.answer(*args)


class _Shard:
    """A stand-in shard handle: what the Ray path answers, and where its data plane listens."""

    def __init__(self, endpoint: Any = None) -> None:
        self.served: list[str] = []
        self.get_sessions = _Call(self._answer("ray", "get_sessions"))
        self.append_many = _Call(self._answer("ray", "append_many"))

        async def where() -> Any:
            return endpoint() if callable(endpoint) else endpoint
        self.endpoint = _Call(where)

    def _answer(self, way: str, method: str) -> Any:
        async def answer(payload: list[Any]) -> list[Any]:
            self.served.append(way)
            return [(method, item) for item in payload]
        return answer


async def _handlers(payload: list[Any]) -> list[Any]:
    if payload == ["raise"]:
        raise BadRequestError("raised in the shard", "events[0].item_id")
    return [("grpc", item) if item != "bad" else BadRequestError("in place", "session_id")
            for item in payload]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_calls_go_over_the_shards_port_with_results_and_errors_as_over_ray() -> None:
    async def scenario() -> tuple[Any, ...]:
        server = ShardServer(dict.fromkeys(METHODS, _handlers))
        ep = await server.endpoint("127.0.0.1")
        shard = _Shard(ep)
        ch = ShardChannel(shard, 0)
        try:
            results = await ch.call("get_sessions", ["a", "bad"])
            with pytest.raises(BadRequestError, match="raised in the shard") as raised:
                await ch.call("append_many", ["raise"])
            return results, raised.value.field, ch.grpc_calls, ch.ray_calls, shard.endpoint.calls
        finally:
            await ch.close()
            await server.stop()

    results, field, grpc_calls, ray_calls, asked = asyncio.run(scenario())
    assert results[0] == ("grpc", "a")
    assert isinstance(results[1], BadRequestError) and results[1].field == "session_id"
    assert field == "events[0].item_id"
    assert (grpc_calls, ray_calls, asked) == (2, 0, 1)  # the endpoint is asked once


def test_the_port_refuses_a_call_without_the_token_and_never_unpickles_it(tmp_path: Any) -> None:
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling it creates the marker file
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    import pickle

    evil = pickle.dumps(Payload())

    async def scenario() -> tuple[grpc.StatusCode, bool, grpc.StatusCode | None]:
        server = ShardServer(dict.fromkeys(METHODS, _handlers))
        ep = await server.endpoint("127.0.0.1")
        try:
            async with grpc.aio.insecure_channel(ep.address) as channel:
                stub = channel.unary_unary(f"/{SERVICE}/get_sessions")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub(evil, metadata=((TOKEN_HEADER, "guess"),))
                after_refusal = marker.exists()
                # With the token the same bytes are unpickled: the check is what protects.
                code = None
                try:
                    await stub(evil, metadata=((TOKEN_HEADER, ep.token),))
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                return refused.value.code(), after_refusal, code
        finally:
            await server.stop()

    refused, after_refusal, _ = asyncio.run(scenario())
    assert refused == grpc.StatusCode.UNAUTHENTICATED
    assert not after_refusal
    assert marker.exists()


def test_a_failed_grpc_call_is_resent_over_ray_and_the_endpoint_asked_again() -> None:
    dead = Endpoint(f"127.0.0.1:{_free_port()}", "token")  # nothing listens there

    async def scenario() -> tuple[Any, ...]:
        server = ShardServer(dict.fromkeys(METHODS, _handlers))
        live = await server.endpoint("127.0.0.1")
        where = iter([dead, live])  # the shard "restarted" on another port
        shard = _Shard(lambda: next(where))
        ch = ShardChannel(shard, 3)
        try:
            first = await ch.call("append_many", ["e1"])
            second = await ch.call("append_many", ["e2"])
            return first, second, ch.failed_grpc_calls, ch.ray_calls, ch.grpc_calls, shard.served
        finally:
            await ch.close()
            await server.stop()

    first, second, failed, ray_calls, grpc_calls, served = asyncio.run(scenario())
    assert first == [("append_many", "e1")] and served == ["ray"]  # resent over Ray
    assert second == [("grpc", "e2")]  # the restarted shard's new port
    assert (failed, ray_calls, grpc_calls) == (1, 1, 1)


def test_a_port_that_keeps_failing_is_left_alone_for_a_while_then_tried_again() -> None:
    dead = Endpoint(f"127.0.0.1:{_free_port()}", "token")

    async def scenario() -> tuple[int, int, int]:
        shard = _Shard(dead)
        ch = ShardChannel(shard, 1)
        for _ in range(MAX_FAILURES + RETRY_AFTER_CALLS):
            assert await ch.call("get_sessions", ["x"]) == [("get_sessions", "x")]
        asked_while_skipping = shard.endpoint.calls
        await ch.call("get_sessions", ["x"])  # the port is tried again
        return asked_while_skipping, shard.endpoint.calls, ch.failed_grpc_calls

    asked, asked_after, failed = asyncio.run(scenario())
    assert asked == MAX_FAILURES  # one ask per failed try, none while skipping
    assert asked_after == MAX_FAILURES + 1
    assert failed == MAX_FAILURES + 1


def test_a_shard_that_cannot_say_where_it_listens_counts_as_a_failed_try() -> None:
    async def scenario() -> tuple[int, int, int]:
        shard = _Shard()

        async def broken() -> Any:
            raise OSError("cannot bind the node's address")
        shard.endpoint = _Call(broken)
        ch = ShardChannel(shard, 2)
        for _ in range(MAX_FAILURES + 5):
            assert await ch.call("append_many", ["e"]) == [("append_many", "e")]
        return shard.endpoint.calls, ch.failed_grpc_calls, ch.ray_calls

    asked, failed, ray_calls = asyncio.run(scenario())
    assert (asked, failed, ray_calls) == (MAX_FAILURES, MAX_FAILURES, MAX_FAILURES + 5)


@pytest.mark.parametrize("why", ["transport ray", "no endpoint method"])
def test_without_a_data_plane_every_call_is_a_ray_call(why: str) -> None:
    async def scenario() -> tuple[Any, int]:
        shard = _Shard(Endpoint("127.0.0.1:1", "t"))
        if why == "no endpoint method":  # a shard of an earlier release
            del shard.endpoint
        ch = ShardChannel(shard, 0, use_grpc=why != "transport ray")
        out = await ch.call("get_sessions", ["s"])
        return out, ch.ray_calls

    out, ray_calls = asyncio.run(scenario())
    assert out == [("get_sessions", "s")] and ray_calls == 1
