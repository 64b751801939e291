"""HTTP load generator of ``bench/serve_bench.py``; runs in its own process.

Two modes, both bounded in requests and time and stopping by themselves:

- **closed loop**: ``concurrency`` workers, each sending its next request when the previous one
  answered (the maximum throughput at that concurrency). A warm-up period is not recorded.
- **open loop**: Poisson arrivals at a fixed ``rate`` whatever the server does; a request's
  latency counts from its *scheduled* time, so a stalled server is charged for the requests that
  queue behind the stall (no coordinated omission).

The client is aiohttp (a Ray Serve dependency): measured on this machine it costs about 0.1–0.2 ms
of CPU per request against about 1 ms for httpx, and the client shares the cores with the server.
Request bodies are JSON-encoded before the clock starts.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np


@dataclass
class LoadSpec:
    """One measurement.

    Args:
        url: Full URL (loopback).
        bodies: Request bodies, JSON-encoded; request ``i`` sends ``bodies[i % len(bodies)]``.
        mode: ``closed`` or ``open``.
        concurrency: Workers (closed loop) or the connection limit (open loop).
        rate: Arrivals per second (open loop).
        duration_s: Measured time.
        warmup_s: Unrecorded time before it (closed loop).
        max_requests: Stop after this many recorded requests.
        seed: Arrival times and body order.
        headers: Sent with every request (the API key).
    """

    url: str
    bodies: list[bytes]
    mode: str = "closed"
    concurrency: int = 1
    rate: float = 0.0
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int = 50_000
    seed: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadResult:
    """Latencies in ms; ``throughput`` in answered requests per second of measured time."""

    requests: int
    errors: int
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_ms_per_req: float
    status: dict[str, int] = field(default_factory=dict)
    # Every answered request's latency (ms), for the CDF plot; the benchmark keeps it out of its
    # results file.
    latencies_ms: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, lat_s: list[float], errors: int, seconds: float, cpu_s: float,
           status: dict[str, int]) -> LoadResult:
        arr = np.asarray(lat_s, dtype=np.float64) * 1e3 if lat_s else np.full(1, np.nan)
        p50, p95, p99 = np.percentile(arr, [50, 95, 99])
        n = len(lat_s)
        return cls(requests=n, errors=errors, throughput=n / seconds if seconds > 0 else 0.0,
                   p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99),
                   max_ms=float(np.max(arr)), client_cpu_ms_per_req=cpu_s * 1e3 / max(n + errors, 1),
                   status=status,
                   latencies_ms=[round(float(x), 3) for x in arr] if lat_s else [])


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _send(session: Any, url: str, body: bytes, status: dict[str, int]) -> bool:
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
            await r.read()
            key = str(r.status)
            ok = 200 <= r.status < 300
    except Exception as exc:  # a refused or reset connection is an error, not a crash
        key, ok = type(exc).__name__, False
    status[key] = status.get(key, 0) + 1
    return ok


async def _closed(spec: LoadSpec) -> LoadResult:
    import aiohttp

    status: dict[str, int] = {}
    lat: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=spec.concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers=spec.headers) as session:
        t_warm = time.perf_counter() + spec.warmup_s
        t_end = t_warm + spec.duration_s
        cpu0: list[float] = []
        last_done = t_warm

        async def worker(k: int) -> None:
            nonlocal errors, last_done
            i = k
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end or len(lat) + errors >= spec.max_requests:
                    return
                if t0 >= t_warm and not cpu0:
                    cpu0.append(_cpu())
                ok = await _send(session, spec.url, spec.bodies[i % len(spec.bodies)], status)
                t1 = time.perf_counter()
                i += spec.concurrency
                if t0 >= t_warm:
                    last_done = max(last_done, t1)
                    if ok:
                        lat.append(t1 - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(k) for k in range(spec.concurrency)))
    cpu = _cpu() - (cpu0[0] if cpu0 else _cpu())
    return LoadResult.of(lat, errors, last_done - t_warm, cpu, status)


async def _open(spec: LoadSpec) -> LoadResult:
    import aiohttp

    status: dict[str, int] = {}
    lat: list[float] = []
    errors = 0
    rng = random.Random(spec.seed)
    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=spec.headers) as session:
        # Warm the connections up with a few unrecorded requests.
        await asyncio.gather(*(_send(session, spec.url, spec.bodies[k % len(spec.bodies)], {})
                               for k in range(min(spec.concurrency, 8))))

        async def one(due: float, body: bytes) -> None:
            nonlocal errors
            ok = await _send(session, spec.url, body, status)
            if ok:
                lat.append(time.perf_counter() - due)  # from the scheduled time
            else:
                errors += 1

        tasks = []
        cpu0 = _cpu()
        start = time.perf_counter()
        t, i = 0.0, 0
        while i < spec.max_requests:
            t += rng.expovariate(spec.rate)
            if t > spec.duration_s:
                break
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(start + t, spec.bodies[i % len(spec.bodies)])))
            i += 1
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return LoadResult.of(lat, errors, elapsed, _cpu() - cpu0, status)


def run(spec: LoadSpec) -> LoadResult:
    """Run one measurement in this process (uvloop when available)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with ray[serve]
        pass
    return asyncio.run(_closed(spec) if spec.mode == "closed" else _open(spec))


def serve_forever(conn: Connection) -> None:
    """Worker-process loop: receive a :class:`LoadSpec` as a dict, answer the result as a dict;
    ``None`` stops it."""
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(asdict(run(LoadSpec(**msg))))
