"""CPU per recommendation with and without a search query, on one model version, as a replica.

    python bench/search_bench.py --artifacts artifacts [--requests 300] [--mix-requests 1000]

Runs with one compute thread, as a ranker replica does (``actors.ranker._limit_threads``). The
same seeded requests (a known user, one viewed item) are answered through
:meth:`graph.recommend.Recommender.recommend`, in one process and one run:

- ``no_query``: without a query (the reference every ratio divides by);
- ``query_cold``: each with a query the replica has never seen (caches emptied first: the
  sentence model, BM25 and fusion run for every request);
- ``query_cached``: the same queries again (every cache hits);
- ``query_mix_from_empty`` then ``query_mix_warm``: a seeded shopper mix, each request's query
  drawn from ``--distinct`` simulated queries with Zipf-like repetition (the ``r``-th most
  frequent with probability proportional to ``1 / r ** s``, ``--zipf 1.0``: the shape of search
  query logs); the first stretch from empty caches, the second from the caches the first left.
  The caches' hit rates are printed; the two stretches divide by ``no_query_mix_requests``, the
  same requests without a query.

Prints process CPU and wall milliseconds per request and the ratio of each to ``no_query``, and
writes ``bench/results/search_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy and torch load, as in a replica (serve_config.yaml)

import numpy as np  # noqa: E402


def zipf_draws(n: int, distinct: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws of ranks ``0 .. distinct - 1``, rank ``r`` with probability ``∝ 1 / (r+1)^s``."""
    p = 1.0 / np.arange(1, distinct + 1, dtype=np.float64) ** s
    return rng.choice(distinct, size=n, p=p / p.sum())


def _timed(rec: Any, reqs: list[Any]) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for r in reqs:
        rec.recommend(r)
    return {"cpu_ms": (time.process_time() - cpu) / len(reqs) * 1e3,
            "wall_ms": (time.perf_counter() - wall) / len(reqs) * 1e3, "requests": len(reqs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--artifacts", default="artifacts", help="artifact root (LATEST is used)")
    p.add_argument("--requests", type=int, default=300, help="requests per fixed row")
    p.add_argument("--mix-requests", type=int, default=1000, help="requests of the query mix")
    p.add_argument("--distinct", type=int, default=2000, help="distinct queries of the mix")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the mix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/search_bench.json")
    args = p.parse_args(argv)

    from actors.ranker import _limit_threads
    from graph.artifacts import read_artifact
    from graph.queries import simulate_query
    from graph.ranking import Ranker
    from graph.recommend import Recommender, Request
    from graph.text import get_encoder, normalize_query

    _limit_threads()
    art = read_artifact(args.artifacts)
    rec = Recommender.build(art.items, Ranker(art.user_emb, art.item_emb, art.signals),
                            art.item_static, art.learned, text=art.text)
    now = float(rec.ranker.signals.now)
    rng = np.random.default_rng(args.seed)
    cat = rec.catalogue
    encoder, index = get_encoder(), cat.search

    def requests(n: int) -> list[Any]:
        items, users = rng.choice(cat.num_items, n), rng.choice(len(art.user_ids), n)
        return [Request(user=int(u), item_events=((int(i), "view", now),), now=now + 60)
                for u, i in zip(users.tolist(), items.tolist(), strict=True)]

    def with_queries(reqs: list[Any], queries: list[str]) -> list[Any]:
        return [Request(user=r.user, item_events=r.item_events, now=r.now, query=q)
                for r, q in zip(reqs, queries, strict=True)]

    def new_queries(n: int, seen: set[str]) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            i = int(rng.integers(cat.num_items))
            q = simulate_query(str(cat.categories[i]), str(cat.titles[i]), rng)
            if q is not None and normalize_query(q) not in seen:
                seen.add(normalize_query(q))
                out.append(q)
        return out

    def empty_caches() -> None:
        encoder.embed_query.cache_clear()
        index.cache_clear()

    base = requests(args.requests)
    seen: set[str] = set()
    cold = new_queries(args.requests, seen)
    encoder.embed_query("warm up")
    rec.recommend(with_queries(base[:1], ["warm up"])[0])
    _timed(rec, base)  # fills the per-user caches, so that no row below is the first to pay them
    rows: dict[str, dict[str, float]] = {"no_query": _timed(rec, base)}
    empty_caches()
    rows["query_cold"] = _timed(rec, with_queries(base, cold))
    rows["query_cached"] = _timed(rec, with_queries(base, cold))

    pool = new_queries(args.distinct, seen)
    mix_base = requests(args.mix_requests)
    _timed(rec, mix_base)
    rows["no_query_mix_requests"] = _timed(rec, mix_base)
    empty_caches()
    # The first stretch starts from empty caches (a replica just started or swapped its model);
    # the second, the same requests with fresh draws, from the caches the first one left.
    for name in ("query_mix_from_empty", "query_mix_warm"):
        draws = zipf_draws(args.mix_requests, args.distinct, args.zipf, rng).tolist()
        mix = [pool[r] for r in draws]
        vec0, scores0 = encoder.embed_query.cache_info(), index.cache_info()
        rows[name] = _timed(rec, with_queries(mix_base, mix))
        vec, scores = encoder.embed_query.cache_info(), index.cache_info()
        rows[name]["vector_hit_rate"] = (vec.hits - vec0.hits) / max(
            vec.hits + vec.misses - vec0.hits - vec0.misses, 1)
        rows[name]["score_hit_rate"] = (scores.hits - scores0.hits) / max(
            scores.hits + scores.misses - scores0.hits - scores0.misses, 1)
        rows[name]["distinct_queries"] = len({normalize_query(q) for q in mix})

    ratios = {name: rows[name]["cpu_ms"] / rows[ref]["cpu_ms"] for name, ref in (
        ("query_cold", "no_query"), ("query_cached", "no_query"),
        ("query_mix_from_empty", "no_query_mix_requests"),
        ("query_mix_warm", "no_query_mix_requests"))}
    for name, row in rows.items():
        ratio = f"  {ratios[name]:.2f}x no query" if name in ratios else ""
        print(f"{name:21s} {row['cpu_ms']:6.1f} ms CPU  {row['wall_ms']:6.1f} ms wall per request"
              f"{ratio}")
    for name in ("query_mix_from_empty", "query_mix_warm"):
        row = rows[name]
        print(f"{name}: {args.mix_requests} requests drawn from {len(pool)} queries (Zipf s="
              f"{args.zipf}), {row['distinct_queries']:.0f} distinct; score cache hit rate "
              f"{row['score_hit_rate']:.2f}, query vector cache hit rate "
              f"{row['vector_hit_rate']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"version": art.version, "threads": 1, "seed": args.seed,
                               "zipf": args.zipf, "distinct": args.distinct, "rows": rows,
                               "cpu_ratio_to_no_query": ratios,
                               "target_ratio": 1.5}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
