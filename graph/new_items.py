"""Catalogue items added after training, applied on top of a model version.

``PUT /v1/items/{id}`` stores an item's attributes (:class:`NewItem`); every ranker replica then
serves :func:`with_items` of its model version: the artifact with those items appended (or, for
an id the model already has, its attributes replaced), everything per item extended the way
training would have filled it for an item nobody bought yet:

- **GNN embedding**: the trained item encoder's vector from its attributes and text vector
  (:mod:`graph.item_encoder`: exactly what the model gives an item without edges). An updated
  trained item keeps its trained vector, moved by the change of its attribute and text part
  (``encoder(new) - encoder(old)``; the layer-0 term is exact, propagation over its edges is
  redone by the next training run).
- **text**: its MiniLM vector (computed by the caller), so semantic search and the ranker's
  query features see it; the lexical index is rebuilt from its title and category.
- **signals**: popularity 0, the catalogue's repeat rate of items without buyers, no
  co-occurrence neighbours; its department, category and product line by value (a new category
  or line gets a new index).
- **ranker item features** (:func:`graph.features.item_features`): no trend and no new buyers,
  its price, its price's percentile among the category's prices, its brand's popularity.

The same function embeds held-out items in the offline cold-item test (:mod:`graph.cold_items`),
so what is measured is what is served.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from graph import schema as S
from graph.errors import ArtifactError

if TYPE_CHECKING:  # NewItem is light: the HTTP ingress builds one per PUT
    from graph.artifacts import ModelArtifact
    from graph.signals import RankingSignals


@dataclass(frozen=True)
class NewItem:
    """One item's attributes as ``PUT /v1/items/{id}`` stores them (validated by the API)."""

    item_id: str
    title: str
    category: str
    brand: str | None = None
    price: float | None = None
    available: bool = True  # False: kept in the catalogue, never recommended or found

    def to_row(self) -> dict[str, object]:
        """The item as a catalogue row (the normalisation of :func:`graph.data.load_files`)."""
        dept = self.category.split(S.CATEGORY_SEP.strip())[0].strip()
        return {S.ITEM_COL: self.item_id, S.TITLE_COL: self.title, S.CATEGORY_COL: self.category,
                S.DEPARTMENT_COL: dept, S.BRAND_COL: self.brand or "unknown",
                S.PRICE_COL: math.nan if self.price is None else float(self.price)}


def new_item_texts(items: Sequence[NewItem]) -> list[str]:
    """The sentence-model text of each item (:func:`graph.text.item_texts`)."""
    from graph.text import item_texts

    return item_texts(pd.DataFrame([it.to_row() for it in items]))


def with_items(art: ModelArtifact, items: Sequence[NewItem], text_vectors: np.ndarray
               ) -> ModelArtifact:
    """``art`` with ``items`` added or updated (see the module docstring); ``art`` is unchanged.

    Args:
        art: A model version (it must carry an item encoder).
        items: The items, ids unique; an id of the catalogue updates that item.
        text_vectors: Each item's unit-length text vector (:func:`new_item_texts` through
            :class:`graph.text.TextEncoder`).

    Raises:
        ArtifactError: The version has no item encoder (written by an older release).

    Shapes:
        - text_vectors ``[len(items), text dim]``.
    """
    from graph.text import ItemText

    if not items:
        return art
    enc = art.item_encoder
    if enc is None:
        raise ArtifactError(f"model version {art.version} has no item encoder (item_encoder/): "
                            "it was written by an older release; retrain with "
                            "`python train_job.py` to add items without a retrain")
    if len(text_vectors) != len(items):
        raise ArtifactError(f"{len(text_vectors)} text vectors for {len(items)} items")
    n_old = len(art.items)
    index = art.item_index()
    rows = np.array([index.get(it.item_id, -1) for it in items], dtype=np.int64)
    new = rows < 0
    rows[new] = n_old + np.arange(int(new.sum()))
    n = n_old + int(new.sum())
    added = pd.DataFrame([it.to_row() for it in items])

    table = pd.concat([art.items, added[new].reindex(columns=art.items.columns)],
                      ignore_index=True)
    for col in added.columns:
        if col in table.columns:
            table[col] = table[col].astype("object")
            table.loc[rows, col] = added[col].to_numpy(dtype=object)
            if col == S.PRICE_COL:
                table[col] = pd.to_numeric(table[col]).astype("float64")
    table = table.astype({c: art.items[c].dtype for c in art.items.columns
                          if c != S.PRICE_COL and art.items[c].dtype != object}, errors="ignore")

    emb = np.concatenate([art.item_emb, np.zeros((n - n_old, art.item_emb.shape[1]),
                                                 dtype=np.float32)])
    t = art.text
    new_vec = enc.embed_items(added, text_vectors.astype(np.float32))
    old = ~new
    if old.any():  # trained items: move by the change of their attribute and text part
        emb[rows[old]] += new_vec[old] - enc.embed_items(art.items.iloc[rows[old]],
                                                         t.item_vectors(rows[old]))
    emb[rows[new]] = new_vec[new]

    texts = np.concatenate([t.texts, np.asarray(new_item_texts(items), dtype=object)])
    item_row = np.concatenate([t.item_row, np.zeros(n - n_old, dtype=np.int64)])
    item_row[rows] = len(t.texts) + np.arange(len(items))
    text = ItemText(texts, np.concatenate([t.vectors, text_vectors.astype(np.float32)]),
                    item_row, t.model)

    signals = _signals(art, table, rows, n)
    static = _item_static(art, table, signals, rows, n)
    return dataclasses.replace(art, items=table, item_emb=emb, item_static=static,
                               signals=signals, text=text)


def _dense_of(keys: pd.Series, dense: np.ndarray, new_keys: pd.Series) -> np.ndarray:
    """Dense group indices of ``new_keys``: the index existing items with the same key have, or
    a fresh one after the largest."""
    known = pd.Series(dense, index=keys.to_numpy()).groupby(level=0).first()
    out = np.empty(len(new_keys), dtype=np.int64)
    nxt = int(dense.max()) + 1 if len(dense) else 0
    fresh: dict[str, int] = {}
    for j, k in enumerate(new_keys.tolist()):
        if k in known.index:
            out[j] = int(known[k])
        else:
            if k not in fresh:
                fresh[k] = nxt
                nxt += 1
            out[j] = fresh[k]
    return out


def _signals(art: ModelArtifact, table: pd.DataFrame, rows: np.ndarray, n: int) -> RankingSignals:
    import scipy.sparse as sp

    from graph.item_encoder import attribute_columns

    sig = art.signals
    n_old = sig.num_items
    extra = n - n_old

    def grow(a: np.ndarray, fill: float | int) -> np.ndarray:
        return np.concatenate([a, np.full(extra, fill, dtype=a.dtype)])

    had_buyers = sig.popularity > 0
    cold_rate = (float(np.median(sig.item_repeat_rate[~had_buyers])) if (~had_buyers).any()
                 else float(np.median(sig.item_repeat_rate)))
    old_cols = attribute_columns(art.items)
    cols = attribute_columns(table.iloc[rows])
    dept_index = {d: i for i, d in enumerate(sig.department_names)}
    department = grow(sig.item_department, 0)
    department[rows] = [dept_index.get(str(d), 0) for d in cols["department"].tolist()]
    category = grow(sig.item_category, 0)
    category[rows] = _dense_of(old_cols["category"], sig.item_category, cols["category"])
    line_key = old_cols["category"] + "\x1f" + old_cols["brand"].astype(str)
    line = grow(sig.item_line, 0)
    line[rows] = _dense_of(line_key, sig.item_line,
                           cols["category"] + "\x1f" + cols["brand"].astype(str))
    sim = sig.item_sim
    item_sim = sp.csr_matrix((sim.data, sim.indices, np.concatenate(
        [sim.indptr, np.full(extra, sim.indptr[-1], dtype=sim.indptr.dtype)])), shape=(n, n))
    return dataclasses.replace(
        sig, popularity=grow(sig.popularity, 0.0),
        item_repeat_rate=grow(sig.item_repeat_rate, cold_rate), item_sim=item_sim,
        item_department=department, item_category=category, item_line=line)


def _item_static(art: ModelArtifact, table: pd.DataFrame, signals: RankingSignals,
                 rows: np.ndarray, n: int) -> np.ndarray:
    from graph.features import ITEM_FEATURES

    static = np.concatenate([art.item_static, np.full((n - len(art.item_static),
                                                       art.item_static.shape[1]), np.nan,
                                                      dtype=np.float32)])
    col = {name: j for j, name in enumerate(ITEM_FEATURES)}
    sig = signals
    price = pd.to_numeric(table[S.PRICE_COL], errors="coerce").to_numpy(np.float64)
    cat = np.asarray(sig.item_category)
    new = rows[rows >= len(art.item_static)]
    static[new, col["pop_trend"]] = 0.0  # no purchases yet; a known item keeps its trend
    static[new, col["new_buyers"]] = 0.0  # and no buyers, new or not (new_share stays NaN)
    static[rows, col["repeat_rate"]] = sig.item_repeat_rate[rows]
    static[rows, col["price"]] = price[rows]
    for r in rows.tolist():
        same = price[cat == cat[r]]
        same = same[np.isfinite(same)]
        # The percentile as item_features computes it (pandas' average rank, pct=True).
        less, ties = float((same < price[r]).sum()), float((same == price[r]).sum())
        static[r, col["price_band"]] = (np.nan if not np.isfinite(price[r]) or not len(same)
                                        else (less + (ties + 1.0) / 2.0) / len(same))
    if S.BRAND_COL in table:
        brand = table[S.BRAND_COL].astype(str).to_numpy()
        pop = np.asarray(sig.popularity, dtype=np.float64)
        totals = pd.Series(pop).groupby(brand).sum()
        static[rows, col["brand_pop"]] = np.log1p(totals.reindex(brand[rows]).fillna(0.0)
                                                  .to_numpy())
    return static
