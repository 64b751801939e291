"""EASE's matrix inverse: :func:`graph.signals.spd_inverse` against the solve it replaced.

EASE (:func:`graph.signals.ease_items`) needs ``P = (XᵀX + λI)⁻¹`` over its 10,000 items, twice
per training job (the signals of the validation fit and the published ones) and twice per
``bench/ranker_holdout.py`` run. Until 2026-12-07 it solved against the identity
(``scipy.linalg.cho_solve(cho_factor(G), I)``, about ``2n³`` flops); now LAPACK's ``potrf`` and
``potri`` compute it from the Cholesky factor (about ``2n³/3``). This builds ``G`` from the
built-in data's training purchases (the user–item graph of the default split, as
``train_job.py`` sees it), checks that both give the same matrix (relative difference), and
times both, alternated, ``--repeats`` times each: wall and CPU seconds of this process, at the
machine's BLAS thread count. Prints a table and writes JSON.

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


def _gram(max_users: int, num_items: int, lam: float) -> Any:
    import numpy as np
    import scipy.sparse as sp

    from graph.pipeline import PipelineConfig, prepare_data

    cfg = PipelineConfig(max_users=max_users) if max_users else PipelineConfig()
    d = prepare_data(cfg, progress=lambda line: None)
    users, items = d.inter_full.edge_index.numpy()
    x = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                      shape=(d.inter_full.num_users, d.inter_full.num_items))
    buyers = np.bincount(x.indices, minlength=x.shape[1])
    top = np.flatnonzero(buyers >= 2)  # ease_items' own choice of items
    top = np.sort(top[np.argsort(-buyers[top], kind="stable")[:num_items]])
    xt = sp.csc_matrix(x)[:, top].tocsr()
    g = (xt.T @ xt).toarray().astype(np.float32)
    g[np.diag_indices(len(top))] += np.float32(lam)
    return g, x.shape[0]


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

    from graph.signals import spd_inverse

    print(f"building XᵀX + λI from the built-in data ({args.max_users or 'all'} shoppers) ...",
          flush=True)
    g, num_users = _gram(args.max_users, args.items, args.lam)
    ways = {"solve against I (replaced)": _solve_identity, "potrf + potri (shipped)": spd_inverse}
    first = {name: fn(g.copy()) for name, fn in ways.items()}
    a, b = first.values()
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for r in range(args.repeats):
        for name, fn in ways.items():
            m = g.copy()
            wall, cpu = time.perf_counter(), time.process_time()
            fn(m)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            print(f"  round {r + 1}/{args.repeats} {name}: {times[name][-1][0]:.2f} s", flush=True)
    rows = []
    for name, t in times.items():
        walls, cpus = [w for w, _ in t], [c for _, c in t]
        rows.append({"method": name, "wall_s": walls, "cpu_s": cpus,
                     "wall_min_s": min(walls), "cpu_min_s": min(cpus)})
    old, new = rows
    print(f"\nEASE inverse of a {len(g):,} x {len(g):,} float32 matrix ({num_users:,} shoppers), "
          f"fastest of {args.repeats}, alternated:")
    print("| method | wall s | CPU s |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['wall_min_s']:.2f} | {row['cpu_min_s']:.2f} |")
    print(f"speed-up (wall) {old['wall_min_s'] / new['wall_min_s']:.2f}x; "
          f"largest difference relative to the largest entry {rel:.1e}")
    out = {
        "command": "python bench/ease_inverse.py " + " ".join(argv or sys.argv[1:]),
        "n": len(g), "shoppers": num_users, "lam": args.lam, "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "blas": [{k: i.get(k) for k in ("internal_api", "num_threads", "version")}
                 for i in threadpool_info() if i["user_api"] == "blas"],
        "max_relative_difference": rel, "rows": rows,
        "speedup_wall": old["wall_min_s"] / new["wall_min_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
