"""Hybrid search (graph/search.py), the text embeddings (graph/text.py) and the query simulator
(graph/queries.py), on real catalogue rows of the built-in data and the packaged sentence model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from graph import schema as S
from graph.queries import simulate_query
from graph.search import SearchIndex, analyze
from graph.text import (
    QUERY_MAX_TOKENS,
    ItemText,
    TextEncoder,
    get_encoder,
    item_texts,
    own_title_share,
    wants_text_input,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def catalogue() -> pd.DataFrame:
    """Every apple and soft-drink item of the built-in data plus a seeded sample of the rest
    (distractors such as APPLE SAUCE, PINEAPPLE, CLUB SODA mixers)."""
    from graph.data import load_builtin

    items = load_builtin(max_users=20).items
    cat = items[S.CATEGORY_COL]
    keep = cat.str.contains("APPLE|SOFT DRINKS|SODA", regex=True)
    rest = items[~keep].sample(n=1500, random_state=0)
    return pd.concat([items[keep], rest]).reset_index(drop=True)


@pytest.fixture(scope="module")
def index(catalogue: pd.DataFrame) -> SearchIndex:
    return SearchIndex(catalogue, ItemText.build(catalogue))


def test_apple_finds_apples_through_the_stemmer(catalogue: pd.DataFrame, index: SearchIndex) -> None:
    apples = np.flatnonzero(catalogue[S.CATEGORY_COL].str.startswith("PRODUCE > APPLES").to_numpy())
    assert len(apples) > 10
    q = index.scores("apple")
    # The old hand-written stemmer made "apples" -> "appl" but kept "apple": no APPLES item matched.
    assert (q.lexical_of(apples) > 0).all()
    pop = np.zeros(len(catalogue))
    top = q.top(q.fused_of(np.arange(len(catalogue))), pop, 20)
    assert np.isin(top, apples).sum() >= 10


def test_a_pickled_index_scores_the_same_and_shares_the_process_encoder(
        catalogue: pd.DataFrame, index: SearchIndex) -> None:
    """Evaluation ships the catalogue's index to Ray actors (graph/parallel.py): the stemmer, lock,
    caches and loaded models are not pickled; the copy makes its own and scores alike."""
    import pickle

    index.scores("apple")
    copy = pickle.loads(pickle.dumps(index))
    assert copy.cache_info().currsize == 0 and copy.encoder is get_encoder()
    everything = np.arange(len(catalogue))
    for text in ("apple", "soda", "kids cereal"):
        a, b = index.scores(text), copy.scores(text)
        np.testing.assert_array_equal(b.lexical_of(everything), a.lexical_of(everything))
        np.testing.assert_array_equal(b.semantic_of(everything), a.semantic_of(everything))


def test_soda_finds_soft_drinks_without_a_shared_word(catalogue: pd.DataFrame,
                                                      index: SearchIndex) -> None:
    cat = catalogue[S.CATEGORY_COL]
    q = index.scores("soda")
    soft = np.flatnonzero(cat.str.startswith("GROCERY > SOFT DRINKS").to_numpy())
    soft = soft[q.lexical_of(soft) == 0]  # soft drinks without the word: BM25 cannot find them
    assert len(soft) > 100
    hits = q.top(q.fused_of(np.arange(len(catalogue))), np.zeros(len(catalogue)), 200)
    assert np.isin(hits, soft).sum() >= 50
    # Semantic similarity ranks soft drinks above unrelated items.
    unrelated = np.flatnonzero((~cat.str.contains("DRINK|DRNK|SODA|WATER|JUICE|BEVERAGE|GROCERY",
                                                  regex=True)).to_numpy())
    assert len(unrelated) > 100
    assert np.median(q.semantic_of(soft)) > np.median(q.semantic_of(unrelated))


def test_scores_are_cached_per_normalised_text_and_fusion_is_reciprocal_rank(
        index: SearchIndex) -> None:
    a = index.scores("Kids  Cereal")
    assert index.scores("kids cereal") is a
    best_lex = int(np.argmax(a.lexical))
    assert a.lex_rank[best_lex] == 1 and a.lexical[best_lex] == pytest.approx(1.0)
    item = int(np.flatnonzero(a.lex_row == best_lex)[0])
    sem_rank = a.sem_rank[a.sem_row[item]]
    expect = 1 / 61 + (1 / (60 + sem_rank) if sem_rank else 0.0)
    assert a.fused_of(np.array([item]))[0] == pytest.approx(expect)


def test_cache_counts_hits_and_misses_and_clears(index: SearchIndex) -> None:
    index.cache_clear()
    assert index.cache_info().currsize == 0
    first = index.scores("herbal tea")
    assert index.scores(" Herbal  TEA ") is first
    info = index.cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 1, 1)
    index.cache_clear()
    assert index.scores("herbal tea") is not first
    assert index.cache_info()[:2] == (0, 1)


def test_a_cached_query_keeps_only_its_matched_documents(catalogue: pd.DataFrame,
                                                         index: SearchIndex) -> None:
    q = index.scores("apple juice")
    bm25 = np.asarray(index._bm25.get_scores(analyze(["apple juice"], index._stemmer)[0]))
    assert 0 < len(q.lex_docs) == (bm25 > 0).sum() < q.num_docs
    np.testing.assert_allclose(q.lexical, bm25 / bm25.max(), rtol=1e-6)
    items = np.arange(len(catalogue))
    np.testing.assert_allclose(q.lexical_of(items), (bm25 / bm25.max())[q.lex_row], rtol=1e-6)
    assert len(q.sem_near) == len(q.sem_near_rank) == 100
    assert sorted(q.sem_rank[q.sem_rank > 0].tolist()) == list(range(1, 101))


def test_query_hits_are_the_fused_top_computed_once_per_popularity(
        catalogue: pd.DataFrame, index: SearchIndex) -> None:
    q = index.scores("apple juice")
    pop = np.arange(len(catalogue), dtype=np.float64)
    hits = q.hits(pop, 30)
    np.testing.assert_array_equal(hits, q.top(q.fused_of(np.arange(len(catalogue))), pop, 30))
    assert q.hits(pop, 30) is hits  # the second request with this query reuses them
    assert not hits.flags.writeable
    # Another catalogue popularity (a new model version's) recomputes: ties break the other way.
    again = q.hits(pop[::-1].copy(), 30)
    assert again is not hits
    np.testing.assert_array_equal(again, q.top(q.fused_of(np.arange(len(catalogue))),
                                               pop[::-1].copy(), 30))


def test_long_queries_are_cut_to_the_query_word_piece_budget() -> None:
    enc = get_encoder()
    # [CLS] + 30 word pieces + [SEP] fill the budget; the other 70 words are cut.
    words = QUERY_MAX_TOKENS - 2
    np.testing.assert_allclose(enc.embed_query("apple " * 100), enc.embed_query("apple " * words),
                               atol=1e-6)
    assert not np.allclose(enc.embed_query("apple " * 100), enc.embed_query("apple " * 10),
                           atol=1e-4)


def test_item_text_is_the_path_for_built_titles_and_title_plus_path_otherwise() -> None:
    items = pd.DataFrame({S.ITEM_COL: ["a", "b", "c"],
                          S.TITLE_COL: ["A > B, 12 OZ, Mfr 2", "Honeycrisp apples", "A > B"],
                          S.CATEGORY_COL: ["A > B", "PRODUCE > APPLES", "A > B"]})
    assert item_texts(items) == ["A > B", "Honeycrisp apples | PRODUCE > APPLES", "A > B"]
    # train_job.py --text-input auto: the GNN reads text when most items have titles of their own.
    assert own_title_share(items) == pytest.approx(1 / 3)
    assert own_title_share(items.iloc[1:2]) == 1.0 and own_title_share(items.iloc[:0]) == 0.0
    # the GNN's text input (train_job.py --text-input, bench/gpu_check.py --text-input)
    assert wants_text_input("auto", 0.5) and not wants_text_input("auto", 0.49)
    assert wants_text_input("on", 0.0) and not wants_text_input("off", 1.0)
    text = ItemText.build(items)
    assert len(text.texts) == 2 and text.item_row.tolist() == [0, 1, 0]
    np.testing.assert_allclose(np.linalg.norm(text.vectors, axis=1), 1.0, rtol=1e-5)
    again = ItemText.from_files(text.to_files(), 3)
    np.testing.assert_array_equal(again.vectors, text.vectors)
    # The query cache hands back the same vector, equal to a fresh encoding.
    enc = get_encoder()
    np.testing.assert_allclose(enc.embed_query("soda"), enc.encode(["soda"])[0], atol=1e-5)


def test_simulated_queries_are_seeded_category_words_never_ids() -> None:
    cat = title = "GROCERY > SOFT DRINKS > SOFT DRINKS 12/18&15PK CAN CAR"
    a = [simulate_query(cat, title, np.random.default_rng(s)) for s in range(20)]
    b = [simulate_query(cat, title, np.random.default_rng(s)) for s in range(20)]
    assert a == b
    for q in a:
        assert q is not None and q.startswith("soft") and len(q.split()) <= 3
    assert simulate_query("123 > 456", "123 > 456", np.random.default_rng(0)) is None


def test_catalogue_vectors_are_cached_per_list_of_texts(tmp_path: Path) -> None:
    """A retrain of the same catalogue loads its text vectors (the same bits) instead of
    embedding every text again; another list of texts, or a damaged entry, is embedded."""
    enc = TextEncoder(cache=tmp_path)
    calls: list[int] = []
    real_encode = enc.encode

    def counting_encode(texts: Sequence[str], **kw: Any) -> np.ndarray:
        calls.append(len(texts))
        return real_encode(texts, **kw)

    enc.encode = counting_encode  # type: ignore[method-assign]
    items = pd.DataFrame({S.ITEM_COL: ["a", "b", "c"],
                          S.TITLE_COL: ["Honeycrisp apples", "Green tea", "Oat milk"],
                          S.CATEGORY_COL: ["PRODUCE > APPLES", "DRINKS > TEA", "DAIRY > MILK"]})
    lines: list[str] = []
    first = ItemText.build(items, enc, progress=lines.append)
    second = ItemText.build(items, enc, progress=lines.append)
    assert calls == [3]
    assert second.vectors.tobytes() == first.vectors.tobytes()
    assert any("cache" in ln for ln in lines), lines
    # One title changed: another list, embedded again.
    changed = items.assign(**{S.TITLE_COL: ["Honeycrisp apples", "Black tea", "Oat milk"]})
    ItemText.build(changed, enc)
    assert calls == [3, 3]
    # A damaged entry is embedded again and replaced, never returned.
    for f in (tmp_path / "item-text").rglob("*.npy"):
        f.write_bytes(b"not an array")
    again = ItemText.build(items, enc)
    assert calls == [3, 3, 3]
    np.testing.assert_array_equal(again.vectors, first.vectors)
    # Without a cache folder nothing is kept.
    plain = TextEncoder(cache=None)
    vectors, from_cache = plain.encode_catalogue(["Green tea"])
    assert not from_cache and vectors.shape == (1, plain.dim)
