"""A model artifact with truncated-SVD embeddings in place of the GNN: real data, real signals, a
real LightGBM ranker fitted on the validation window, the real artifact format, no Ray and no GNN
training. The serving benchmark falls back to it when no trained model is given, and the unit
tests serve it (``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _svd(inter: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    ei, w = inter.edge_index.numpy(), inter.edge_weight.numpy().astype(np.float64)
    mat = sp.csr_matrix((w, (ei[0], ei[1])), shape=(inter.num_users, inter.num_items))
    u, s, vt = svds(mat, k=dim, random_state=0)
    return (u * np.sqrt(s)).astype(np.float32), (vt.T * np.sqrt(s)).astype(np.float32)


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
    from graph.artifacts import write_artifact
    from graph.item_encoder import ItemEncoder
    from graph.pipeline import PipelineConfig, fit_recommender, prepare_data

    d = prepare_data(PipelineConfig(max_users=max_users), progress=lambda _line: None)
    full = _svd(d.inter_full, dim)
    rec, _ = fit_recommender(d, _svd(d.inter_fit, dim), full, progress=lambda _line: None)
    encoder = ItemEncoder.fit(d.inter_full, d.ds.items, full[1], d.inter_full.item_has_edges())
    return write_artifact(
        str(root), user_ids=d.inter_full.user_ids, items=d.ds.items,
        user_emb=rec.ranker.user_emb, item_emb=rec.ranker.item_emb, signals=rec.ranker.signals,
        metrics=metrics or {}, learned=rec.learned, item_static=rec.item_static, text=rec.text,
        item_encoder=encoder, manifest={"data": {"name": d.ds.name, "max_users": max_users},
                  "training": {"embeddings": f"truncated SVD ({purpose})"}},
    )
