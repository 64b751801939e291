"""A deployment's object in this process, called as if through a Serve handle.

``handle.method.remote(*args)`` returns an awaitable that runs ``method`` of the wrapped object
on the caller's event loop: the call shape of a ``DeploymentHandle`` (or a Ray actor handle)
without a hop. The ingress ranks through one when ``AppArgs.inline_ranker`` puts the ranker in
its own process; the in-process bound of ``bench/serve_bench.py`` replaces every hop with one.
"""

from __future__ import annotations

import inspect
from typing import Any


class _Method:
    """``handle.method.remote(*args)`` → an awaitable running ``method`` in this process."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.fn, args, kwargs)


async def _run(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    out = fn(*args, **kwargs)
    return await out if inspect.isawaitable(out) else out


class LocalHandle:
    """Stands in for a ``DeploymentHandle`` / actor handle: same call shape, no Ray.

    Args:
        target: The object whose methods the calls run (sync or async methods).
    """

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.target, name))
