"""The server clock, injectable.

Everything online that needs "now" takes a :data:`Clock` instead of calling ``time.time()``: the
ingress (request time, stamping events sent without ``ts``), the session store and its shards
(validation of event times, TTL). Tests and replays inject another clock, e.g. one ten years
ahead, without sleeping or patching the process's time.

A clock crosses process boundaries (Serve replicas, shard actors) by pickling, so it is a plain
function or a small picklable object such as :class:`OffsetClock`, never a lambda over local
state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
"""Unix seconds, like ``time.time``."""


def system_clock() -> float:
    """The machine's clock (``time.time()``): the default everywhere."""
    return time.time()


@dataclass(frozen=True)
class OffsetClock:
    """The machine's clock shifted by ``offset_s`` seconds (positive: in the future).

    Args:
        offset_s: Seconds added to ``time.time()``.
    """

    offset_s: float

    def __call__(self) -> float:
        return time.time() + self.offset_s
