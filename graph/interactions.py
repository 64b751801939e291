"""The bipartite user–item graph the GNN trains on, with item features for cold start.

Edges are unique (user, item) pairs. An edge's weight sums, over the pair's events, the event-type
weight (``schema.EVENT_WEIGHTS``: purchase > add_to_cart > click > view) times an exponential
recency decay, so that last week's purchase outweighs one from last spring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from graph import schema as S
from graph.errors import DataError

FEATURE_NAMES: tuple[str, ...] = ("department", "category", "subcategory", "brand", "price_band")
NUM_PRICE_BANDS = 8


@dataclass
class Interactions:
    """Graph tensors and id maps for one training run.

    Shapes:
        - **edge_index** ``[2, E]`` (long): row 0 user index, row 1 item index, unique pairs.
        - **edge_weight** ``[E]`` (float).
        - **item_features** ``[num_items, F]`` (long): one vocabulary index per field, 0 = unknown.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    edge_index: torch.Tensor
    edge_weight: torch.Tensor
    item_features: torch.Tensor
    feature_names: list[str]
    feature_cardinalities: list[int]
    feature_vocab: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def user_index(self) -> dict[str, int]:
        """Map user id → row index."""
        return {u: i for i, u in enumerate(self.user_ids.tolist())}

    def item_index(self) -> dict[str, int]:
        """Map item id → column index (the whole catalogue)."""
        return {it: i for i, it in enumerate(self.item_ids.tolist())}

    def item_has_edges(self) -> np.ndarray:
        """Boolean mask ``[num_items]`` of items with at least one training edge."""
        mask = np.zeros(self.num_items, dtype=bool)
        mask[self.edge_index[1].numpy()] = True
        return mask


def recency_decay(ts: pd.Series, now: pd.Timestamp, half_life_days: float) -> np.ndarray:
    """``0.5 ** (age / half_life)`` per event; events after ``now`` count as age 0."""
    age_days = (now - ts).dt.total_seconds().to_numpy() / 86400.0
    return np.power(0.5, np.clip(age_days, 0.0, None) / half_life_days)


def _vocab(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Index values with 0 reserved for unknown/missing."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    return (codes + 1).astype(np.int64), ["<unk>", *map(str, uniques)]


def item_feature_matrix(items: pd.DataFrame) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Encode catalogue attributes as one vocabulary index per field.

    Fields: department (path level 1), category (path levels 1–2), subcategory (the full path),
    brand, and a price band (price deciles within the department, so "premium cereal" and
    "premium steak" share a band meaning).
    """
    path = items[S.CATEGORY_COL].astype(str)
    parts = path.str.split(S.CATEGORY_SEP.strip())
    level1 = parts.str[0].str.strip()
    level2 = parts.map(lambda p: S.CATEGORY_SEP.join(x.strip() for x in p[:2]))
    price = pd.to_numeric(items[S.PRICE_COL], errors="coerce")
    band = price.groupby(level1).rank(pct=True)
    band_idx = np.where(
        band.isna(), -1, np.minimum((band.fillna(0) * NUM_PRICE_BANDS).astype(int), NUM_PRICE_BANDS - 1)
    )
    band_str = pd.Series(
        np.where(band_idx < 0, None, level1 + ":" + band_idx.astype(str)), dtype="object"
    )
    cols = {
        "department": level1,
        "category": level2,
        "subcategory": path,
        "brand": items[S.BRAND_COL].astype("object"),
        "price_band": band_str,
    }
    mats, vocab = [], {}
    for name in FEATURE_NAMES:
        codes, v = _vocab(pd.Series(cols[name]).reset_index(drop=True))
        mats.append(codes)
        vocab[name] = v
    return np.stack(mats, axis=1), vocab


def build_interactions(
    train_events: pd.DataFrame,
    items: pd.DataFrame,
    now: pd.Timestamp | None = None,
    half_life_days: float = 90.0,
    user_ids: np.ndarray | None = None,
) -> Interactions:
    """Build the training graph from events before the split.

    Args:
        train_events: Canonical events, all before the split.
        items: The whole catalogue; every item becomes a node (cold items have no edges).
        now: Reference time of the recency decay (default: the last training event).
        half_life_days: Half-life of an event's weight.
        user_ids: Fix the user index (e.g. all users of the full training period when the GNN is
            fitted on an earlier window); events of other users are dropped. Default: the users of
            ``train_events``, sorted.

    Raises:
        DataError: if no event carries an item.
    """
    ev = train_events[train_events[S.ITEM_COL].notna()]
    weights = ev[S.EVENT_COL].map(S.EVENT_WEIGHTS).to_numpy(dtype=np.float64)
    ev = ev[weights > 0]
    weights = weights[weights > 0]
    if ev.empty:
        raise DataError("no training event with an item and a positive weight: nothing to learn from",
                        field=S.EVENT_COL)
    now = ev[S.TS_COL].max() if now is None else now
    w = weights * recency_decay(ev[S.TS_COL], now, half_life_days)

    item_ids = items[S.ITEM_COL].astype(str).to_numpy()
    item_pos = pd.Index(item_ids)
    if user_ids is None:
        user_ids = np.sort(ev[S.USER_COL].unique().astype(str))
    user_codes = pd.Index(user_ids).get_indexer(ev[S.USER_COL])
    keep = user_codes >= 0
    ev, w, user_codes = ev[keep], w[keep], user_codes[keep]
    item_codes = item_pos.get_indexer(ev[S.ITEM_COL])
    if (item_codes < 0).any():
        raise DataError(
            f"{int((item_codes < 0).sum())} training events reference items missing from the "
            "catalogue; load data through graph.data so they are checked",
            field=S.ITEM_COL,
        )
    pairs = pd.DataFrame({"u": user_codes, "i": item_codes, "w": w}).groupby(
        ["u", "i"], sort=True, as_index=False
    )["w"].sum()
    feats, vocab = item_feature_matrix(items)
    return Interactions(
        user_ids=np.asarray(user_ids, dtype=object).astype(str),
        item_ids=item_ids,
        edge_index=torch.tensor(np.stack([pairs["u"].to_numpy(), pairs["i"].to_numpy()]),
                                dtype=torch.long),
        edge_weight=torch.tensor(pairs["w"].to_numpy(), dtype=torch.float32),
        item_features=torch.from_numpy(feats).long(),
        feature_names=list(FEATURE_NAMES),
        feature_cardinalities=[len(vocab[n]) for n in FEATURE_NAMES],
        feature_vocab=vocab,
    )
