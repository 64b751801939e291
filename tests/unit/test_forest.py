"""The compiled tree walk (graph/forest.py) reaches LightGBM's own leaves, row for row.

Rows are built to hit every rule of LightGBM's numerical decision: NaN, exact zeros, values within
±1e-35 (LightGBM reads them as zero), values exactly at a split's threshold and either side of it,
under each way LightGBM handles missing values. A categorical model is not compiled: LightGBM
keeps walking it, and the contributions still add up to its score.
"""

from __future__ import annotations

import numpy as np
import pytest

from graph.forest import Forest
from graph.ltr import PathAttribution

lgb = pytest.importorskip("lightgbm")


def _data(seed: int, n: int, f: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[rng.random(x.shape) < 0.15] = 0.0
    x[:, 3] = rng.integers(0, 4, n)  # a count-like column: many exact zeros
    y = (np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 3]) + rng.normal(size=n) > 1).astype(int)
    return x, y


def _booster(params: dict[str, object], rounds: int = 40) -> object:
    x, y = _data(0, 3000)
    b = lgb.train({"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 5,
                   "verbose": -1, "num_threads": 1, **params}, lgb.Dataset(x, y), rounds)
    # As a replica has it: the booster read back from the model text.
    return lgb.Booster(model_str=b.model_to_string())


def _probe_rows(forest: Forest, seed: int) -> np.ndarray:
    """Random rows, then rows with one value set at, just below and just above a threshold, and
    rows with values within LightGBM's zero band. Float64: a threshold is a float64 value that a
    float32 input rarely equals exactly."""
    x = _data(seed, 600)[0].astype(np.float64)
    rng = np.random.default_rng(seed)
    nodes = rng.integers(0, len(forest.node), 300)
    for r, node in enumerate(nodes):
        t = forest.threshold[node]
        x[r, forest.node[node, 0]] = (t, np.nextafter(t, -np.inf), np.nextafter(t, np.inf))[r % 3]
    x[300:340, 0] = 1e-36
    x[340:380, 0] = -1e-36
    x[380:420, 0] = -0.0
    return x


@pytest.mark.parametrize("params", [{}, {"zero_as_missing": True}, {"use_missing": False}],
                         ids=["nan-missing", "zero-as-missing", "no-missing"])
def test_the_compiled_walk_reaches_lightgbms_leaves(params: dict[str, object]) -> None:
    b = _booster(params)
    forest = Forest.from_dump(b.dump_model()["tree_info"], b.num_feature())
    assert forest is not None
    x = _probe_rows(forest, 1)
    np.testing.assert_array_equal(forest.leaves(x), b.predict(x, pred_leaf=True))
    with np.errstate(over="ignore"):  # a threshold may be ±1e300 (LightGBM's "infinity")
        x = x.astype(np.float32)  # the features' own type
    ref = b.predict(x, pred_leaf=True)
    np.testing.assert_array_equal(forest.leaves(x), ref)
    # a range of trees, as the cascade's stages ask for them
    np.testing.assert_array_equal(forest.leaves(x, 10, 25), ref[:, 10:25])
    # row counts that do not fill the walk's last group of interleaved rows
    for n in (1, 7, 13):
        np.testing.assert_array_equal(forest.leaves(x[-n:], 5, 30), ref[-n:, 5:30])
    assert forest.leaves(x[:0], 0, 5).shape == (0, 5)


def test_a_tree_without_splits_is_leaf_zero() -> None:
    x, y = _data(0, 200)
    b = lgb.train({"objective": "binary", "min_data_in_leaf": 1000, "verbose": -1}, lgb.Dataset(x, y), 3)
    forest = Forest.from_dump(b.dump_model()["tree_info"], b.num_feature())
    assert forest is not None and (forest.root < 0).all()
    np.testing.assert_array_equal(forest.leaves(x[:5]), np.zeros((5, b.num_trees()), np.int32))


def test_a_feature_count_mismatch_is_refused() -> None:
    b = _booster({}, rounds=3)
    forest = Forest.from_dump(b.dump_model()["tree_info"], b.num_feature())
    assert forest is not None
    with pytest.raises(ValueError, match="12 features"):
        forest.leaves(np.zeros((2, 5), np.float32))


def test_a_categorical_model_is_walked_by_lightgbm_and_still_explained() -> None:
    x, y = _data(0, 3000)
    x[:, 3] = np.where(np.isnan(x[:, 3]), 0, x[:, 3])
    b = lgb.train({"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1,
                   "min_data_per_group": 5, "cat_smooth": 1},
                  lgb.Dataset(x, y, categorical_feature=[3]), 30)
    assert any(n.get("decision_type") == "==" for n in _nodes(b))
    assert Forest.from_dump(b.dump_model()["tree_info"], b.num_feature()) is None
    paths = PathAttribution(b)
    assert paths.forest is None
    leaves = paths.leaves(x[:50])
    np.testing.assert_array_equal(leaves, b.predict(x[:50], pred_leaf=True))
    np.testing.assert_allclose(paths.base + paths.explain_leaves(leaves).sum(axis=1),
                               b.predict(x[:50], raw_score=True), rtol=1e-9, atol=1e-9)
    # A range of trees (as the cascade's stages ask) is those trees' columns, and their leaves'
    # values add up to LightGBM's score of the same trees.
    part = paths.leaves(x[:50], 5, 12)
    np.testing.assert_array_equal(part, leaves[:, 5:12])
    np.testing.assert_allclose(paths.value_of(part, 5),
                               b.predict(x[:50], raw_score=True, start_iteration=5,
                                         num_iteration=7), rtol=1e-9, atol=1e-9)
    # The cascade's running score: LightGBM's walk adds the same leaf values.
    score = np.ones(50)
    np.testing.assert_array_equal(paths.leaves(x[:50], 5, 12, add_to=score), part)
    np.testing.assert_allclose(score, 1.0 + paths.value_of(part, 5), rtol=1e-12, atol=1e-12)


def test_path_attribution_uses_the_compiled_walk_and_adds_up_to_the_score() -> None:
    b = _booster({})
    paths = PathAttribution(b)
    assert paths.forest is not None
    x = _probe_rows(paths.forest, 2)
    leaves = paths.leaves(x)
    np.testing.assert_array_equal(leaves, b.predict(x, pred_leaf=True))
    np.testing.assert_allclose(paths.value_of(leaves), b.predict(x, raw_score=True),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(paths.base + paths.explain_leaves(leaves).sum(axis=1),
                               b.predict(x, raw_score=True), rtol=1e-9, atol=1e-9)
    # The walk's running score (the cascade's), stage by stage: the leaf values added tree by
    # tree in the same walk, onto what the earlier stages gave.
    score = np.zeros(len(x))
    trees = b.num_trees()
    for lo, hi in ((0, 7), (7, 20), (20, trees)):
        np.testing.assert_array_equal(paths.leaves(x, lo, hi, add_to=score), leaves[:, lo:hi])
    np.testing.assert_allclose(score, b.predict(x, raw_score=True), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="float64"):
        paths.forest.leaves(x, add_to=np.zeros(len(x), np.float32), value=paths.value,
                            offset=paths.offset)


def _nodes(b: object) -> list[dict[str, object]]:
    out, stack = [], [t["tree_structure"] for t in b.dump_model()["tree_info"]]  # type: ignore[attr-defined]
    while stack:
        n = stack.pop()
        if "split_index" in n:
            out.append(n)
            stack.extend((n["left_child"], n["right_child"]))
    return out


def test_sum_leaf_rows_is_the_one_hot_product_bit_for_bit() -> None:
    # PathAttribution.explain_leaves: each row's reached leaves' table rows, summed in tree
    # order, as the sparse one-hot product it replaced gave them.
    import scipy.sparse as sp

    from graph.forest import sum_leaf_rows

    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 9, 30)  # leaves per tree
    offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    table = rng.normal(size=(int(sizes.sum()), 6)) * 10.0 ** rng.integers(-6, 3, (1, 6))
    leaves = (rng.random((23, 30)) * sizes).astype(np.int32)
    got = sum_leaf_rows(table, leaves, offset)
    idx = (leaves + offset).ravel()
    hot = sp.csr_matrix((np.ones(len(idx)), idx, np.arange(0, len(idx) + 1, 30)),
                        shape=(23, len(table)))
    np.testing.assert_array_equal(got, np.asarray(hot @ table))
    want = np.zeros((23, 6))
    for t in range(30):
        want += table[leaves[:, t] + offset[t]]
    np.testing.assert_array_equal(got, want)
    # the first trees only (the cascade's rows scored by fewer trees)
    np.testing.assert_array_equal(sum_leaf_rows(table, leaves[:, :4], offset[:4]),
                                  table[leaves[:, :4] + offset[:4]].sum(axis=1))
    assert sum_leaf_rows(table, leaves[:0], offset).shape == (0, 6)
