"""The ranker's rewritten steps against the code they replace, in one process, on a real model.

Whole-request timings (``bench/ranker_cost.py``) move by a millisecond between runs of the same
code on a shared 2-core box; a step timed against its predecessor in the same process, on the same
requests, alternately, does not. For each step this checks that both give the same result on every
request, then times both (CPU µs per request, the fastest of ``--passes`` passes, three rounds):

- the cascade's tree walk: :class:`graph.forest.Forest` against LightGBM's
  ``predict(pred_leaf=True)``, the three stages as a request runs them;
- the buy-again component: :func:`graph.ranking.repeat_scores_of` (the candidates looked up in the
  history) against the whole history row, then its candidate columns;
- the basket component: :func:`graph.ranking.basket_scores_of` against every item of the user's
  past baskets, then the candidate columns.

Known shoppers of the model, with three popular items in the cart (the basket component needs a
session). Prints a table and writes JSON.

    python bench/ranker_steps.py --artifacts <root> --requests 300
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


def _best(fn: Callable[[int], Any], n: int, passes: int) -> float:
    best = float("inf")
    for _ in range(passes):
        cpu = time.process_time()
        for i in range(n):
            fn(i)
        best = min(best, time.process_time() - cpu)
    return best / n * 1e6


def measure(artifacts: str, requests: int, passes: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    from actors.ranker import RankerService, _limit_threads
    from graph import ltr
    from graph.ranking import (
        ContextSignal,
        _dense,
        basket_scores,
        basket_scores_of,
        repeat_scores,
        repeat_scores_of,
    )
    from graph.recommend import Request

    _limit_threads()
    m = RankerService(artifacts).model
    rk, lr = m.rec.ranker, m.rec.learned
    assert lr is not None
    paths = lr.attribution()
    if paths.forest is None:
        raise SystemExit("this model has splits graph.forest does not compile; nothing to compare")
    popular = [int(i) for i in m.catalogue.popular[:50]]
    rng = np.random.default_rng(seed)
    t0 = 1_512_000_000.0
    reqs = []
    for u in list(m.user_index)[:requests]:
        cart = tuple((popular[j], "add_to_cart", t0) for j in rng.choice(50, 3, replace=False))
        reqs.append(Request(user=m.user_index[u], item_events=cart,
                            context=ContextSignal(weekday=5, hour=10), now=t0, k=20))
    prepared = [m.rec.prepare(r) for r in reqs]
    users = [np.array([r.user]) for r in reqs]
    cand = [p.candidates.items for p in prepared]
    smat = [rk._session_matrix([p.session]) for p in prepared]
    xs = [p.x[:, lr._cols] for p in prepared]
    trees = len(paths.offset)
    stages = []
    start = 0
    for stop, keep in [*((t, k) for t, k in ltr.CASCADE if t < trees), (trees, 0)]:
        stages.append((start, stop, keep))
        start = stop
    rows_in = [None] + [k for _, _, k in stages[:-1]]  # rows each stage sees (None: all)

    def walk(leaves: Callable[[Any, int, int], Any]) -> Callable[[int], Any]:
        def run(i: int) -> None:
            for (s, e, _), rows in zip(stages, rows_in, strict=True):
                leaves(xs[i] if rows is None else xs[i][:rows], s, e)
        return run

    def lightgbm(x: Any, s: int, e: int) -> Any:
        return paths.booster.predict(x, start_iteration=s, num_iteration=e - s, pred_leaf=True)

    steps: dict[str, tuple[Callable[[int], Any], Callable[[int], Any]]] = {
        "tree walk (3 cascade stages)": (walk(lightgbm), walk(paths.forest.leaves)),
        "buy-again component": (
            lambda i: _dense(repeat_scores(rk.signals, users[i]), cand[i]),
            lambda i: repeat_scores_of(rk.signals, users[i], cand[i])),
        "basket component": (
            lambda i: _dense(basket_scores(rk.signals, users[i], smat[i]), cand[i]),
            lambda i: basket_scores_of(rk.signals, users[i], smat[i], cand[i])),
    }
    nonzero = {"buy-again component": 0, "basket component": 0}
    for i in range(len(reqs)):  # the same answers, request by request
        np.testing.assert_array_equal(lightgbm(xs[i], 0, trees), paths.forest.leaves(xs[i]))
        for name in nonzero:
            old, new = steps[name]
            got = new(i)
            np.testing.assert_array_equal(old(i), got)
            nonzero[name] += int(np.count_nonzero(got))
    rows = []
    for name, (old, new) in steps.items():
        times: dict[str, list[float]] = {"before_us": [], "after_us": []}
        for _ in range(3):  # alternate, so that a busy moment hits both
            times["before_us"].append(round(_best(old, len(reqs), passes), 1))
            times["after_us"].append(round(_best(new, len(reqs), passes), 1))
        rows.append({"step": name, **times, "nonzero_values": nonzero.get(name)})
    return {"version": m.version, "trees": trees, "requests": len(reqs), "passes": passes,
            "candidates": round(float(np.mean([len(c) for c in cand])), 1), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--passes", type=int, default=3,
                   help="passes per timing; each figure is the fastest pass")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "ranker_steps.json"))
    opts = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # as a ranker replica (actors.ranker._limit_threads)
    res = measure(opts.artifacts, opts.requests, opts.passes)
    res["command"] = "python bench/ranker_steps.py " + " ".join(argv or sys.argv[1:])
    print(f"model {res['version']} ({res['trees']} trees), {res['requests']} requests with a cart, "
          f"{res['candidates']:.0f} candidates each: the same answers before and after on every "
          f"request; CPU µs per request, fastest of {opts.passes} passes, three alternated rounds")
    print(f"{'step':<30}{'before':>24}{'after':>24}")
    for r in res["rows"]:
        before = " / ".join(f"{v:.0f}" for v in r["before_us"])
        after = " / ".join(f"{v:.0f}" for v in r["after_us"])
        print(f"{r['step']:<30}{before:>24}{after:>24}")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
