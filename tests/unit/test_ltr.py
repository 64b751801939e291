"""The learned ranker: LambdaRank fitting, ablations, exact contributions, persistence, and the
one recommend path on a real small artifact (built-in data slice; SVD embeddings; no Ray)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

from graph.artifacts import read_artifact
from graph.features import COMPONENT_OF, FEATURES
from graph.ltr import (
    ABLATIONS,
    CASCADE_KEEP,
    CASCADE_TREES,
    LearnedRanker,
    RankingData,
    fit_ranker,
)
from graph.ranking import ContextSignal, Ranker
from graph.recommend import Recommender, Request
from graph.retrieval import SOURCES

T0 = 1_512_000_000.0  # 2017-11-30: fixed, nothing depends on the day the test runs


def synthetic(seed: int, requests: int = 60, per: int = 30) -> tuple[RankingData, np.ndarray]:
    """Requests whose bought items are those with the largest ``cooc`` (plus noise)."""
    rng = np.random.default_rng(seed)
    n = requests * per
    x = rng.normal(size=(n, len(FEATURES))).astype(np.float32)
    x[:, FEATURES.index("department")] = rng.integers(0, 5, n)
    signal = x[:, FEATURES.index("cooc")] + 0.1 * rng.normal(size=n)
    y = np.zeros(n, dtype=np.float32)
    for r in range(requests):
        rows = np.arange(r * per, (r + 1) * per)
        y[rows[np.argsort(-signal[rows])[:3]]] = 1.0
    sources = rng.random((n, len(SOURCES))) < 0.5
    sources[:, SOURCES.index("popular")] = True
    return RankingData(x, y, np.full(requests, per)), sources


@pytest.fixture(scope="module")
def fitted() -> tuple[LearnedRanker, RankingData]:
    train, src = synthetic(0)
    valid, vsrc = synthetic(1, requests=20)
    return fit_ranker(train, valid, sources=src, valid_sources=vsrc, max_rounds=60), valid


def test_lambdarank_learns_the_predictive_feature(fitted: tuple[LearnedRanker, RankingData]) -> None:
    lr, valid = fitted
    assert lr.info["rounds"] > 0 and lr.info["valid_ndcg@20"] > 0.9
    scores = lr.score(valid.x)
    # Precision@3 over the validation requests: 0.1 by chance (3 bought of 30), 0.83 for this
    # fit; labels come from cooc plus noise, so a request's third and fourth items often swap.
    starts = np.concatenate([[0], np.cumsum(valid.group)])
    hits = [valid.y[lo:hi][np.argsort(-scores[lo:hi])[:3]].sum() / 3
            for lo, hi in itertools.pairwise(starts)]
    assert np.mean(hits) > 0.6
    gain = dict(zip(lr.features, lr.booster.feature_importance("gain"), strict=True))
    assert max(gain, key=gain.__getitem__) == "cooc"


def test_contributions_add_up_to_the_score(fitted: tuple[LearnedRanker, RankingData]) -> None:
    lr, valid = fitted
    rows = valid.x[:25].copy()
    rows[::3, FEATURES.index("cooc")] = np.nan  # missing values take LightGBM's default branch
    rows[1::4, :] = 0.0
    contrib = lr.contributions(rows)
    scores = lr.score(rows)
    assert len(contrib) == 25
    for c, s in zip(contrib, scores.tolist(), strict=True):
        assert set(c) <= {*COMPONENT_OF.values(), "base"}
        assert sum(c.values()) == pytest.approx(s, abs=1e-4)


def test_fitting_is_deterministic_and_round_trips(fitted: tuple[LearnedRanker, RankingData]) -> None:
    lr, valid = fitted
    train, src = synthetic(0)
    again = fit_ranker(train, synthetic(1, requests=20)[0], sources=src,
                       valid_sources=synthetic(1, requests=20)[1], max_rounds=60)
    np.testing.assert_array_equal(again.score(valid.x), lr.score(valid.x))
    back = LearnedRanker.from_files(lr.to_files())
    np.testing.assert_array_equal(back.score(valid.x), lr.score(valid.x))
    assert back.features == lr.features and back.info == lr.info


def test_the_ranker_is_refitted_on_every_request_with_the_early_stopped_rounds_scaled(
        fitted: tuple[LearnedRanker, RankingData], monkeypatch: pytest.MonkeyPatch) -> None:
    from graph import ltr

    lr, _ = fitted
    info = lr.info
    assert info["refit_on_all"] and 0 < info["early_stopped_rounds"] < 60
    # 60 training requests and 20 early-stopping ones: the rounds scaled by 80 / 60.
    assert info["requests"] == 60 and info["valid_requests"] == 20
    assert info["fitted_requests"] == 80 and info["fitted_rows"] == 80 * 30
    assert info["rounds"] == round(info["early_stopped_rounds"] * 80 / 60)
    assert lr.booster.current_iteration() == info["rounds"]
    # Without the refit the model is the early-stopped one, with as many trees as it chose.
    monkeypatch.setattr(ltr, "REFIT_ON_ALL", False)
    train, src = synthetic(0)
    valid, vsrc = synthetic(1, requests=20)
    stopped = fit_ranker(train, valid, sources=src, valid_sources=vsrc, max_rounds=60)
    assert not stopped.info["refit_on_all"]
    assert stopped.info["fitted_requests"] == 60 and stopped.info["fitted_rows"] == 60 * 30
    assert stopped.info["rounds"] == stopped.info["early_stopped_rounds"] == info["early_stopped_rounds"]
    assert stopped.booster.current_iteration() == stopped.info["rounds"]
    assert not np.array_equal(stopped.score(valid.x), lr.score(valid.x))


@pytest.mark.parametrize("ablation", [a for a in ABLATIONS if a != "full"])
def test_an_ablation_drops_its_features_and_sources(ablation: str) -> None:
    train, src = synthetic(0)
    valid, vsrc = synthetic(1, requests=20)
    lr = fit_ranker(train, valid, ablation=ablation, sources=src, valid_sources=vsrc,
                    max_rounds=10)
    dropped_f, dropped_s = ABLATIONS[ablation]
    assert not set(lr.features) & set(dropped_f) and len(lr.features) == len(FEATURES) - len(
        dropped_f)
    keep = lr.keep_candidates(src)
    assert keep is not None
    only_dropped = ~src[:, [SOURCES.index(s) for s in SOURCES if s not in dropped_s]].any(axis=1)
    np.testing.assert_array_equal(keep, ~only_dropped)
    # The dropped columns cannot move its score.
    x = valid.x.copy()
    x[:, [FEATURES.index(f) for f in dropped_f]] = 123.0
    np.testing.assert_array_equal(lr.score(x), lr.score(valid.x))


@pytest.fixture(scope="module")
def rec(svd_artifact_root: str) -> Recommender:
    art = read_artifact(svd_artifact_root)
    return Recommender.build(art.items, Ranker(art.user_emb, art.item_emb, art.signals),
                             art.item_static, art.learned, text=art.text)


def test_recommend_is_prepare_then_rank_with_exact_contributions(rec: Recommender) -> None:
    sig = rec.ranker.signals
    user = int(np.argmax(np.diff(sig.hist_indptr)))
    item = int(rec.catalogue.popular[0])
    req = Request(user=user, item_events=((item, "add_to_cart", T0),),
                  context=ContextSignal(5, 10), now=T0 + 60, k=10)
    out = rec.recommend(req)
    assert len(out.items) == 10 and item not in out.items.tolist()  # the cart is excluded
    assert list(out.scores) == sorted(out.scores, reverse=True)
    p = rec.prepare(req)
    again = rec.rank(p, explain=True)
    np.testing.assert_array_equal(again.items, out.items)
    # Scores are the ranker's on the candidates' feature rows; contributions add up to them.
    pos = np.searchsorted(p.candidates.items, out.items)
    np.testing.assert_allclose(rec.learned.score(p.x[pos]), out.scores, rtol=1e-6)
    for c, s in zip(out.contributions, out.scores.tolist(), strict=True):
        assert sum(c.values()) == pytest.approx(s, abs=1e-4)
    # Every returned item is a candidate, and candidates are a small slice of the catalogue.
    assert np.isin(out.items, p.candidates.items).all()
    assert len(p.candidates) < rec.catalogue.num_items // 10


def test_an_explicit_query_keeps_search_hits_only(rec: Recommender) -> None:
    out = rec.recommend(Request(query="cereals", now=T0, k=10))
    assert len(out.items) == 10
    # Every item is a hit of the hybrid search; the stemmer matches "cereals" to CEREAL.
    assert (rec.search_scores("cereals").fused_of(out.items) > 0).all()
    cats = [str(c) for c in rec.catalogue.categories[out.items]]
    assert sum("CEREAL" in c for c in cats) >= 8, cats
    # Nothing matches a word: the nearest texts still answer, and a query never empties it.
    assert len(rec.recommend(Request(query="zzzqqq", now=T0, k=5)).items) == 5


def test_a_query_finds_a_category_it_shares_no_word_with(rec: Recommender) -> None:
    # No title or category path of the built-in data holds "cola": only text vectors find them.
    qs = rec.search_scores("cola")
    assert qs is not None and qs.lexical.max() == 0
    out = rec.recommend(Request(query="cola", now=T0, k=20))
    cats = [str(c) for c in rec.catalogue.categories[out.items]]
    assert sum(c.startswith("GROCERY > SOFT DRINKS") for c in cats) >= 2, cats
    # The session's latest search adds its hits as candidates too.
    p = rec.prepare(Request(session_query="cola", now=T0, k=20))
    src = p.candidates.sources[:, SOURCES.index("query")]
    soft = np.char.startswith(rec.catalogue.categories[p.candidates.items].astype(str),
                              "GROCERY > SOFT DRINKS")
    assert (src & soft).sum() >= 5


def test_the_cascade_gives_kept_rows_the_whole_models_score(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from graph import ltr

    monkeypatch.setattr(ltr, "CASCADE", ((CASCADE_TREES, CASCADE_KEEP),))  # one early exit
    train, src = synthetic(0)
    valid, _ = synthetic(1, requests=20)
    none = RankingData(valid.x[:0], valid.y[:0], valid.group[:0])  # no early stopping
    lr = fit_ranker(train, none, sources=src, max_rounds=4 * (CASCADE_TREES + 20))
    assert lr.booster.num_trees() > CASCADE_TREES
    x = valid.x[:600]
    full = lr.score(x)
    group = [250, 320, 30]  # two requests longer than the cascade keeps, one shorter
    out = lr.score(x, group=group, keep=[20, 150, 20])
    ends = np.cumsum(group)
    for (lo, hi), m in zip(zip(ends - group, ends, strict=True), (CASCADE_KEEP, 150, 30),
                           strict=True):
        kept = np.isfinite(out[lo:hi])
        assert kept.sum() == m
        np.testing.assert_allclose(out[lo:hi][kept], full[lo:hi][kept], rtol=1e-5, atol=1e-6)
        # the kept rows are the best by the first trees' score
        first = lr.booster.predict(x[lo:hi][:, lr._cols], num_iteration=CASCADE_TREES)
        assert first[kept].min() >= first[~kept].max() if (~kept).any() else True
    # The leaves the cascade reached explain its kept rows exactly as a fresh traversal does,
    # and the contributions add up to the score.
    cas = lr.cascade(x, group=group, keep=[20, 150, 20])
    np.testing.assert_array_equal(cas.rows, np.flatnonzero(np.isfinite(out)))
    assert cas.leaves.shape == (len(cas.rows), lr.booster.num_trees())
    ours = lr.contributions_of(cas.leaves)
    assert ours == lr.contributions(x[cas.rows])
    np.testing.assert_allclose([sum(c.values()) for c in ours], out[cas.rows], rtol=1e-5,
                               atol=1e-5)


def test_a_three_stage_cascade_keeps_each_stages_best(monkeypatch: pytest.MonkeyPatch) -> None:
    from graph import ltr

    train, src = synthetic(0)
    valid, _ = synthetic(1, requests=20)
    none = RankingData(valid.x[:0], valid.y[:0], valid.group[:0])
    lr = fit_ranker(train, none, sources=src, max_rounds=160)
    assert lr.booster.num_trees() > 20
    monkeypatch.setattr(ltr, "CASCADE", ((10, 100), (20, 50)))
    x = valid.x[:600]
    group = [250, 320, 30]
    cas = lr.cascade(x, group=group, keep=[20, 80, 20])
    full = lr.score(x)
    ends = np.cumsum(group)
    xs = x[:, lr._cols]
    for (lo, hi), m1, m2 in zip(zip(ends - group, ends, strict=True), (100, 100, 30), (50, 80, 30),
                                strict=True):
        kept = np.isfinite(cas.scores[lo:hi])
        assert kept.sum() == m2
        np.testing.assert_allclose(cas.scores[lo:hi][kept], full[lo:hi][kept], rtol=1e-5,
                                   atol=1e-6)
        # Stage one kept the best m1 by 10 trees; stage two the best m2 of those by 20.
        s10 = lr.booster.predict(xs[lo:hi], num_iteration=10)
        in1 = np.zeros(hi - lo, bool)
        in1[np.argsort(-s10)[:m1]] = True
        assert kept[~in1].sum() == 0
        s20 = lr.booster.predict(xs[lo:hi], num_iteration=20)
        assert s20[kept].min() >= s20[in1 & ~kept].max() if (in1 & ~kept).any() else True
    assert lr.contributions_of(cas.leaves) == lr.contributions(x[cas.rows])


def test_an_older_versions_item_features_are_padded_and_a_newer_ones_refused(
    svd_artifact_root: str, tmp_path: Path
) -> None:
    from graph.artifacts import ITEM_FEATURES_FILE, RANKER_DIR, latest_version
    from graph.errors import ArtifactError
    from graph.features import ITEM_FEATURES

    root = tmp_path / "models"
    shutil.copytree(svd_artifact_root, root)
    path = root / latest_version(str(root)) / RANKER_DIR / ITEM_FEATURES_FILE
    full = np.load(path)
    np.save(path, full[:, :5])  # the five columns of the release before new_buyers/new_share
    art = read_artifact(str(root))
    assert art.item_static.shape == (len(art.items), len(ITEM_FEATURES))
    np.testing.assert_array_equal(art.item_static[:, :5], full[:, :5])
    assert np.isnan(art.item_static[:, 5:]).all()
    np.save(path, np.concatenate([full, full[:, :1]], axis=1))
    with pytest.raises(ArtifactError, match="newer release"):
        read_artifact(str(root))


def test_ranker_steps_bench_finds_the_same_answers_on_a_real_artifact(
        svd_artifact_root: str) -> None:
    # bench/ranker_steps.py checks, request by request, that each rewritten step (the compiled
    # tree walk, the candidate-only buy-again and basket components) answers exactly as the code
    # it replaced, before it times them; it raises on the first difference.
    from bench.ranker_steps import measure

    res = measure(svd_artifact_root, requests=25, passes=1)
    assert res["requests"] == 25 and res["candidates"] > 0
    assert [r["step"] for r in res["rows"]] == [
        "tree walk (3 cascade stages)", "buy-again component", "basket component"]
    assert all(len(r["before_us"]) == len(r["after_us"]) == 3 for r in res["rows"])
    # the compared components were not all zero on these shoppers
    assert res["rows"][1]["nonzero_values"] > 0 and res["rows"][2]["nonzero_values"] > 0
