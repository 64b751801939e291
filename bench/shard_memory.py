"""Memory of one session shard as its bounded state fills, and after: does it level off?

The 10-minute soak (``bench/soak.py``) ends before a shard's remembered event ids reach
``dedupe_capacity``, so its memory is still growing there. This drives one
:class:`actors.session_state.ShardState` in process (no Ray, the log on local disk without fsync)
with the soak's kind of traffic (a fixed set of sessions, half of the events with a user) far past
every bound, and records the process's resident memory (RSS) and the state's sizes every
``--step`` events. The state stops growing when the windows, histories and remembered ids are
full; the question is whether the memory stops too.

Usage::

    python bench/shard_memory.py                        # 480,000 events, dedupe_capacity 100,000
    python bench/shard_memory.py --steps 20 --sessions 4000
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

RESULTS = Path(__file__).resolve().parent / "results" / "shard_memory.json"
KEYS = ("session_events", "user_events", "dedupe_ids")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="how many steps of --step events")
    p.add_argument("--step", type=int, default=40_000, help="events per step")
    p.add_argument("--sessions", type=int, default=400, help="distinct sessions in the traffic")
    p.add_argument("--users", type=int, default=150, help="distinct users (half the events)")
    p.add_argument("--dedupe-capacity", type=int, default=100_000, help="the shard's bound")
    p.add_argument("--output", default=str(RESULTS), help="results file")
    opts = p.parse_args(argv)

    import psutil

    from actors.session_events import SessionEvent
    from actors.session_state import SessionStateConfig, ShardState

    config = SessionStateConfig(num_shards=1, wal_uri=tempfile.mkdtemp(prefix="shard-memory-"),
                                fsync=False, dedupe_capacity=opts.dedupe_capacity).resolved()
    shard = ShardState(config, 0)
    proc = psutil.Process()
    start = time.time() - 600  # every event inside the TTL (1,800 s) and none in the future
    rows: list[dict[str, Any]] = []
    n = 0
    print(f"{'events':>8} {'RSS MB':>8} " + " ".join(f"{k:>15}" for k in KEYS))
    for _ in range(opts.steps):
        batch = []
        for _ in range(opts.step):
            n += 1
            batch.append(SessionEvent.create(
                "view", session_id=f"s{n % opts.sessions}",
                user_id=f"u{n % opts.users}" if n % 2 else None,
                item_id=f"item-{n % 5000}", ts=start + n * 1e-3))
            if len(batch) == 200:
                shard.append(batch)
                batch = []
        if batch:
            shard.append(batch)
        gc.collect()
        stats = shard.stats()
        row = {"events": n, "rss_mb": proc.memory_info().rss / 2**20, **{k: stats[k] for k in KEYS}}
        rows.append(row)
        print(f"{n:8d} {row['rss_mb']:8.1f} " + " ".join(f"{row[k]:15d}" for k in KEYS), flush=True)
    shard.close()

    full = next((i for i, r in enumerate(rows) if r["dedupe_ids"] >= opts.dedupe_capacity), None)
    half = rows[len(rows) // 2:]
    last_half_change = (half[-1]["rss_mb"] - half[0]["rss_mb"]) / half[0]["rss_mb"]
    print(f"\nstate full after {rows[full]['events'] if full is not None else '-'} events; "
          f"RSS over the last half of the run: {half[0]['rss_mb']:.1f} -> {half[-1]['rss_mb']:.1f} "
          f"MB ({last_half_change:+.1%})")
    out = Path(opts.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "meta": {"when": datetime.now().isoformat(timespec="seconds"), **vars(opts),
                 "config": config.model_dump(include={"window", "user_history", "dedupe_capacity",
                                                      "snapshot_every", "ttl_seconds"})},
        "rows": rows, "last_half_rss_change": last_half_change}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
