"""A model artifact with truncated-SVD embeddings in place of the GNN: real data, real signals,
the real artifact format, no Ray and no training. The serving benchmark falls back to it when no
trained model is given, and the unit tests serve it (``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def svd_artifact(root: Path, *, max_users: int, dim: int, purpose: str,
                 metrics: dict[str, Any] | None = None) -> str:
    """Write one complete model version under ``root`` and return its name.

    Args:
        root: Artifact root (``LATEST`` is updated).
        max_users: Seeded sample of users of the built-in data.
        dim: Embedding size (the SVD's rank).
        purpose: Said in the manifest, e.g. ``"unit-test stand-in for the GNN"``.
        metrics: Stored as the version's offline metrics (default: none).
    """
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    from graph.artifacts import write_artifact
    from graph.data import load_builtin, temporal_split
    from graph.interactions import build_interactions
    from graph.signals import fit_signals

    ds = load_builtin(max_users=max_users)
    train, _ = temporal_split(ds.events, ds.default_split_at)
    inter = build_interactions(train, ds.items)
    signals = fit_signals(train, inter)
    ei, w = inter.edge_index.numpy(), inter.edge_weight.numpy().astype(np.float64)
    mat = sp.csr_matrix((w, (ei[0], ei[1])), shape=(inter.num_users, inter.num_items))
    u, s, vt = svds(mat, k=dim, random_state=0)
    return write_artifact(
        str(root), user_ids=inter.user_ids, items=ds.items,
        user_emb=(u * np.sqrt(s)).astype(np.float32), item_emb=(vt.T * np.sqrt(s)).astype(np.float32),
        signals=signals, metrics=metrics or {},
        manifest={"data": {"name": ds.name, "max_users": max_users},
                  "training": {"embeddings": f"truncated SVD ({purpose})"}},
    )
