"""Steady closed-loop traffic for the chaos runs: ``bench/chaos.py`` (several replicas) and the
integration tier's chaos tests (``tests/integration/test_resilience.py``, one and two replicas of each).

Each of ``clients`` clients posts one view event (with its own ``event_id``) and then asks for a
recommendation for that session, in a loop, from a background thread. With ``clicks=True`` the
event is instead a click, whenever the client holds an answer at least ``CLICK_AFTER_S`` old:
on the item its newest such answer ranked first, with ``from_request`` (a shopper clicks after
looking; an answer reaches the shared impression book up to 0.2 s after it is given, so a click
at once on another ingress replica would count as unknown), and whether the app credited the
click to that answer is recorded. An attempt that gets no
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
import uuid
from collections import Counter
from typing import Any

HTTP_TIMEOUT_S = 30.0  # http_options.request_timeout_s of serve_config.yaml
RETRIED = (429, 500, 503)
CLICK_AFTER_S = 0.5  # with clicks: the youngest answer a client clicks on


class SteadyLoad:
    """Start with ``load.thread.start()``; stop with ``load.stop.set()`` and join the thread.

    Attributes:
        attempts: ``(monotonic time, path, status or error name)`` of every attempt.
        acked: Session id → the event ids the app acknowledged (202).
        degraded: Recommendations answered 200 without the session (``degraded``).
        phase: A label the caller sets (``after killing the ranker``); kept with server errors.
        server_errors: ``"phase: path status body"`` of each answer ≥ 500 other than 503.
        credits: With ``clicks``: ``(monotonic time, credited)`` of each acknowledged click,
            credited when the app attributed it to the answer it came from, at position 1.
    """

    def __init__(self, url: str, items: list[str], headers: dict[str, str], clients: int = 4,
                 k: int = 10, clicks: bool = False) -> None:
        self.url, self.items, self.headers, self.clients, self.k = url, items, headers, clients, k
        self.clicks = clicks
        self.attempts: list[tuple[float, str, int | str]] = []
        self.credits: list[tuple[float, bool]] = []
        self.acked: dict[str, set[str]] = {}
        self.degraded = 0
        self.phase = "steady"
        self.server_errors: list[str] = []
        self.stop = threading.Event()
        # Session and event ids of this load only: another load on the same app (the next test
        # of a module) must not re-send these ids, which the shards would take for retries and
        # drop as duplicates.
        self.run_id = uuid.uuid4().hex[:8]
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def ids(self, client: int, n: int) -> tuple[str, str]:
        """The session id and event id of client ``client``'s ``n``-th event (20 per session)."""
        return f"chaos-{self.run_id}-{client}-{n // 20}", f"chaos-{self.run_id}-{client}-{n}"

    @property
    def outcomes(self) -> Counter[int | str]:
        """Attempts by status (or error name)."""
        return Counter(o for _, _, o in list(self.attempts))

    def successes(self) -> int:
        return sum(1 for _, _, o in list(self.attempts) if o in (200, 202))

    async def _send(self, client: Any, path: str,
                    body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """The final status (0: stopped while failing) and the JSON body of a 200 or 202."""
        import httpx

        while True:
            try:
                r = await client.post(self.url + path, json=body, headers=self.headers)
            except httpx.HTTPError as exc:  # a replica restarting under the connection: retry
                self.attempts.append((time.monotonic(), path, type(exc).__name__))
                if self.stop.is_set():
                    return 0, None
            else:
                self.attempts.append((time.monotonic(), path, r.status_code))
                if r.status_code >= 500 and r.status_code != 503:
                    self.server_errors.append(f"{self.phase}: {path} {r.status_code} {r.text[:300]}")
                answer = r.json() if r.status_code in (200, 202) else None
                if answer is not None and path.endswith("recommendations") and answer.get("degraded"):
                    self.degraded += 1
                if r.status_code not in RETRIED or self.stop.is_set():
                    return r.status_code, answer
            await asyncio.sleep(0.2)

    async def _client(self, client: Any, c: int) -> None:
        n = 0
        shown: list[tuple[float, dict[str, Any]]] = []  # answers not yet clicked, with clicks on
        while not self.stop.is_set():
            n += 1
            sid, eid = self.ids(c, n)
            event = {"session_id": sid, "event": "view", "event_id": eid,
                     "item_id": self.items[(c * 11 + n) % len(self.items)]}
            cutoff = time.monotonic() - CLICK_AFTER_S
            old = [a for t, a in shown if t <= cutoff]  # a prefix: shown is in time order
            if old:  # click the newest answer old enough; forget it and the older ones
                shown = shown[len(old):]
                event.update(event="click", item_id=old[-1]["items"][0]["item_id"],
                             from_request=old[-1]["request_id"])
            status, accepted = await self._send(client, "/v1/events", event)
            if status == 202:
                self.acked.setdefault(sid, set()).add(eid)
                if "from_request" in event and accepted is not None:
                    credit = accepted["events"][0]["attributed"]
                    self.credits.append((time.monotonic(),
                                         credit is not None and credit["position"] == 1))
            status, answer = await self._send(client, "/v1/recommendations",
                                              {"session_id": sid, "k": self.k})
            if self.clicks and answer is not None and answer["items"]:
                shown.append((time.monotonic(), answer))

    async def _run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, limits=limits) as client:
            await asyncio.gather(*(self._client(client, c) for c in range(self.clients)))
