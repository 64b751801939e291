"""The item encoder (graph/item_encoder.py): a new item's embedding from its attributes is what the
trained GNN gives an item without edges."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from graph import schema as S
from graph.errors import ArtifactError
from graph.interactions import build_interactions, item_feature_matrix
from graph.item_encoder import ItemEncoder, price_bounds
from graph.model import IntentGNN, build_adjacency, export_embeddings


def tiny_catalogue(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    depts = ["PRODUCE", "DAIRY", "GROCERY"]
    cats = {d: [f"{d} > C{j}" for j in range(3)] for d in depts}
    rows = []
    for i in range(n):
        d = depts[i % 3]
        cat = f"{cats[d][int(rng.integers(0, 3))]} > T{int(rng.integers(0, 2))}"
        rows.append({S.ITEM_COL: f"i{i}", S.TITLE_COL: cat, S.CATEGORY_COL: cat,
                     S.DEPARTMENT_COL: d, S.BRAND_COL: ["National", "Private"][i % 2],
                     S.PRICE_COL: round(float(rng.uniform(0.5, 20.0)), 2) if i % 7 else np.nan})
    return pd.DataFrame(rows)


def tiny_events(items: pd.DataFrame, warm: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{S.USER_COL: f"u{int(rng.integers(0, 6))}", S.ITEM_COL: f"i{int(rng.integers(0, warm))}",
             S.TS_COL: pd.Timestamp("2017-06-01") + pd.Timedelta(hours=int(h)),
             S.EVENT_COL: S.PURCHASE} for h in range(120)]
    return pd.DataFrame(rows)


def test_codes_reproduce_the_training_feature_matrix() -> None:
    items = tiny_catalogue()
    inter = build_interactions(tiny_events(items, warm=30), items)
    enc = ItemEncoder(tuple(np.zeros((c, 4), np.float32) for c in inter.feature_cardinalities),
                      tuple(inter.feature_names), inter.feature_vocab,
                      price_bounds(items),
                      1.0)
    expected, _ = item_feature_matrix(items)
    np.testing.assert_array_equal(enc.codes(items), expected)


def test_cold_item_embedding_equals_the_gnn_export() -> None:
    """An item without edges: export_embeddings (full LightGCN propagation) and the encoder agree
    exactly, for a model with 2 layers (the scale 1/3 matters)."""
    items = tiny_catalogue()
    warm = 30
    inter = build_interactions(tiny_events(items, warm=warm), items)
    torch.manual_seed(0)
    model = IntentGNN(inter.num_users, inter.num_items, inter.feature_cardinalities, dim=8,
                      num_layers=2, item_features=inter.item_features)
    adj = build_adjacency(inter.edge_index, inter.edge_weight, inter.num_users, inter.num_items)
    has_edges = inter.item_has_edges()
    assert not has_edges[warm:].any()
    _, item_emb = export_embeddings(model, adj, has_edges)
    enc = ItemEncoder.from_gnn(model, inter, items)
    cold = np.flatnonzero(~has_edges)
    got = enc.embed_items(items.iloc[cold])
    np.testing.assert_allclose(got, item_emb[cold], rtol=1e-5, atol=1e-6)
    assert np.abs(got).sum() > 0  # not trivially zero
    # A warm item is not just its attributes: the encoder is only the cold-start path.
    assert not np.allclose(enc.embed_items(items.iloc[:1]), item_emb[:1])


def test_unknown_values_get_code_zero_and_prices_their_band() -> None:
    items = tiny_catalogue()
    inter = build_interactions(tiny_events(items, warm=30), items)
    torch.manual_seed(0)
    model = IntentGNN(inter.num_users, inter.num_items, inter.feature_cardinalities, dim=4,
                      num_layers=1, item_features=inter.item_features)
    enc = ItemEncoder.from_gnn(model, inter, items)
    new = pd.DataFrame([{S.ITEM_COL: "x", S.TITLE_COL: "t", S.CATEGORY_COL: "PRODUCE > C0 > NEW",
                         S.BRAND_COL: "Acme", S.PRICE_COL: 1e6}])
    codes = enc.codes(new)[0]
    names = list(enc.feature_names)
    assert codes[names.index("department")] == enc.vocab["department"].index("PRODUCE")
    assert codes[names.index("subcategory")] == 0 and codes[names.index("brand")] == 0
    top = max(b for b, _ in enc.bounds["PRODUCE"])
    assert enc.vocab["price_band"][codes[names.index("price_band")]] == f"PRODUCE:{top}"
    assert np.isfinite(enc.embed(codes[None, :])).all()


def test_files_round_trip() -> None:
    items = tiny_catalogue()
    inter = build_interactions(tiny_events(items, warm=30), items)
    model = IntentGNN(inter.num_users, inter.num_items, inter.feature_cardinalities, dim=4,
                      num_layers=3, item_features=inter.item_features)
    enc = ItemEncoder.from_gnn(model, inter, items)
    back = ItemEncoder.from_files(enc.to_files())
    np.testing.assert_array_equal(back.embed_items(items), enc.embed_items(items))
    assert back.scale == pytest.approx(0.25)


def test_ridge_encoder_fits_embeddings_explained_by_attributes() -> None:
    items = tiny_catalogue(60)
    inter = build_interactions(tiny_events(items, warm=60), items)
    rng = np.random.default_rng(1)
    truth = [rng.normal(size=(c, 3)) for c in inter.feature_cardinalities]
    for t in truth:
        t[0] = 0.0  # code 0 (unknown) is the zero vector, as in the GNN
    feats = inter.item_features.numpy()
    emb = sum(t[feats[:, f]] for f, t in enumerate(truth)).astype(np.float32)
    enc = ItemEncoder.fit(inter, items, emb, np.ones(len(items), bool), ridge=1e-6)
    pred = enc.embed_items(items)
    assert np.corrcoef(pred.ravel(), emb.ravel())[0, 1] > 0.99


def test_cold_item_baskets_hold_out_items_first_sold_after_the_split() -> None:
    from graph.cold_items import cold_item_baskets

    items = tiny_catalogue()
    index = {f"i{i}": i for i in range(len(items))}
    ts = pd.Timestamp("2017-12-05")

    def ev(session: str, item: str) -> dict[str, object]:
        return {S.USER_COL: "u1", S.SESSION_COL: session, S.ITEM_COL: item, S.TS_COL: ts,
                S.EVENT_COL: S.PURCHASE}

    train = pd.DataFrame([ev("b0", "i1"), ev("b0", "i2")])
    test = pd.DataFrame([ev("b1", "i1"), ev("b1", "i5"), ev("b1", "i6"),  # new: i5, i6
                         ev("b2", "i5"),  # only new items: nothing to reveal
                         ev("b3", "i2"), ev("b3", "nope")])  # no new item (and one unknown)
    new, baskets = cold_item_baskets(train, test, index)
    assert new.tolist() == [5, 6]
    assert len(baskets) == 1
    revealed, targets, _ = baskets[0]
    assert revealed.tolist() == [1] and targets.tolist() == [5, 6]


def _text_model(items: pd.DataFrame, inter: object, dim: int = 8, layers: int = 2,
                text_dim: int = 6, seed: int = 0) -> tuple[IntentGNN, np.ndarray, np.ndarray]:
    """A model whose layer 0 reads text vectors: one per distinct title of the catalogue."""
    codes, uniques = pd.factorize(items[S.TITLE_COL])
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(uniques), text_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    torch.manual_seed(seed)
    model = IntentGNN(inter.num_users, inter.num_items, inter.feature_cardinalities,  # type: ignore[attr-defined]
                      dim=dim, num_layers=layers,
                      item_features=inter.item_features,  # type: ignore[attr-defined]
                      text_vectors=torch.from_numpy(vectors),
                      text_row=torch.from_numpy(codes.astype(np.int64)))
    return model, vectors, codes.astype(np.int64)


def test_cold_item_embedding_with_text_equals_the_gnn_export() -> None:
    """With text at layer 0, the encoder's vector from attributes and text vector is exactly what
    LightGCN propagation gives an item without edges, and the text changes it."""
    items = tiny_catalogue()
    warm = 30
    inter = build_interactions(tiny_events(items, warm=warm), items)
    model, vectors, rows = _text_model(items, inter)
    adj = build_adjacency(inter.edge_index, inter.edge_weight, inter.num_users, inter.num_items)
    has_edges = inter.item_has_edges()
    _, item_emb = export_embeddings(model, adj, has_edges)
    enc = ItemEncoder.from_gnn(model, inter, items)
    assert enc.text_projection is not None and enc.text_projection.shape == (6, 8)
    cold = np.flatnonzero(~has_edges)
    got = enc.embed_items(items.iloc[cold], vectors[rows[cold]])
    np.testing.assert_allclose(got, item_emb[cold], rtol=1e-5, atol=1e-6)
    # Same attributes, another text: another vector, by exactly the projected difference.
    other = enc.embed_items(items.iloc[cold[:1]], vectors[(rows[cold[:1]] + 1) % len(vectors)])
    assert not np.allclose(other, got[:1])
    # The text projection is saved with the tables.
    back = ItemEncoder.from_files(enc.to_files())
    np.testing.assert_array_equal(back.embed_items(items.iloc[cold], vectors[rows[cold]]), got)
    with pytest.raises(ArtifactError, match="6-wide text vector"):
        enc.embed_items(items.iloc[cold])
    with pytest.raises(ArtifactError, match="6-wide text vector"):
        enc.embed_items(items.iloc[cold], np.zeros((len(cold), 5), np.float32))


def test_text_projection_learns_from_the_loss() -> None:
    """The projection is a trained parameter: the BPR loss has a gradient on it."""
    from graph.model import bpr_loss

    items = tiny_catalogue()
    inter = build_interactions(tiny_events(items, warm=30), items)
    model, _, _ = _text_model(items, inter)
    adj = build_adjacency(inter.edge_index, inter.edge_weight, inter.num_users, inter.num_items)
    users, item_out = model(adj)
    ei = inter.edge_index
    loss = bpr_loss(users[ei[0]], item_out[ei[1]], item_out[(ei[1] + 1) % inter.num_items], 1e-4)
    loss.backward()
    assert model.text_proj is not None and model.text_proj.weight.grad is not None
    assert float(model.text_proj.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="together"):
        IntentGNN(inter.num_users, inter.num_items, inter.feature_cardinalities,
                  item_features=inter.item_features, text_vectors=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="text_row must hold rows"):
        IntentGNN(inter.num_users, inter.num_items, inter.feature_cardinalities,
                  item_features=inter.item_features, text_vectors=torch.zeros(2, 3),
                  text_row=torch.full((inter.num_items,), 2))
