"""The offline ``cold_items`` task: how well items that no training event mentions are found.

Items **first sold after the split** (no training event of this run's data names them, a test
event does) are the items a shop adds after a training run. The model gives them the embedding
``PUT /v1/items`` gives a new item: they have no training edges, so their GNN vector is the item
encoder's (:mod:`graph.item_encoder`, from attributes and text vector), their text vector is
their MiniLM vector, their popularity is 0. :func:`evaluate_cold_items` checks that the served
vectors equal the encoder's output (``encoder_max_abs_diff``) before it measures anything.

Task: every test basket (session) holding at least one such item and at least one other
catalogue item. The other items are revealed as the session (purchases at the basket's time);
the hidden new items are the targets. Rankings (top ``k``, revealed items excluded):

- ``popularity_in_category``: items of the revealed items' categories, by the categories' share
  of the session, then by training popularity; then the rest by popularity.
- ``cold_gnn``: the session's mean GNN item embedding · every item's embedding (the ``ann_sess``
  candidate source).
- ``intentrec``: the recommender as served (:meth:`graph.recommend.Recommender.recommend`).

``popularity_in_category`` and ``cold_gnn`` are also ranked over the pool of new items only
(``*_new_only``): which new arrival the basket bought, the question a "new in your categories"
slot asks. Baskets are a seeded sample (``max_baskets``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from graph import schema as S
from graph.metrics import summarize
from graph.recommend import Recommender, Request
from graph.signals import to_unix_seconds

COLD_KEY = "cold_items"
TASK = "new_items"
MAX_BASKETS = 400


def cold_item_baskets(train: pd.DataFrame, test: pd.DataFrame, item_index: dict[str, int],
                      seed: int = 0, max_baskets: int = MAX_BASKETS
                      ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, float]]]:
    """The new items and the task's baskets.

    Returns:
        ``(new_items, baskets)``: item indices of the new items; per basket ``(revealed item
        indices, target item indices, unix time)``.
    """
    seen = set(train[S.ITEM_COL].dropna().astype(str))
    ev = test[test[S.ITEM_COL].notna()]
    ev = ev[ev[S.EVENT_COL] == S.PURCHASE]
    idx = pd.Index(list(item_index)).get_indexer(pd.Index(ev[S.ITEM_COL].astype(str)))
    ev = ev.assign(_i=idx)[idx >= 0]
    fresh = ~ev[S.ITEM_COL].astype(str).isin(seen)
    new_items = np.unique(ev.loc[fresh, "_i"].to_numpy()).astype(np.int64)
    ev = ev.assign(_new=fresh.to_numpy())
    out: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _, g in ev.groupby(S.SESSION_COL, sort=True):
        targets = np.unique(g.loc[g["_new"], "_i"].to_numpy())
        revealed = np.unique(g.loc[~g["_new"], "_i"].to_numpy())
        if len(targets) and len(revealed):
            out.append((revealed.astype(np.int64), targets.astype(np.int64),
                        float(to_unix_seconds(g[S.TS_COL].min()))))
    if len(out) > max_baskets:
        pick = np.random.default_rng(seed).choice(len(out), size=max_baskets, replace=False)
        out = [out[i] for i in sorted(pick.tolist())]
    return new_items, out


def evaluate_cold_items(rec: Recommender, encoder: Any, items: pd.DataFrame, train: pd.DataFrame,
                        test: pd.DataFrame, k: int = S.TOP_K, seed: int = 0,
                        max_baskets: int = MAX_BASKETS,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``{model: {"new_items": {"recall@k", "ndcg@k", "hit@k", "n"}}, "info": {...}}`` (empty
    without a basket that holds a new item). ``encoder`` is the version's
    :class:`graph.item_encoder.ItemEncoder`."""
    item_index = {str(v): i for i, v in enumerate(items[S.ITEM_COL].astype(str).tolist())}
    new_items, baskets = cold_item_baskets(train, test, item_index, seed, max_baskets)
    if not baskets:
        return {}
    emb = rec.ranker.item_emb
    diff = float(np.abs(encoder.embed_items(items.iloc[new_items], rec.text.item_vectors(new_items))
                        - emb[new_items]).max())
    sig = rec.ranker.signals
    pop = np.log1p(np.maximum(sig.popularity.astype(np.float64), 0.0))
    pop = pop / max(float(pop.max()), 1e-12)
    cat = np.asarray(sig.item_category)
    is_new = np.zeros(len(emb), dtype=bool)
    is_new[new_items] = True

    def top(score: np.ndarray, revealed: np.ndarray, pool: np.ndarray | None) -> np.ndarray:
        score = score.copy()
        score[revealed] = -np.inf
        if pool is not None:
            score[~pool] = -np.inf
        part = np.argpartition(-score, k)[:k]
        part = part[np.argsort(-score[part], kind="stable")]
        return np.where(np.isfinite(score[part]), part, -1)

    ranked: dict[str, list[np.ndarray]] = {m: [] for m in (
        "popularity_in_category", "cold_gnn", "intentrec",
        "popularity_in_category_new_only", "cold_gnn_new_only")}
    for j, (revealed, _, ts) in enumerate(baskets):
        mass = np.bincount(cat[revealed], minlength=int(cat.max()) + 1) / len(revealed)
        pic = mass[cat] + 1e-3 * pop
        gnn = emb @ emb[revealed].mean(axis=0)
        for name, score in (("popularity_in_category", pic), ("cold_gnn", gnn)):
            ranked[name].append(top(score, revealed, None))
            ranked[f"{name}_new_only"].append(top(score, revealed, is_new))
        req = Request(item_events=tuple((int(i), S.PURCHASE, ts) for i in revealed.tolist()),
                      now=ts, k=k)
        got = rec.recommend(req, explain=False).items
        ranked["intentrec"].append(np.pad(got, (0, k - len(got)), constant_values=-1))
        if progress is not None and (j + 1) % 100 == 0:
            progress(f"[cold items] {j + 1}/{len(baskets)} baskets")
    targets = [t for _, t, _ in baskets]
    out: dict[str, Any] = {
        m: {TASK: {**summarize(np.stack(r), targets, k), "n": float(len(baskets))}}
        for m, r in ranked.items()}
    out["info"] = {"new_items": len(new_items), "baskets": len(baskets),
                   "encoder_max_abs_diff": diff}
    return out


def format_cold_items(metrics: dict[str, Any]) -> str:
    """The cold-item table (``metrics["cold_items"]``), or "" without one."""
    from graph.evaluate import format_table

    rows = metrics.get(COLD_KEY)
    if not rows:
        return ""
    info = rows["info"]
    return (f"new items (first sold after the split: {info['new_items']:,} items, "
            f"{info['baskets']:,} test baskets; embedded from attributes and text only, "
            f"encoder check max |diff| {info['encoder_max_abs_diff']:.1e}; *_new_only ranks "
            "the new items alone):\n"
            + format_table({m: v for m, v in rows.items() if m != "info"}))
