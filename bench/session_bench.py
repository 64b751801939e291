"""Session-state benchmark: durable appends per second and read latency, fsync on and off.

Two layers are measured:

- ``shard``: :class:`actors.session_state.ShardState` called directly (the logic and the log,
  no RPC): sequential single-event appends, then ``get_session`` latency on a full window.
- ``actor``: one :class:`SessionShard` actor through :class:`SessionStore` on a local Ray
  cluster: ``--writers`` concurrent single-event appends (the actor group-commits them: one
  fdatasync per commit), then read latency of ``SessionStore.get`` (session + user history).

Events are synthetic (random items, 200 sessions, 50 users); the numbers are about the storage
path, not the data. Results print as a table and go to ``bench/results/session_bench.json``.

Usage: ``python bench/session_bench.py [--seconds 2] [--writers 16] [--no-actor]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as in tests/conftest.py: a local bench cluster
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from actors.session_events import SessionEvent  # noqa: E402
from actors.session_state import SessionStateConfig, SessionStore, ShardState  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "session_bench.json"


def _event(rng: random.Random, n: int) -> SessionEvent:
    return SessionEvent.create(
        "view",
        session_id=f"s{rng.randrange(200)}",
        user_id=f"u{rng.randrange(50)}",
        item_id=f"i{rng.randrange(10_000)}",
        ts=time.time() + n * 1e-6,
    )


def _pct(lat_s: list[float]) -> tuple[float, float]:
    arr = np.asarray(lat_s) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def bench_shard(fsync: bool, seconds: float, root: Path) -> dict[str, Any]:
    """Sequential appends and reads on a plain ShardState."""
    cfg = SessionStateConfig(num_shards=1, wal_uri=str(root / f"shard-{fsync}"), fsync=fsync)
    st = ShardState(cfg, 0)
    rng = random.Random(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        st.append([_event(rng, n)])
        n += 1
    appends_per_s = n / (time.perf_counter() - t0)
    lat = []
    for _ in range(2000):
        sid, uid = f"s{rng.randrange(200)}", f"u{rng.randrange(50)}"
        t = time.perf_counter()
        st.get_session(sid, uid)
        lat.append(time.perf_counter() - t)
    st.close()
    p50, p99 = _pct(lat)
    return {"layer": "shard", "fsync": fsync, "writers": 1, "appends_per_s": appends_per_s,
            "get_p50_ms": p50, "get_p99_ms": p99, "events": n,
            "events_per_commit": 1.0}  # fmt: skip


async def _actor_run(store: SessionStore, writers: int, seconds: float) -> tuple[int, float, list[float]]:
    stop = time.perf_counter() + seconds
    count = 0

    async def writer(seed: int) -> None:
        nonlocal count
        rng = random.Random(seed)
        while time.perf_counter() < stop:
            await store.append([_event(rng, count)])
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(k) for k in range(writers)))
    elapsed = time.perf_counter() - t0
    rng = random.Random(1)
    lat = []
    for _ in range(500):
        t = time.perf_counter()
        await store.get(session_id=f"s{rng.randrange(200)}", user_id=f"u{rng.randrange(50)}")
        lat.append(time.perf_counter() - t)
    return count, elapsed, lat


def bench_actor(fsync: bool, seconds: float, writers: int, root: Path) -> dict[str, Any]:
    """Concurrent appends and reads through SessionStore and one shard actor."""
    cfg = SessionStateConfig(
        num_shards=1,
        wal_uri=str(root / f"actor-{fsync}"),
        fsync=fsync,
        namespace="intentrec-bench",
        actor_prefix=f"bench-{os.getpid()}-{int(fsync)}",
    )
    store = SessionStore(cfg)
    try:
        asyncio.run(store.ready())
        count, elapsed, lat = asyncio.run(_actor_run(store, writers, seconds))
        commits = asyncio.run(store.stats())[0]["commits"]
    finally:
        store.kill()
    p50, p99 = _pct(lat)
    return {"layer": "actor", "fsync": fsync, "writers": writers, "appends_per_s": count / elapsed,
            "get_p50_ms": p50, "get_p99_ms": p99, "events": count,
            "events_per_commit": count / max(commits, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table, write the JSON results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="append phase per configuration")
    parser.add_argument("--writers", type=int, default=16, help="concurrent writers (actor layer)")
    parser.add_argument("--no-actor", action="store_true", help="skip the Ray actor layer")
    args = parser.parse_args(argv)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="session-bench-") as tmp:
        root = Path(tmp)
        for fsync in (True, False):
            rows.append(bench_shard(fsync, args.seconds, root))
        if not args.no_actor:
            import ray

            env = {"PYTHONPATH": str(REPO)}
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})  # fmt: skip
            try:
                for fsync in (True, False):
                    rows.append(bench_actor(fsync, args.seconds, args.writers, root))
            finally:
                ray.shutdown()

    cols = [("layer", "<6"), ("fsync", "<6"), ("writers", ">7"), ("appends_per_s", ">13"),
            ("get_p50_ms", ">10"), ("get_p99_ms", ">10"), ("events_per_commit", ">17")]  # fmt: skip
    print(" ".join(f"{name:{fmt}}" for name, fmt in cols))
    for r in rows:
        cells = [r[name] if isinstance(r[name], str | int) else round(r[name], 3) for name, _ in cols]
        print(" ".join(f"{cell!s:{fmt}}" for cell, (_, fmt) in zip(cells, cols, strict=True)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "writers": args.writers,
        "data": "synthetic events (200 sessions, 50 users, window 50)",
        "log_dir": tempfile.gettempdir(),
    }
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
