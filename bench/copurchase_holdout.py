"""Holdout run of a GNN whose graph also links each item to its strongest co-purchase neighbours
(experiment): ``python bench/copurchase_holdout.py --edges-per-item 5 --seed 0 --emb-cache ...``."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import numpy as np  # noqa: E402

import graph.training as T  # noqa: E402
import ranker_holdout  # noqa: E402

K = int(sys.argv[sys.argv.index("--edges-per-item") + 1])
argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--edges-per-item"
        and sys.argv[i] != "--edges-per-item"]
_orig = ranker_holdout.embeddings


def embeddings(d, cache, epochs, gnn=None):
    if not cache.exists():
        from graph.signals import fit_signals

        sim = fit_signals(d.fit_part, d.inter_full).item_sim.tocsr()
        rows, cols, vals = [], [], []
        for i in range(sim.shape[0]):
            lo, hi = sim.indptr[i], sim.indptr[i + 1]
            if hi == lo:
                continue
            top = np.argsort(-sim.data[lo:hi], kind="stable")[:K]
            keep = sim.indices[lo:hi][top] > i  # each pair once (both directions are added)
            rows.append(np.full(int(keep.sum()), i))
            cols.append(sim.indices[lo:hi][top][keep])
            vals.append(sim.data[lo:hi][top][keep])
        idx = np.stack([np.concatenate(rows), np.concatenate(cols)]).astype(np.int64)
        # item_sim's values are about 0.005; a user-item edge weighs log1p(purchases) >= 0.69.
        # Each co-purchase edge weighs as much as one purchase edge.
        T.ITEM_EDGES = (idx, np.full(idx.shape[1], np.log1p(1.0), dtype=np.float32))
        print(f"[copurchase] {idx.shape[1]:,} item-item edges ({K} per item, each pair once), "
              f"weights {T.ITEM_EDGES[1].min():.3f}..{T.ITEM_EDGES[1].max():.3f}")
    return _orig(d, cache, epochs, gnn)


ranker_holdout.embeddings = embeddings
sys.exit(ranker_holdout.main(argv))
