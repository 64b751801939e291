"""Steady closed-loop traffic for the chaos runs: ``bench/chaos.py`` (several replicas) and the
integration tier's chaos tests (``tests/integration/test_resilience.py``, one and two replicas of each).

Each of ``clients`` clients posts one view event (with its own ``event_id``) and then asks for a
recommendation for that session, in a loop, from a background thread. An attempt that gets no
answer, a 429, a 503 or the proxy's 500 is retried with the same body after 0.2 s (safe: the
event id makes the retry idempotent); any other answer ends the request. Every attempt is
recorded with its time, path and status (or the transport error's name); answers of 500 and up
other than 503 are kept with the phase they came in, for the test to tell the app's errors from
the proxy's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

HTTP_TIMEOUT_S = 30.0  # http_options.request_timeout_s of serve_config.yaml
RETRIED = (429, 500, 503)


class SteadyLoad:
    """Start with ``load.thread.start()``; stop with ``load.stop.set()`` and join the thread.

    Attributes:
        attempts: ``(monotonic time, path, status or error name)`` of every attempt.
        acked: Session id → the event ids the app acknowledged (202).
        degraded: Recommendations answered 200 without the session (``degraded``).
        phase: A label the caller sets (``after killing the ranker``); kept with server errors.
        server_errors: ``"phase: path status body"`` of each answer ≥ 500 other than 503.
    """

    def __init__(self, url: str, items: list[str], headers: dict[str, str], clients: int = 4,
                 k: int = 10) -> None:
        self.url, self.items, self.headers, self.clients, self.k = url, items, headers, clients, k
        self.attempts: list[tuple[float, str, int | str]] = []
        self.acked: dict[str, set[str]] = {}
        self.degraded = 0
        self.phase = "steady"
        self.server_errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    @property
    def outcomes(self) -> Counter[int | str]:
        """Attempts by status (or error name)."""
        return Counter(o for _, _, o in list(self.attempts))

    def successes(self) -> int:
        return sum(1 for _, _, o in list(self.attempts) if o in (200, 202))

    async def _send(self, client: Any, path: str, body: dict[str, Any]) -> int:
        import httpx

        while True:
            try:
                r = await client.post(self.url + path, json=body, headers=self.headers)
            except httpx.HTTPError as exc:  # a replica restarting under the connection: retry
                self.attempts.append((time.monotonic(), path, type(exc).__name__))
                if self.stop.is_set():
                    return 0
            else:
                self.attempts.append((time.monotonic(), path, r.status_code))
                if r.status_code >= 500 and r.status_code != 503:
                    self.server_errors.append(f"{self.phase}: {path} {r.status_code} {r.text[:300]}")
                if (r.status_code == 200 and path.endswith("recommendations")
                        and r.json().get("degraded")):
                    self.degraded += 1
                if r.status_code not in RETRIED or self.stop.is_set():
                    return r.status_code
            await asyncio.sleep(0.2)

    async def _client(self, client: Any, c: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            sid, eid = f"chaos-{c}-{n // 20}", f"chaos-{c}-{n}"
            event = {"session_id": sid, "event": "view", "event_id": eid,
                     "item_id": self.items[(c * 11 + n) % len(self.items)]}
            if await self._send(client, "/v1/events", event) == 202:
                self.acked.setdefault(sid, set()).add(eid)
            await self._send(client, "/v1/recommendations", {"session_id": sid, "k": self.k})

    async def _run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, limits=limits) as client:
            await asyncio.gather(*(self._client(client, c) for c in range(self.clients)))
