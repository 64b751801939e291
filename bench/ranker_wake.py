"""What a ranking costs right after the process was idle, against back to back (no Ray, no HTTP).

At concurrency 1 every Serve process sleeps between requests; at 8 it goes from one request to
the next. This measures the ranker replica's own code (:class:`actors.ranker.RankerService`,
known shoppers with three items in the cart, k = 20, reasons included) three ways, in one
thread, alternated over ``--rounds`` rounds:

- ``back to back``: one request after the other;
- ``after 10 ms idle``: the thread sleeps 10 ms before each request (as at concurrency 1);
- ``after a cache sweep``: the thread reads 16 MB (more than the caches hold) before each request,
  without sleeping;

and, as a control, a small pure-Python loop (a working set that fits any cache) back to back and
after 10 ms idle. CPU time is the thread's own (``time.thread_time``), so the sleeps and the
sweeps are not counted. Prints a table and writes JSON.

    python bench/ranker_wake.py --artifacts artifacts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # as a ranker replica (actors.ranker._limit_threads)

IDLE_S = 0.010
SWEEP_BYTES = 16 << 20


def _small_loop() -> int:
    s = 0
    for i in range(60_000):
        s += i * i % 7
    return s


def _cpu_ms(fn: Callable[[int], object], n: int, before: Callable[[], object] | None) -> float:
    total = 0.0
    for i in range(n):
        if before is not None:
            before()
        t = time.thread_time()
        fn(i)
        total += time.thread_time() - t
    return total / n * 1000.0


def measure(artifacts: str, requests: int, rounds: int) -> dict[str, Any]:
    import numpy as np

    from actors.ranker import RankerService, RankQuery, _limit_threads

    _limit_threads()
    svc = RankerService(artifacts)
    m = svc.model
    popular = [str(m.catalogue.item_ids[i]) for i in m.catalogue.popular[:50]]
    rng = np.random.default_rng(0)
    t0 = 1_512_000_000.0
    queries = [RankQuery(user_id=u, context={"weekday": 5, "hour": 10}, k=20, now=t0,
                         events=tuple((popular[j], "add_to_cart", t0, None)
                                      for j in rng.choice(50, 3, replace=False)))
               for u in list(m.user_index)[:requests]]
    for q in queries[:20]:  # warm what a replica warms once (attribution tables, neighbours)
        svc.recommend(q)
    sweep = np.ones(SWEEP_BYTES, dtype=np.uint8)

    def rank(i: int) -> object:
        return svc.recommend(queries[i])

    def idle() -> None:
        time.sleep(IDLE_S)

    cases: dict[str, tuple[Callable[[int], object], int, Callable[[], object] | None]] = {
        "ranking, back to back": (rank, len(queries), None),
        "ranking, after 10 ms idle": (rank, len(queries), idle),
        "ranking, after a cache sweep": (rank, len(queries), sweep.sum),
        "small loop, back to back": (lambda _: _small_loop(), 300, None),
        "small loop, after 10 ms idle": (lambda _: _small_loop(), 300, idle),
    }
    out: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(rounds):
        for name, (fn, n, before) in cases.items():
            out[name].append(round(_cpu_ms(fn, n, before), 3))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in out.items()),
              flush=True)
    return {"version": m.version, "requests": len(queries), "rounds": rounds,
            "cpu_ms_per_call": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "ranker_wake.json"))
    a = p.parse_args(argv)
    res = measure(a.artifacts, a.requests, a.rounds)
    base = res["cpu_ms_per_call"]
    print(f"\n{'case':<32} {'CPU ms per call (each round)':<32} vs back to back")
    for name, vals in base.items():
        ref = base["ranking, back to back" if name.startswith("ranking") else
                    "small loop, back to back"]
        ratio = min(vals) / min(ref)
        print(f"{name:<32} {' / '.join(f'{v:.2f}' for v in vals):<32} {ratio:.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({**res, "command": "python bench/ranker_wake.py "
                                       f"--artifacts <root> --requests {a.requests} "
                                       f"--rounds {a.rounds}"}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
