"""One core per busy replica: the ranker's and the ingress's threads kept on a core of their own.

A Serve replica is one process with about 35 threads: the event loop that runs the app's code
(and Serve's, FastAPI's and gRPC's Python side), gRPC's native pool, the core worker's threads.
A request wakes several of them in turn, and left to itself the kernel spreads them over the
node's cores, so at low load each request finds the replica's data in another core's caches
(``bench/serve_threads.py``: at concurrency 1 about 20 context switches and 3-5 migrations per
request in each of the ranker and the ingress). Keeping every thread of a replica on one core
cost 0.2-0.5 ms less CPU per recommendation at concurrency 8 and 32 on the 2-core box (1.04-1.12x
the throughput), and 0.6-1.3 ms less at concurrency 1 in three of four pairs; p99 rose when both
cores were full (``docs/PERFORMANCE.md``, "By thread, and one core per replica").

:func:`pin_to_core` puts the calling process (all its threads, and those it starts later) on one
core of those it may use, chosen with the node's other pinned replicas in mind: every replica
that pins itself records its core and weight (its Ray CPU reservation) in a small registry on the
node (:data:`REGISTRY`, one file per process, under a lock), and a new one takes the core with
the least weight on it, so replicas share a core only when there are more of them than cores.
Entries of processes that have exited are dropped. Everything else on the node (the session
shards, the enricher, HAProxy, Ray's own processes) keeps the kernel's placement, around the
pinned replicas.

A replica that reserves more than one CPU gets as many cores (rounded up), so pinning never
caps what it was given. A replica is never pinned on a node with one usable core (nothing to gain), without
``os.sched_setaffinity`` (not Linux), or when the registry cannot be written: it then runs
where the kernel puts it and says so in its log. ``AppArgs.pin_replicas: false`` turns this off.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

REGISTRY = Path(tempfile.gettempdir()) / "intentrec-cpu-affinity"


def cpu_reservation() -> float:
    """This process's Ray CPU reservation (a replica's ``ray_actor_options.num_cpus``); 1.0
    outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return 1.0
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))


def choose_core(cores: Iterable[int], claims: Iterable[tuple[int, float]]) -> int:
    """The core with the least claimed weight among ``cores`` (ties: the fewest claims, then the
    lowest number). ``claims`` are (core, weight) of the live pinned processes; claims on cores
    outside ``cores`` are ignored.

    Raises:
        ValueError: ``cores`` is empty.
    """
    load = {c: [0.0, 0] for c in sorted(set(cores))}
    if not load:
        raise ValueError("no core to choose from")
    for core, weight in claims:
        if core in load:
            load[core][0] += weight
            load[core][1] += 1
    return min(load, key=lambda c: (round(load[c][0], 6), load[c][1], c))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def choose_cores(cores: Iterable[int], claims: Iterable[tuple[int, float]], weight: float) -> list[int]:
    """The ``ceil(weight)`` cores (at least one, at most all) a process of CPU reservation
    ``weight`` takes: one at a time by :func:`choose_core`, each counted with its share of the
    weight before the next is chosen. A replica reserving 2 CPUs gets two cores, not one."""
    pool = sorted(set(cores))
    n = min(len(pool), max(1, math.ceil(weight - 1e-9)))
    share = weight / n
    taken: list[int] = []
    claimed = list(claims)
    for _ in range(n):
        core = choose_core([c for c in pool if c not in taken], claimed)
        taken.append(core)
        claimed.append((core, share))
    return sorted(taken)


def _live_claims(registry: Path) -> list[tuple[int, float]]:
    """(core, weight) of the registry's live processes, one per core a process holds (its
    weight shared among them); entries of exited processes, and this process's own, are
    removed."""
    out = []
    for entry in registry.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cores_s, weight_s = entry.read_text().split()
            held = [int(c) for c in cores_s.split(",")]
            claim = [(c, float(weight_s) / len(held)) for c in held]
        except (OSError, ValueError):  # half-written by a process that died: drop it
            claim = []
        if not claim or pid == os.getpid() or not _alive(pid):
            entry.unlink(missing_ok=True)
            continue
        out.extend(claim)
    return out


def _pin_threads(cores: list[int]) -> None:
    """Every thread of this process on ``cores`` (twice over: a thread started by one not yet
    pinned inherits the old mask)."""
    for _ in range(2):
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except (ProcessLookupError, FileNotFoundError):  # the thread ended meanwhile
                continue
    os.sched_setaffinity(0, cores)


def pin_to_core(weight: float, what: str, registry: Path | None = None) -> list[int] | None:
    """Pin this process to the least-claimed core(s) of those it may use (one, or
    ``ceil(weight)`` for a reservation above one CPU: :func:`choose_cores`); returns the cores,
    or None when it stays where the kernel puts it (one usable core, not Linux, or the registry
    or the affinity call failed: logged).

    Args:
        weight: This process's CPU reservation (Ray's ``num_cpus``), for its own core count and
            the next processes' choices.
        what: The replica, for the log (``"GNNRanker replica"``).
        registry: The node's registry folder (default :data:`REGISTRY`).
    """
    if not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir():
        log.info("%s not pinned to a core: this OS has no per-thread CPU affinity", what)
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    folder = REGISTRY if registry is None else registry
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            chosen = choose_cores(cores, _live_claims(folder), weight)
            (folder / str(os.getpid())).write_text(f"{','.join(map(str, chosen))} {weight}\n")
        _pin_threads(chosen)
    except OSError as exc:
        log.warning("%s not pinned to a core (%s); it runs where the kernel places it. Set "
                    "pin_replicas: false in the app's args to stop trying.", what, exc)
        return None
    log.info("%s (pid %d, %.2f CPU) pinned to core(s) %s of %s (pin_replicas: false lets the "
             "kernel place it)", what, os.getpid(), weight, chosen, cores)
    return chosen
