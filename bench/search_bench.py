"""CPU per recommendation with and without a search query, on one model version.

    python bench/search_bench.py --artifacts artifacts [--requests 300]

The same seeded requests (a known user, one viewed item) are answered three times through
:meth:`graph.recommend.Recommender.recommend`: without a query, with a simulated query seen for
the first time (sentence model, BM25 and fusion run), and with the same queries again (the
replica's caches hit). Prints process CPU and wall milliseconds per request and writes
``bench/results/search_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--artifacts", default="artifacts", help="artifact root (LATEST is used)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/search_bench.json")
    args = p.parse_args(argv)

    from graph.artifacts import read_artifact
    from graph.queries import simulate_query
    from graph.ranking import Ranker
    from graph.recommend import Recommender, Request
    from graph.text import get_encoder

    art = read_artifact(args.artifacts)
    rec = Recommender.build(art.items, Ranker(art.user_emb, art.item_emb, art.signals),
                            art.item_static, art.learned, text=art.text)
    now = float(rec.ranker.signals.now)
    rng = np.random.default_rng(args.seed)
    cat = rec.catalogue
    items = rng.choice(cat.num_items, args.requests)
    users = rng.choice(len(art.user_ids), args.requests)
    queries = [simulate_query(str(cat.categories[i]), str(cat.titles[i]), rng) for i in items]
    base = [Request(user=int(u), item_events=((int(i), "view", now),), now=now + 60)
            for u, i in zip(users.tolist(), items.tolist(), strict=True)]
    searched = [Request(user=r.user, item_events=r.item_events, now=r.now, query=q)
                for r, q in zip(base, queries, strict=True)]
    get_encoder().embed_query("warm up")
    rec.recommend(base[0])
    rows = {}
    for name, reqs in (("no_query", base), ("query_first_time", searched),
                       ("query_cached", searched)):
        cpu, wall = time.process_time(), time.perf_counter()
        for r in reqs:
            rec.recommend(r)
        rows[name] = {"cpu_ms": (time.process_time() - cpu) / len(reqs) * 1e3,
                      "wall_ms": (time.perf_counter() - wall) / len(reqs) * 1e3}
        print(f"{name:17s} {rows[name]['cpu_ms']:6.1f} ms CPU  {rows[name]['wall_ms']:6.1f} ms wall "
              "per request")
    ratio = rows["query_cached"]["cpu_ms"] / rows["no_query"]["cpu_ms"]
    print(f"CPU with a cached query / without: {ratio:.2f}x; {len(set(queries))} distinct queries")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"version": art.version, "requests": args.requests,
                               "distinct_queries": len(set(queries)), "rows": rows,
                               "cached_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
