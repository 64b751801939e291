"""Overload and fault answers of the online path: bounded queues, bounded waits, honest 503s.

Every deployment bounds its queue (``max_queued_requests``, sized in
:mod:`actors.deployment_options`); a request beyond it is refused at once with a 503 and a
``Retry-After`` header of :data:`RETRY_AFTER_S` seconds (Serve's ``BackPressureError``), never
queued without limit. Every call the ingress makes to another
component is bounded too (:func:`bounded`), by a timeout shorter than the HTTP request timeout, so
a slow or dead component gives a 503 the client can retry instead of a hang, and a replica that
dies under a request gives a 503, not a 500.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import ray
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from graph.errors import UnavailableError

T = TypeVar("T")

# Seconds a client should wait before retrying a 503 (the Retry-After header of every 503).
RETRY_AFTER_S = 1
# Errors that mean "this component cannot answer now; retrying may work": a full queue, a
# deployment that is not running, a replica or actor that died under the request.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    BackPressureError, DeploymentUnavailableError, ray.exceptions.RayActorError,
)


def retry_after_headers() -> dict[str, str]:
    """The headers of every 503 the ingress answers."""
    return {"Retry-After": str(RETRY_AFTER_S)}


def unavailable(exc: BaseException, what: str) -> UnavailableError:
    """A transient failure of ``what`` as the project's 503 error (with a retry hint)."""
    if isinstance(exc, BackPressureError):
        reason = f"is overloaded ({exc.message})"
    elif isinstance(exc, DeploymentUnavailableError):
        reason = "is not running"
    else:
        reason = "restarted while answering"
    return UnavailableError(f"{what} {reason}; retry after {RETRY_AFTER_S} s")


async def bounded(call: Awaitable[T], timeout_s: float, what: str, setting: str) -> T:
    """Await ``call`` for at most ``timeout_s`` seconds.

    Args:
        call: A Serve ``DeploymentResponse`` or any awaitable (cancelled on timeout).
        timeout_s: The limit.
        what: The component, in words ("the ranker"), for the error message.
        setting: The setting that holds ``timeout_s`` (named in the error so it can be changed).

    Raises:
        UnavailableError: (503) ``call`` took longer, the component's queue was full, or its
            replica died under the request.
    """
    try:
        return await asyncio.wait_for(call, timeout=timeout_s)
    except TimeoutError as exc:
        raise UnavailableError(
            f"{what} did not answer within {timeout_s} s ({setting}); retry after "
            f"{RETRY_AFTER_S} s"
        ) from exc
    except TRANSIENT_ERRORS as exc:
        raise unavailable(exc, what) from exc
