"""Small test helpers shared by every tier."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for_condition(
    predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.2, what: str = ""
) -> None:
    """Poll ``predicate`` until it returns True; fail with a readable message at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # the condition may raise while a server is coming up
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(
        f"condition {what or predicate!r} not met within {timeout}s (last error: {last_exc!r})"
    )


def artifact_parts(art: Any, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`graph.artifacts.write_artifact` that re-publish ``art``
    (a :func:`graph.artifacts.read_artifact` result) as another version; ``overrides`` replace
    any of them (``item_emb=...``, ``metrics=...``)."""
    parts = {"user_ids": art.user_ids, "items": art.items, "user_emb": art.user_emb,
             "item_emb": art.item_emb, "signals": art.signals, "metrics": {}, "manifest": {},
             "learned": art.learned, "item_static": art.item_static, "text": art.text,
             "item_encoder": art.item_encoder}
    return {**parts, **overrides}
