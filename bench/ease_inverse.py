"""EASE's fit: its inverse (:func:`graph.signals.spd_inverse` against the solve it replaced), and
the whole fit by items against by users (:func:`graph.signals.ease_items`).

EASE (:func:`graph.signals.ease_items`) needs ``P = (XᵀX + λI)⁻¹`` over its 10,000 items, twice
per training job (the signals of the validation fit and the published ones) and twice per
``bench/ranker_holdout.py`` run. Until 2026-12-07 it solved against the identity
(``scipy.linalg.cho_solve(cho_factor(G), I)``, about ``2n³`` flops); now LAPACK's ``potrf`` and
``potri`` compute it from the Cholesky factor (about ``2n³/3``); and with fewer shoppers than
items, the fit needs no ``n × n`` inverse at all (``ease_items``' "by users" way; not the
default, ``graph.signals.EASE_BY_USERS`` says why). This reads the built-in data's training
purchases (the user–item graph of the default split, as ``train_job.py`` sees it), builds
``XᵀX + λI`` with ``ease_items``' own helpers (``ease_matrix``, ``ease_gram``), checks that
each pair gives the same result (relative difference of
the matrices; for the fits, the same items per shopper and their largest score difference), and
times each pair, alternated, ``--repeats`` times each: wall and CPU seconds of this process, at
the machine's BLAS thread count. Prints a table and writes JSON.

    python bench/ease_inverse.py                   # all shoppers (what the default job fits)
    python bench/ease_inverse.py --max-users 300   # the tests' slice
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _purchases(max_users: int) -> Any:
    """The user–item pattern of the default split's training graph, CSR ``[U, I]``."""
    import numpy as np
    import scipy.sparse as sp

    from graph.pipeline import PipelineConfig, prepare_data

    cfg = PipelineConfig(max_users=max_users) if max_users else PipelineConfig()
    d = prepare_data(cfg, progress=lambda line: None)
    users, items = d.inter_full.edge_index.numpy()
    return sp.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                         shape=(d.inter_full.num_users, d.inter_full.num_items))


def _solve_identity(g: Any) -> Any:
    """The replaced code: a Cholesky factor, then a solve against the identity."""
    import numpy as np
    import scipy.linalg as sla

    return sla.cho_solve(sla.cho_factor(g, overwrite_a=True, check_finite=False),
                         np.eye(len(g), dtype=np.float32), overwrite_b=True, check_finite=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-users", type=int, default=0, help="a slice of shoppers (0: all)")
    ap.add_argument("--items", type=int, default=10_000, help="EASE's items (SignalParams)")
    ap.add_argument("--lam", type=float, default=500.0, help="EASE's λ (SignalParams)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ease_inverse.json"))
    args = ap.parse_args(argv)

    import numpy as np
    from threadpoolctl import threadpool_info

    from graph.signals import ease_gram, ease_items, ease_matrix, spd_inverse

    print(f"building XᵀX + λI from the built-in data ({args.max_users or 'all'} shoppers) ...",
          flush=True)
    x = _purchases(args.max_users)
    num_users = x.shape[0]
    g = ease_gram(ease_matrix(x, args.items)[1], args.lam)  # what ease_items inverts

    def fit(dual: bool) -> Any:
        return ease_items(x, num_items=args.items, lam=args.lam, top_items=300, dual=dual)

    pairs = {
        "inverse": {"solve against I (replaced)": lambda: _solve_identity(g.copy()),
                    "potrf + potri (shipped)": lambda: spd_inverse(g.copy())},
        "fit": {"ease_items by items": lambda: fit(False),
                "ease_items by users": lambda: fit(True)},
    }
    checks: dict[str, Any] = {}
    a, b = (fn() for fn in pairs["inverse"].values())
    checks["inverse_max_relative_difference"] = float(np.abs(a - b).max() / np.abs(a).max())
    del a, b
    (ia, xa, sa), (ib, xb, sb) = (fn() for fn in pairs["fit"].values())
    same = [np.array_equal(xa[ia[u]:ia[u + 1]], xb[ib[u]:ib[u + 1]]) for u in range(num_users)]
    checks["fit_shoppers_with_the_same_items"] = float(np.mean(same))
    checks["fit_max_score_difference"] = float(max(
        (np.abs(sa[ia[u]:ia[u + 1]] - sb[ib[u]:ib[u + 1]]).max(initial=0.0)
         for u in range(num_users) if same[u]), default=0.0))
    rows = []
    for pair, ways in pairs.items():
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for r in range(args.repeats):
            for name, fn in ways.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
                print(f"  round {r + 1}/{args.repeats} {name}: {times[name][-1][0]:.2f} s",
                      flush=True)
        for name, t in times.items():
            walls, cpus = [w for w, _ in t], [c for _, c in t]
            rows.append({"pair": pair, "method": name, "wall_s": walls, "cpu_s": cpus,
                         "wall_min_s": min(walls), "cpu_min_s": min(cpus)})
    print(f"\nEASE on {len(g):,} items and {num_users:,} shoppers, fastest of {args.repeats}, "
          "alternated within each pair:")
    print("| what | wall s | CPU s |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['wall_min_s']:.2f} | {row['cpu_min_s']:.2f} |")
    speedup = {pair: rows[2 * i]["wall_min_s"] / rows[2 * i + 1]["wall_min_s"]
               for i, pair in enumerate(pairs)}
    print("speed-up (wall): " + ", ".join(f"{p} {v:.2f}x" for p, v in speedup.items()))
    print(f"inverse: largest difference relative to the largest entry "
          f"{checks['inverse_max_relative_difference']:.1e}; fit: "
          f"{checks['fit_shoppers_with_the_same_items']:.2%} of shoppers get the same items, "
          f"scores within {checks['fit_max_score_difference']:.1e}")
    out = {
        "command": "python bench/ease_inverse.py " + " ".join(argv or sys.argv[1:]),
        "n": len(g), "shoppers": num_users, "lam": args.lam, "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "blas": [{k: i.get(k) for k in ("internal_api", "num_threads", "version")}
                 for i in threadpool_info() if i["user_api"] == "blas"],
        **checks, "rows": rows, "speedup_wall": speedup,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
