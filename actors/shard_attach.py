"""Attaching to the session shards: a shard that runs other settings than the app asks for is
refused, never silently kept.

The shards are named, detached actors (:class:`actors.session_state.SessionStore`): they outlive
the ingress replicas and ``serve shutdown``, and a client attaches to a running shard by name
(``get_if_exists=True``), whatever settings that shard was started with. So a redeploy with a new
``wal_uri``, ``fsync`` or window would keep the old shards running the old settings, and a new
``num_shards`` would start empty shards beside the old ones, which keep the sessions. The ingress
therefore checks every shard when it starts (:func:`check_attached`) and refuses to start with a
:class:`~graph.errors.ConfigError` that says how to apply the change:

    serve shutdown -y
    python -m actors.shard_attach kill --prefix intentrec-session --namespace intentrec
    serve deploy serve_config.yaml

Killing the shards loses no acknowledged event: each one is in the write-ahead log under
``wal_uri``, and shards started on the same ``wal_uri`` and ``num_shards`` replay it.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from graph.errors import ConfigError, UnavailableError

if TYPE_CHECKING:
    from actors.session_state import SessionStateConfig, SessionStore

# Settings only the client reads: they may differ between an app and the shards it attaches to.
CLIENT_ONLY = frozenset({"call_timeout_s", "transport"})
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d+)-of-(?P<count>\d+)$")


def drift(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Shard settings that differ: ``{name: (what the shard runs, what the app asks for)}``."""
    return {k: (theirs.get(k), v) for k, v in mine.items()
            if k not in CLIENT_ONLY and theirs.get(k) != v}


def fix_hint(config: SessionStateConfig) -> str:
    """The commands that apply a changed session setting (the module docstring's recipe)."""
    return (
        "The shards are detached actors that outlive the app and `serve shutdown`, so a "
        "redeploy alone does not change them. To apply the new settings: `serve shutdown -y`, "
        f"then `python -m actors.shard_attach kill --prefix {config.actor_prefix} --namespace "
        f"{config.namespace}`, then deploy again (acknowledged events stay in the write-ahead "
        "log and are replayed by shards started on the same wal_uri and num_shards); or deploy "
        "with the settings the shards run"
    )


def drift_error(config: SessionStateConfig, shard: str, diff: Mapping[str, tuple[Any, Any]]
                ) -> ConfigError:
    """The error for one shard that runs other settings than ``config``."""
    what = ", ".join(f"{k}={old!r} (the app asks for {new!r})" for k, (old, new) in diff.items())
    first = next(iter(diff))
    return ConfigError(f"session shard {shard} already runs with {what}. {fix_hint(config)}",
                       field=f"session.{first}")


def other_shard_counts(config: SessionStateConfig, names: list[dict[str, str]]) -> list[str]:
    """Running shards of ``config.actor_prefix`` started with another ``num_shards``.

    Args:
        config: The app's session configuration.
        names: Named actors as :func:`ray.util.list_named_actors` with ``all_namespaces=True``
            lists them (``{"name", "namespace"}``).
    """
    out = []
    for entry in names:
        m = _SHARD_NAME.match(entry.get("name", ""))
        if (m and entry.get("namespace") == config.namespace
                and m["prefix"] == config.actor_prefix and int(m["count"]) != config.num_shards):
            out.append(entry["name"])
    return sorted(out)


def check_attached(store: SessionStore, timeout_s: float = 120.0) -> None:
    """Wait for every shard of ``store`` and check it runs the store's settings (blocking: for a
    replica constructor, before it serves anything). The wait is ``timeout_s``, not one call's
    ``call_timeout_s``: a shard's first start (a new worker process) or its replay of a long log
    takes longer than one call may.

    Raises:
        ConfigError: A shard runs other settings, or shards of another ``num_shards`` with the
            same prefix still run (their sessions would be invisible to this app); the message
            says how to apply the change.
        UnavailableError: A shard did not answer within ``timeout_s``.
    """
    import ray
    from ray.util import list_named_actors

    config = store.config
    try:
        running = ray.get([h.ping.remote() for h in store.handles], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise UnavailableError(
            f"session shards of {config.actor_prefix} did not start within {timeout_s:.0f}s; "
            "check the cluster has room for them (`ray status`) and the shards' logs "
            "(`ray logs actor`)"
        ) from exc
    mine = config.model_dump()
    for i, theirs in enumerate(running):
        diff = drift(mine, theirs)
        if diff:
            raise drift_error(config, config.shard_name(i), diff)
    stale = other_shard_counts(config, list_named_actors(all_namespaces=True))
    if stale:
        raise ConfigError(
            f"session shards {stale} of another num_shards still run beside the "
            f"{config.num_shards} this app asks for; changing num_shards starts from empty "
            f"session state, and the sessions in the old shards would be invisible. "
            f"{fix_hint(config)}",
            field="session.num_shards",
        )


def kill_shards(prefix: str, namespace: str, wait_s: float = 60.0) -> list[str]:
    """Kill every running shard named ``<prefix>-<i>-of-<n>`` in ``namespace``, any ``n``, and
    return once their names are free: ``ray.kill`` returns before the GCS has released them, and
    a deploy in that window would attach to the dying shards.

    Raises:
        UnavailableError: A name was still taken after ``wait_s`` seconds.
    """
    import ray
    from ray.util import list_named_actors

    killed = []
    for entry in list_named_actors(all_namespaces=True):
        m = _SHARD_NAME.match(entry.get("name", ""))
        if m and m["prefix"] == prefix and entry.get("namespace") == namespace:
            ray.kill(ray.get_actor(entry["name"], namespace=namespace), no_restart=True)
            killed.append(entry["name"])
    deadline = time.monotonic() + wait_s
    for name in killed:
        while _named_actor_exists(name, namespace):
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"session shard {name} was killed but its name is still taken after "
                    f"{wait_s:.0f}s; run the kill again, and check `ray list actors` for it")
            time.sleep(0.1)
    return sorted(killed)


def _named_actor_exists(name: str, namespace: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m actors.shard_attach kill``: remove the session shards (and the shared
    impression book) so that the next deploy starts them with its settings (run on a node of the
    cluster, after ``serve shutdown``)."""
    from actors.feedback import book_name, kill_book
    from actors.session_state import SessionStateConfig

    defaults = SessionStateConfig()
    p = argparse.ArgumentParser(prog="python -m actors.shard_attach", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    kill = sub.add_parser("kill", help="kill the session shards (their logs stay)")
    kill.add_argument("--prefix", default=defaults.actor_prefix, help="session.actor_prefix")
    kill.add_argument("--namespace", default=defaults.namespace, help="session.namespace")
    kill.add_argument("--address", default="auto", help="Ray address (default: this cluster)")
    args = p.parse_args(argv)
    import ray

    ray.init(address=args.address, log_to_driver=False)
    killed = kill_shards(args.prefix, args.namespace)
    print(f"killed {len(killed)} session shard(s): {', '.join(killed) or 'none running'}")
    # The app's other detached actor: the impression book (actors/feedback.py), which a new
    # deploy then starts afresh with its impressions_capacity.
    if kill_book(book_name(args.prefix), args.namespace):
        print(f"killed the shared impression book {book_name(args.prefix)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
