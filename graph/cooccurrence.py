"""Item–item co-occurrence within sessions (baskets): the ``cooc`` signal and the ItemKNN baseline.

Row ``j`` of the matrix answers "given that a basket holds ``j``, which items does it hold too",
so multiplying a session's item weights by it scores every item's co-occurrence with the session.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _top_k_rows(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of each row (vectorised; ties by column index)."""
    m = sp.csr_matrix(m)
    m.sum_duplicates()
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((m.indices, -m.data, rows))
    rank = np.arange(len(order)) - m.indptr[rows[order]]
    keep = order[rank < k]
    keep.sort()  # restores row-major order, so the CSR pattern stays valid
    out = sp.csr_matrix(
        (m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape, dtype=np.float32
    )
    out.sort_indices()
    return out


def item_cooccurrence(
    session_codes: np.ndarray,
    item_codes: np.ndarray,
    num_items: int,
    *,
    top_k: int,
    shrink: float,
    popularity_damping: float,
    basket_power: float,
) -> sp.csr_matrix:
    """Item–item co-occurrence within sessions, row ``j`` = "given ``j``, how likely is ``i``".

    ``sim[j, i] = c_ji / (c_j + shrink) / (n_i + 1) ** popularity_damping``: ``c_ji`` counts
    sessions holding both items, each weighted ``1 / |session| ** basket_power`` (a 60-item
    stock-up trip says less about any one pair than a 5-item one), ``c_j`` is the same weighted
    count of sessions holding ``j`` (so the ratio estimates ``P(i | j)``), ``shrink`` keeps an item
    seen once from having perfect neighbours, and the damping by ``i``'s session count ``n_i``
    keeps every row from being the best sellers. Only the ``top_k`` largest entries per row are
    kept, and the diagonal is 0. The defaults of ``SignalParams`` were chosen on the validation
    window (in-session recall of this component alone and fused with buy-again).

    Shapes:
        - **session_codes**, **item_codes** ``[n]``: one row per (session, item) event.
        - return ``[num_items, num_items]`` CSR float32.
    """
    pairs = np.unique(np.stack([session_codes, item_codes], axis=1), axis=0)
    num_sessions = int(pairs[:, 0].max()) + 1 if len(pairs) else 0
    x = sp.csr_matrix(
        (np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])),
        shape=(num_sessions, num_items),
    )
    size = np.asarray(x.sum(axis=1)).ravel()
    xw = sp.csr_matrix(sp.diags(np.power(np.maximum(size, 1.0), -basket_power)) @ x)
    c = sp.csr_matrix(x.T @ xw)
    c.setdiag(0)
    c.eliminate_zeros()
    n = np.asarray(x.sum(axis=0)).ravel()
    nw = np.asarray(xw.sum(axis=0)).ravel()
    c = c.tocoo()
    data = c.data / (nw[c.row] + shrink) / np.power(n[c.col] + 1.0, popularity_damping)
    sim = sp.csr_matrix((data.astype(np.float32), (c.row, c.col)), shape=(num_items, num_items))
    return _top_k_rows(sim, top_k)
