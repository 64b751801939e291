"""The trained item encoder: a catalogue item's GNN embedding from its attributes and text.

:class:`~graph.model.IntentGNN` is LightGCN whose layer-0 item vector is the item's id embedding
plus one embedding per attribute field (department, category, subcategory, brand, price band;
:data:`graph.interactions.FEATURE_NAMES`) plus a learned projection ``W`` of the item's MiniLM
text vector ``t`` (:class:`graph.text.ItemText`). An item that is not in the training graph has
no id embedding (:func:`graph.model.export_embeddings` zeroes it, as ``id_dropout`` trained the
feature path to expect) and no edges, so no propagation step reaches it: each of the ``L``
LightGCN layers gives it a zero vector and its final embedding, the mean of layers ``0..L``, is
exactly

    ``(sum_f feature_embs[f][code_f] + W t) / (L + 1)``

Adding such a node changes no other node's embedding either (gcn normalisation only uses the
degrees of connected nodes). :class:`ItemEncoder` stores what that formula needs: the
feature-embedding tables, the text projection, the vocabularies that turn attributes into
codes, the price-band boundaries, and the scale ``1 / (L + 1)``. The serving app embeds an item
added with ``PUT /v1/items/{id}`` through it (:mod:`graph.new_items`), from its attributes and
its text vector, and the offline cold-item test (:mod:`graph.cold_items`) embeds held-out items
the same way.

An artifact whose embeddings do not come from the GNN (the SVD stand-in of ``bench/``) stores a
ridge regression of its item embeddings on the same one-hot attribute codes
(:meth:`ItemEncoder.fit`), with scale 1.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from graph import schema as S
from graph.errors import ArtifactError
from graph.interactions import NUM_PRICE_BANDS

if TYPE_CHECKING:
    from torch import Tensor

    from graph.interactions import Interactions
    from graph.model import IntentGNN

TABLES_FILE = "tables.npz"
META_FILE = "meta.json"
TEXT_KEY = "__text_projection__"  # the text projection's array in TABLES_FILE
RIDGE = 1.0


def attribute_columns(items: pd.DataFrame) -> dict[str, pd.Series]:
    """The string value of every feature field (:data:`FEATURE_NAMES` but the price band, which
    needs the catalogue's prices) per item, as :func:`graph.interactions.item_feature_matrix`
    derives them."""
    path = items[S.CATEGORY_COL].astype(str).reset_index(drop=True)
    parts = path.str.split(S.CATEGORY_SEP.strip())
    brand = (items[S.BRAND_COL].astype("object") if S.BRAND_COL in items
             else pd.Series([None] * len(items), dtype="object"))
    return {
        "department": parts.str[0].str.strip(),
        "category": parts.map(lambda p: S.CATEGORY_SEP.join(x.strip() for x in p[:2])),
        "subcategory": path,
        "brand": brand.reset_index(drop=True),
    }


def price_bounds(items: pd.DataFrame) -> dict[str, list[list[float]]]:
    """Per department, ``[band, lowest price in that band]`` of every price band present: the
    bands of :func:`graph.interactions.item_feature_matrix` (price deciles within the
    department), written so that a new price maps to the band its neighbours have."""
    dept = attribute_columns(items)["department"]
    price = pd.to_numeric(items[S.PRICE_COL], errors="coerce").reset_index(drop=True)
    band = price.groupby(dept).rank(pct=True)
    ok = band.notna()
    idx = np.minimum((band[ok] * NUM_PRICE_BANDS).astype(int), NUM_PRICE_BANDS - 1)
    low = pd.DataFrame({"d": dept[ok], "b": idx, "p": price[ok]}).groupby(["d", "b"])["p"].min()
    out: dict[str, list[list[float]]] = {}
    for key, p in low.items():
        d, b = cast(tuple[str, int], key)
        out.setdefault(str(d), []).append([int(b), float(p)])
    return out


@dataclass(frozen=True)
class ItemEncoder:
    """Attributes → item embedding, for items outside the training graph.

    Args:
        tables: One ``[card_f, d]`` table per field of ``feature_names`` (row 0 = unknown, zero).
        feature_names: The fields, in the model's order.
        vocab: Per field, the value of each code (code 0 = ``"<unk>"``).
        bounds: :func:`price_bounds` of the training catalogue.
        scale: Multiplies the summed tables (``1 / (L + 1)`` for the GNN).
        source: ``"gnn"`` (the trained model's tables) or ``"ridge"`` (:meth:`fit`).
        text_projection: ``[D, d]``: a text vector's contribution is ``t @ text_projection``
            (None: the model had no text input).
    """

    tables: tuple[np.ndarray, ...]
    feature_names: tuple[str, ...]
    vocab: dict[str, list[str]]
    bounds: dict[str, list[list[float]]]
    scale: float
    source: str = "gnn"
    text_projection: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.tables[0].shape[1])

    @classmethod
    def from_gnn(cls, model: IntentGNN, inter: Interactions, items: pd.DataFrame) -> ItemEncoder:
        """The trained model's feature tables (the vocabularies of the graph it was trained on)."""
        tables = tuple(cast("Tensor", emb.weight).detach().float().cpu().numpy().copy()
                       for emb in model.feature_embs)
        proj = None if model.text_proj is None else (
            model.text_proj.weight.detach().float().cpu().numpy().T.copy())
        return cls(tables, tuple(inter.feature_names), dict(inter.feature_vocab),
                   price_bounds(items), 1.0 / (model.num_layers + 1), "gnn", proj)

    @classmethod
    def fit(cls, inter: Interactions, items: pd.DataFrame, item_emb: np.ndarray,
            trained: np.ndarray, ridge: float = RIDGE) -> ItemEncoder:
        """Ridge regression of ``item_emb`` rows of ``trained`` items on their one-hot attribute
        codes: an encoder for embeddings that have no feature path of their own.

        Shapes:
            - item_emb ``[I, d]``; trained ``[I]`` bool.
        """
        import scipy.sparse as sp
        from scipy.sparse.linalg import lsqr

        feats = inter.item_features.numpy()[trained]
        cards = inter.feature_cardinalities
        offsets = np.concatenate([[0], np.cumsum(cards)[:-1]])
        n, nf = feats.shape
        x = sp.csr_matrix((np.ones(n * nf), (np.repeat(np.arange(n), nf),
                                             (feats + offsets).reshape(-1))),
                          shape=(n, int(sum(cards))))
        y = item_emb[trained].astype(np.float64)
        w = np.stack([lsqr(x, y[:, j], damp=np.sqrt(ridge))[0] for j in range(y.shape[1])], 1)
        tables = []
        for f, card in enumerate(cards):
            t = w[offsets[f]: offsets[f] + card].astype(np.float32)
            t[0] = 0.0
            tables.append(t)
        return cls(tuple(tables), tuple(inter.feature_names), dict(inter.feature_vocab),
                   price_bounds(items), 1.0, "ridge")

    def codes(self, items: pd.DataFrame) -> np.ndarray:
        """Each item's code per field (0 where the value was never seen in training).

        Shapes:
            - return ``[len(items), F]`` int64.
        """
        cols = attribute_columns(items)
        price = pd.to_numeric(items[S.PRICE_COL], errors="coerce").to_numpy(np.float64) \
            if S.PRICE_COL in items else np.full(len(items), np.nan)
        bands: list[str | None] = []
        for d, p in zip(cols["department"].tolist(), price.tolist(), strict=True):
            b = self.band(str(d), p)
            bands.append(None if b is None else f"{d}:{b}")
        cols["price_band"] = pd.Series(bands, dtype="object")
        out = np.zeros((len(items), len(self.feature_names)), dtype=np.int64)
        for f, name in enumerate(self.feature_names):
            index = self._index[name]
            out[:, f] = [index.get(str(v), 0) if v is not None and not _isnan(v) else 0
                         for v in cols[name].tolist()]
        return out

    @cached_property
    def _index(self) -> dict[str, dict[str, int]]:
        return {name: {v: i for i, v in enumerate(self.vocab[name]) if i > 0}
                for name in self.feature_names}

    def band(self, department: str, price: float) -> int | None:
        """The price band of ``price`` in ``department`` (None: no price or an unknown one)."""
        rows = self.bounds.get(department)
        if not rows or price is None or not np.isfinite(price):
            return None
        best = int(rows[0][0])
        for b, low in sorted(rows):
            if price >= low:
                best = int(b)
        return best

    def embed(self, codes: np.ndarray, text_vectors: np.ndarray | None = None) -> np.ndarray:
        """The embedding of items with these codes and text vectors.

        Raises:
            ArtifactError: the model has a text input and no text vectors were given, or
                their width is not the model's (a model without one ignores them).

        Shapes:
            - codes ``[n, F]``; text_vectors ``[n, D]``; return ``[n, d]`` float32.
        """
        out = np.zeros((len(codes), self.dim), dtype=np.float64)
        for f, table in enumerate(self.tables):
            out += table[codes[:, f]]
        if self.text_projection is not None:
            if text_vectors is None or text_vectors.shape != (len(codes),
                                                              self.text_projection.shape[0]):
                got = None if text_vectors is None else list(text_vectors.shape)
                raise ArtifactError(
                    f"this item encoder needs one {self.text_projection.shape[0]}-wide text "
                    f"vector per item (graph.text.TextEncoder), got {got}")
            out += text_vectors.astype(np.float64) @ self.text_projection.astype(np.float64)
        return (out * self.scale).astype(np.float32)

    def embed_items(self, items: pd.DataFrame, text_vectors: np.ndarray | None = None
                    ) -> np.ndarray:
        """:meth:`embed` of :meth:`codes`. Shapes: ``[len(items), d]``."""
        return self.embed(self.codes(items), text_vectors)

    def to_files(self) -> dict[str, bytes]:
        """The artifact's ``item_encoder/`` folder."""
        buf = io.BytesIO()
        arrays: dict[str, Any] = dict(zip(self.feature_names, self.tables, strict=True))
        if self.text_projection is not None:
            arrays[TEXT_KEY] = self.text_projection
        np.savez(buf, **arrays)
        meta = {"feature_names": list(self.feature_names), "vocab": self.vocab,
                "bounds": self.bounds, "scale": self.scale, "source": self.source}
        return {TABLES_FILE: buf.getvalue(), META_FILE: json.dumps(meta).encode()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> ItemEncoder:
        """Read :meth:`to_files`.

        Raises:
            ArtifactError: a missing file or a table that does not match its vocabulary.
        """
        missing = {TABLES_FILE, META_FILE} - set(files)
        if missing:
            raise ArtifactError(f"the item encoder lacks {sorted(missing)}; retrain with "
                                "`python train_job.py`")
        meta: dict[str, Any] = json.loads(files[META_FILE])
        arrays = np.load(io.BytesIO(files[TABLES_FILE]))
        names: Sequence[str] = meta["feature_names"]
        tables = tuple(np.asarray(arrays[n], dtype=np.float32) for n in names)
        for n, t in zip(names, tables, strict=True):
            if t.shape[0] != len(meta["vocab"][n]):
                raise ArtifactError(f"item encoder table {n!r} has {t.shape[0]} rows for "
                                    f"{len(meta['vocab'][n])} values; retrain with "
                                    "`python train_job.py`")
        proj = (np.asarray(arrays[TEXT_KEY], dtype=np.float32) if TEXT_KEY in arrays.files
                else None)
        if proj is not None and (proj.ndim != 2 or proj.shape[1] != tables[0].shape[1]):
            raise ArtifactError(f"item encoder text projection has shape {list(proj.shape)} for "
                                f"{tables[0].shape[1]}-wide embeddings; retrain with "
                                "`python train_job.py`")
        return cls(tables, tuple(names), meta["vocab"], meta["bounds"], float(meta["scale"]),
                   str(meta.get("source", "gnn")), proj)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and v != v

