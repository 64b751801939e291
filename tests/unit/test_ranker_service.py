"""RankerService on a real small artifact (built-in data slice; SVD embeddings; no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.explain import Reasons, cadence_text, day_part, short_title
from actors.loaded_model import AnswerCache
from actors.ranker import RankerService, RankQuery
from graph import retrieval
from graph.artifacts import latest_version, list_versions, read_artifact, write_artifact
from graph.errors import ArtifactError, BadRequestError, NotFoundError
from graph.recommend import Request
from graph.retrieval import SOURCES, candidates, exclusions
from tests.helpers import artifact_parts

# Event times are fixed: nothing here may depend on the day the test runs.
T0 = 1_512_000_000.0  # 2017-11-30


@pytest.fixture(scope="module")
def svc(svd_artifact_root: str) -> RankerService:
    return RankerService(svd_artifact_root)


def _cat_of(svc: RankerService, item_id: str) -> str:
    m = svc.model
    return str(m.intent_labels[m.item_index[item_id]])


def _busy_item(svc: RankerService) -> str:
    """A popular item with many co-occurrence neighbours (a realistic thing to put in a cart)."""
    sim = svc.model.ranker.signals.item_sim
    degree = np.diff(sim.indptr)
    for i in svc.model.catalogue.popular.tolist():
        if degree[i] >= 20:
            return str(svc.model.catalogue.item_ids[i])
    raise AssertionError("no popular item with co-occurrence neighbours")


def _repeat_user_item(svc: RankerService) -> tuple[str, str]:
    sig = svc.model.ranker.signals
    users = {v: k for k, v in svc.model.user_index.items()}
    best = int(np.argmax(sig.hist_count))
    user = int(np.searchsorted(sig.hist_indptr, best, side="right") - 1)
    return users[user], str(svc.model.catalogue.item_ids[int(sig.hist_indices[best])])


def _check_items(out: dict[str, Any], k: int) -> None:
    items = out["items"]
    assert 0 < len(items) <= k
    ids = [it["item_id"] for it in items]
    assert len(set(ids)) == len(ids)
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
    for it in items:
        assert it["title"] and it["category"] and it["reasons"]
        assert it["price"] is None or it["price"] >= 0


def test_missing_model_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"python train_job\.py"):
        RankerService(str(tmp_path / "nothing-here"))


def test_known_user(svc: RankerService) -> None:
    user = next(iter(svc.model.user_index))
    out = svc.recommend(RankQuery(user_id=user, k=10))
    _check_items(out, 10)
    assert out["user_known"] and out["model_version"] == svc.model.version
    assert out["session_events"] == 0 and out["intent"] == []


def test_unknown_user_gets_popular_items_never_an_error(svc: RankerService) -> None:
    out = svc.recommend(RankQuery(user_id="no-such-user", k=20))
    _check_items(out, 20)
    assert not out["user_known"]
    cat = svc.model.catalogue
    got = {it["item_id"] for it in out["items"]}
    # Without a history the answer leans on popularity (the learned ranker still reorders by
    # context): most of it is among the 200 most popular of ~92k items (chance: 0.04 items).
    popular = set(cat.item_ids[cat.popular[:200]].tolist())
    assert len(popular & got) >= 15


def test_non_personal_answers_are_ranked_once_per_model_version(svc: RankerService) -> None:
    m = svc.model
    m.answers = AnswerCache()
    seen: list[str] = []  # what the replica's metric is told
    svc.on_answer = seen.append
    ctx = {"weekday": 2, "hour": 9, "is_holiday": False}
    first = svc.recommend(RankQuery(user_id="nobody-1", context=ctx, k=10, now=T0))
    # Another anonymous shopper in the same hour, asked at another time: the same answer, kept.
    again = svc.recommend(RankQuery(session_id="s-empty", context=ctx, k=10, now=T0 + 3e6))
    assert again is first and (m.answers.hits, m.answers.misses, len(m.answers)) == (1, 1, 1)
    assert seen == ["ranked", "kept"]
    # A device or region the model learned no lift for (this one learned none) ranks as none.
    assert svc.recommend(RankQuery(context={**ctx, "device": "tablet", "region": "TX"},
                                   k=10)) is first
    assert seen == ["ranked", "kept", "kept"]
    del seen[2:]  # what follows counts as it did before that request
    # ... and what ranking it afresh gives, bit for bit.
    m.answers = AnswerCache()
    fresh = svc.recommend(RankQuery(user_id=None, context=ctx, k=10, now=T0 - 5e6))
    assert fresh is not first and fresh == first
    # The context signal, k and the category each name another answer.
    assert svc.recommend(RankQuery(context={**ctx, "hour": 20}, k=10)) != first
    assert len(svc.recommend(RankQuery(context=ctx, k=3))["items"]) == 3
    assert len(m.answers) == 3
    # Anything personal is ranked every time and never kept.
    item = _busy_item(svc)
    user = next(iter(m.user_index))
    for q in (RankQuery(user_id=user, context=ctx, k=10),
              RankQuery(events=((item, "view", T0, None),), context=ctx, k=10, now=T0),
              RankQuery(context=ctx, k=10, query="milk"),
              RankQuery(context=ctx, k=10, exclude_items=(first["items"][0]["item_id"],))):
        out = svc.recommend(q)
        assert out is not first and out != first
    assert len(m.answers) == 3
    # Each answer with nothing personal was counted once; the personal ones not at all.
    assert seen == ["ranked", "kept", "ranked", "ranked", "ranked"]
    svc.on_answer = None


def test_answer_cache_drops_the_least_recently_used() -> None:
    cache = AnswerCache(capacity=2)
    a, b, c = {"n": 1}, {"n": 2}, {"n": 3}
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # now the most recently used
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    assert len(cache) == 2 and (cache.hits, cache.misses) == (3, 1)


def test_candidates_are_a_small_slice_of_the_catalogue(svc: RankerService) -> None:
    m = svc.model
    user = m.user_index[next(iter(m.user_index))]
    cand = candidates(m.ranker, m.catalogue, user=user, session=None, item_events=[], context=None)
    assert 0 < len(cand) < m.num_items // 10
    assert cand.sources.any(axis=1).all()  # every candidate says where it came from
    assert cand.sources[:, SOURCES.index("buy_again")].any()  # the user's repertoire
    assert not cand.sources[:, SOURCES.index("ann_sess")].any()  # no session


def test_ease_items_are_candidates_with_their_scores_as_a_feature(svc: RankerService) -> None:
    from graph.features import FEATURES, FeatureRequest, build_features

    m = svc.model
    sig = m.ranker.signals
    user = next(u for u in sorted(m.user_index.values()) if len(sig.ease_of(u)[0]) >= 5)
    idx, score = sig.ease_of(user)
    cand = candidates(m.ranker, m.catalogue, user=user, session=None, item_events=[], context=None)
    flagged = cand.items[cand.sources[:, SOURCES.index("ease")]]
    best = idx[np.argsort(-score, kind="stable")[:retrieval.EASE_K]]
    np.testing.assert_array_equal(np.sort(flagged), np.sort(best))
    x = build_features(m.ranker, m.catalogue, m.rec.item_static,
                       FeatureRequest(user, None, None, 0.0), cand, m.rec.item_unit)
    col = x[:, FEATURES.index("ease")]
    pos = np.searchsorted(idx, cand.items)
    inside = (pos < len(idx)) & (idx[np.minimum(pos, len(idx) - 1)] == cand.items)
    np.testing.assert_allclose(col[inside], score[pos[inside]])
    assert (col[~inside] == 0).all()  # outside the shopper's EASE items: no evidence


def test_excluded_items_are_replaced_from_deeper_in_each_source(svc: RankerService) -> None:
    """A discovery request excludes the shopper's past purchases: each source refills its quota
    from further down its list instead of proposing fewer items."""
    m = svc.model
    sig = m.ranker.signals
    by_history = sorted(m.user_index.values(),
                        key=lambda u: (sig.hist_indptr[u + 1] - sig.hist_indptr[u], u))
    user = by_history[len(by_history) // 2]  # a typical history
    plain = candidates(m.ranker, m.catalogue, user=user, session=None, item_events=[],
                       context=None)
    # Exclude what the unfiltered popular and GNN-neighbour sources proposed, and the history.
    history = sig.hist_indices[sig.hist_indptr[user]: sig.hist_indptr[user + 1]]
    src = plain.sources
    banned = np.union1d(history, plain.items[src[:, SOURCES.index("popular")]
                                             | src[:, SOURCES.index("ann_user")]])
    cand = candidates(m.ranker, m.catalogue, user=user, session=None, item_events=[],
                      context=None, exclude=banned)
    assert not np.isin(cand.items, banned).any()
    for source, quota in (("popular", retrieval.POPULAR_K), ("ann_user", retrieval.ANN_K)):
        got = cand.sources[:, SOURCES.index(source)].sum()
        assert got == quota, f"{source}: {got} candidates after exclusions, quota {quota}"
    # Without exclusions nothing changes: the same items, the cached neighbours reused.
    again = candidates(m.ranker, m.catalogue, user=user, session=None, item_events=[],
                       context=None)
    np.testing.assert_array_equal(again.items, plain.items)


def test_session_event_changes_the_next_answer_with_a_reason(svc: RankerService) -> None:
    item = _busy_item(svc)
    cat = _cat_of(svc, item)
    before = svc.recommend(RankQuery(user_id="anon", k=20))
    events = (("unknown-sku-1", "view", T0, None), (item, "add_to_cart", T0, None))
    after = svc.recommend(RankQuery(user_id="anon", k=20, events=events))

    assert after["session_events"] == 2  # the unknown item is kept, not an error
    assert before["intent"] == [] and after["intent"][0]["category"] == cat
    assert [it["item_id"] for it in after["items"]] != [it["item_id"] for it in before["items"]]
    assert item not in {it["item_id"] for it in after["items"]}  # it is in the cart
    reasons = [r for it in after["items"] for r in it["reasons"]]
    assert any(r.startswith("because you added") and r.endswith("to your cart") for r in reasons)
    # The carted category is scored (candidates), whatever the fused score then makes of it.
    m = svc.model
    from graph.ranking import session_signal

    session_items = [(m.item_index[item], "add_to_cart", T0)]
    cand = candidates(m.ranker, m.catalogue, user=None, item_events=session_items, context=None,
                      session=session_signal(session_items, T0))
    assert sum(m.intent_labels[c] == cat for c in cand.items.tolist()) >= 5


def test_removed_from_cart_is_recommendable_again(svc: RankerService) -> None:
    item = _busy_item(svc)
    now = T0
    events = ((item, "add_to_cart", now - 5, None), (item, "remove_from_cart", now, None))
    assert exclusions(None, [(svc.model.item_index[item], e, t) for _, e, t, _ in events]).size == 0


def test_exclusions_and_category_filter(svc: RankerService) -> None:
    first = svc.recommend(RankQuery(user_id="anon", k=5))
    banned = (*(it["item_id"] for it in first["items"][:3]), "not-an-item")
    out = svc.recommend(RankQuery(user_id="anon", k=20, exclude_items=banned))
    assert not set(banned) & {it["item_id"] for it in out["items"]}

    out = svc.recommend(RankQuery(user_id="anon", k=15, category="produce > "))
    _check_items(out, 15)
    assert all(it["category"].lower().startswith("produce > ") for it in out["items"])
    assert svc.recommend(RankQuery(user_id="anon", category="NO SUCH DEPT"))["items"] == []


def test_search_text_is_blended_in(svc: RankerService) -> None:
    out = svc.recommend(RankQuery(user_id="anon", k=10, query="kids cereal"))
    _check_items(out, 10)
    hits = [it for it in out["items"] if "KIDS CEREAL" in it["title"]]
    assert len(hits) >= 5
    assert any("matches your search “kids cereal”" in r for it in hits for r in it["reasons"])
    # A search inside the session counts too (weaker than an explicit query).
    ev = ((None, "search", T0, "kids cereal"),)
    plain = svc.recommend(RankQuery(user_id="anon", k=20))
    sess = svc.recommend(RankQuery(user_id="anon", k=20, events=ev))

    def n_hits(out: dict[str, Any]) -> int:
        return sum("KIDS CEREAL" in it["title"] for it in out["items"])

    assert n_hits(sess) > n_hits(plain)


def test_context_moves_the_ranking(svc: RankerService) -> None:
    m = svc.model
    lift = m.ranker.signals.context_lift  # [7, 24, D], estimated from the training data
    # The (weekday, hour) cell where the departments differ most.
    spread = lift.max(axis=2) - lift.min(axis=2)
    wd, hr = np.unravel_index(int(np.argmax(spread)), spread.shape)
    ctx = {"weekday": int(wd), "hour": int(hr), "is_holiday": False}
    plain = svc.recommend(RankQuery(user_id="anon", k=20))
    timed = svc.recommend(RankQuery(user_id="anon", k=20, context=ctx))

    # The context's favoured departments are a candidate source and the lift a feature; how
    # much they move the order is the learned ranker's call (the ablation row measures it).
    assert [it["item_id"] for it in plain["items"]] != [it["item_id"] for it in timed["items"]]
    assert {"context", "hour", "weekday"} <= set(m.rec.learned.features)


def test_a_device_lift_moves_the_ranking_and_the_model_names_it(svc: RankerService) -> None:
    # The fixture's data has no device column; give its signals a device table as a model
    # trained on such data would have (graph.signals.attribute_lifts), then restore them.
    sig = svc.model.ranker.signals
    assert svc.model_info()["context_columns"] == {}
    row = np.random.default_rng(0).permutation(
        np.linspace(-2.0, 2.0, len(sig.department_names))).astype(np.float32)
    ctx = {"weekday": 2, "hour": 12, "is_holiday": False}
    try:
        sig.attribute_lift = {"device": {"kiosk": row}}
        plain = svc.recommend(RankQuery(user_id="anon", k=20, context=ctx))
        kiosk = svc.recommend(RankQuery(user_id="anon", k=20, context={**ctx, "device": "Kiosk"}))
        other = svc.recommend(RankQuery(user_id="anon", k=20, context={**ctx, "device": "tv"}))
        assert svc.model_info()["context_columns"] == {"device": 1}
    finally:
        sig.attribute_lift = {}
    ids = [[it["item_id"] for it in out["items"]] for out in (plain, kiosk, other)]
    assert ids[1] != ids[0]  # the device's lift reached the candidates and the context feature
    assert ids[2] == ids[0]  # a device the training events never had changes nothing


def test_reason_texts(svc: RankerService) -> None:
    from graph.ranking import ContextSignal, session_signal

    m = svc.model
    top = np.array([0])

    def why(**kw: Any) -> Reasons:
        args: dict[str, Any] = {"user": None, "session": None, "item_events": [],
                                "context": None, "query": None, "top": top, **kw}
        return Reasons.build(m, **args)

    assert why(context=ContextSignal(weekday=5, hour=9)).text("context", 0) == (
        "popular on Saturday mornings")
    hol = ContextSignal(weekday=0, hour=9, is_holiday=True)
    assert why(context=hol).text("context", 0) == "popular on public holidays"
    user_id, item = _repeat_user_item(svc)
    text = why(user=m.user_index[user_id]).text("repeat", m.item_index[item])
    assert text is not None and text.startswith("you ")
    # Repeat wording only for what the shopper bought; exploring wording only for the rest.
    sig = m.ranker.signals
    u = m.user_index[user_id]
    bought = set(sig.hist_indices[sig.hist_indptr[u]:sig.hist_indptr[u + 1]].tolist())
    never = next(i for i in range(len(m.titles)) if i not in bought)
    assert why(user=u).text("repeat", never) is None
    assert why(user=u).text("explore", m.item_index[item]) is None
    assert why(user=u).text("explore", never) == "something new to try: you often pick new items"
    # "because you ..." names the session item behind the recommendation, with its event.
    src = _busy_item(svc)
    i = m.item_index[src]
    sim = m.ranker.signals.item_sim
    neighbour = int(sim.indices[sim.indptr[i]])
    events = [(i, "view", T0), (i, "purchase", T0)]
    reasons = why(session=session_signal(events, T0), item_events=events,
                  top=np.array([neighbour]))
    assert reasons.text("cooc", neighbour) == f"because you bought {short_title(str(m.titles[i]))}"
    assert reasons.for_item(neighbour, {"cooc": 1.0, "pop": 0.01}) == [reasons.text("cooc", neighbour)]
    assert why().for_item(0, {"gnn": -1.0}) == ["popular with shoppers"]
    # The session's category (intent) and product line name the category, only with a session.
    cat = short_title(str(m.intent_labels[neighbour]))
    assert reasons.text("intent", neighbour) == f"because you are shopping for {cat}"
    assert reasons.text("line", neighbour) == f"more {cat} from the brand you picked"
    assert why().text("intent", neighbour) is None


def test_similar_items(svc: RankerService) -> None:
    item = _busy_item(svc)
    out = svc.similar(item, 10)
    _check_items(out, 10)
    assert item not in {it["item_id"] for it in out["items"]}
    assert any(r.startswith("often bought together with") for it in out["items"]
               for r in it["reasons"])
    with pytest.raises(NotFoundError) as info:
        svc.similar("no-such-item", 10)
    assert info.value.field == "item_id" and info.value.http_status == 404
    # Ranked once per model version and item: asked again, the kept answer; afresh, the same.
    assert svc.similar(item, 10) is out
    svc.model.answers = AnswerCache()
    fresh = svc.similar(item, 10)
    assert fresh is not out and fresh == out and len(svc.similar(item, 3)["items"]) == 3


def test_forget_user_is_persistent_across_replicas(svc: RankerService, tmp_path: Path,
                                                   svd_artifact_root: str) -> None:
    path = str(tmp_path / "forgotten.txt")
    a = RankerService.__new__(RankerService)
    a.__dict__.update(svc.__dict__)
    from actors.tombstones import Tombstones

    a.tombstones = Tombstones(path)
    b = RankerService.__new__(RankerService)
    b.__dict__.update(svc.__dict__)
    b.tombstones = Tombstones(path)
    user = list(svc.model.user_index)[1]
    assert b.recommend(RankQuery(user_id=user))["user_known"]
    a.forget_user(user)
    assert not a.recommend(RankQuery(user_id=user))["user_known"]
    assert not b.recommend(RankQuery(user_id=user))["user_known"]  # another replica
    assert user in Tombstones(path)  # a restarted one


def test_reload_swaps_atomically_and_rolls_back(svd_artifact_root: str, tmp_path: Path) -> None:
    root = str(tmp_path / "models")
    art = read_artifact(svd_artifact_root)
    common = artifact_parts(art)
    del common["item_emb"]
    write_artifact(root, item_emb=art.item_emb, version="v1", **common)
    svc = RankerService(root)
    old = svc.model
    assert old.version == "v1"
    assert svc.maybe_pick_up_latest() is None  # nothing new

    write_artifact(root, item_emb=art.item_emb * 0.5, version="v2", **common)
    res = svc.maybe_pick_up_latest()
    assert res == {"previous_version": "v1", "version": "v2", "swapped": True}
    assert svc.model is not old and svc.model.version == "v2"
    # A new version never answers from the old one's kept answers.
    assert svc.model.answers is not old.answers and len(svc.model.answers) == 0
    # A request that started on the old model still completes on it.
    assert len(old.rec.recommend(Request(k=5)).items) == 5

    res = svc.reload("v1")  # rollback: LATEST moves too, so auto pickup does not undo it
    assert res["version"] == "v1" and latest_version(root) == "v1"
    assert svc.maybe_pick_up_latest() is None
    with pytest.raises(NotFoundError):
        svc.reload("v9")
    assert svc.model.version == "v1" and list_versions(root) == ["v1", "v2"]


def test_text_helpers() -> None:
    assert short_title("GROCERY > COLD CEREAL > KIDS CEREAL, 12 OZ") == "KIDS CEREAL, 12 OZ"
    assert [day_part(h) for h in (6, 13, 19, 23)] == ["mornings", "afternoons", "evenings", "nights"]
    day = 86400.0
    assert cadence_text(5, 0.0, 4 * 7 * day) == "you buy this every week"
    assert cadence_text(3, 0.0, 60 * day) == "you buy this every month"
    assert cadence_text(1, 0.0, 0.0) == "you bought this before"


def test_a_broken_version_is_refused_and_latest_stays(svd_artifact_root: str,
                                                      tmp_path: Path) -> None:
    """A rollout validates first: a version that cannot load never becomes LATEST or serves."""
    from graph.artifacts import filesystem, set_latest_version

    root = str(tmp_path / "models")
    art = read_artifact(svd_artifact_root)
    common = artifact_parts(art)
    write_artifact(root, version="v1", **common)
    write_artifact(root, version="broken", set_latest=False, **common)
    fs, base = filesystem(root)
    with fs.open_output_stream(f"{base}/broken/item_emb.npy") as f:
        f.write(b"not a numpy file")
    svc = RankerService(root)
    with pytest.raises(BadRequestError) as err:
        svc.reload("broken")
    assert err.value.field == "version" and "still serving v1" in err.value.message
    assert latest_version(root) == "v1" and svc.model.version == "v1"
    # LATEST moved by hand to the refused version: polling does not load it again.
    set_latest_version(root, "broken")
    assert svc.maybe_pick_up_latest() is None and svc.model.version == "v1"
    fresh = RankerService(root, "v1")
    fresh.model_version = "latest"  # follows LATEST from now on: polling tries it once
    with pytest.raises(BadRequestError):
        fresh.maybe_pick_up_latest()
    assert fresh.maybe_pick_up_latest() is None and fresh.model.version == "v1"


def test_a_rollout_config_moves_pinned_and_following_services(svd_artifact_root: str,
                                                              tmp_path: Path) -> None:
    root = str(tmp_path / "models")
    art = read_artifact(svd_artifact_root)
    common = artifact_parts(art)
    for v in ("v1", "v2", "v3"):
        write_artifact(root, version=v, **common)
    pinned = RankerService(root, "v1")
    assert pinned.prepare("v2") == "v2" and pinned.model.version == "v1"  # validated, not served
    assert pinned.apply_rollout({"version": "v2"})["version"] == "v2"
    assert pinned.model_version == "v2" and pinned.maybe_pick_up_latest() is None
    # A service following LATEST goes where LATEST points (the rollout moved it before pushing),
    # not back to an older version named in a stale config.
    following = RankerService(root)
    assert following.model.version == "v3"
    assert following.apply_rollout({"version": "v2"})["swapped"] is False
    with pytest.raises(BadRequestError):
        following.apply_rollout({"versions": "v2"})


def test_first_boot_answers_without_a_model_then_picks_up_the_first(svd_artifact_root: str,
                                                                     tmp_path: Path) -> None:
    from actors.ranker import NO_MODEL
    from graph.errors import UnavailableError

    root = str(tmp_path / "empty-bucket" / "artifacts")
    svc = RankerService(root, cold_start=True)
    out = svc.recommend(RankQuery(user_id="u1", events=(("sku", "view", T0, None),), k=5))
    assert out == {"model_version": NO_MODEL, "user_known": False, "session_events": 1,
                   "intent": [], "items": []}
    assert svc.model_info()["version"] == NO_MODEL and svc.model_info()["num_items"] == 0
    with pytest.raises(UnavailableError, match="train_job"):
        svc.similar("sku")
    assert svc.maybe_pick_up_latest() is None  # still nothing published
    art = read_artifact(svd_artifact_root)
    write_artifact(root, user_ids=art.user_ids, items=art.items, user_emb=art.user_emb,
                   item_emb=art.item_emb, signals=art.signals, metrics={}, manifest={},
                   learned=art.learned, item_static=art.item_static, text=art.text,
                   version="first")
    assert svc.maybe_pick_up_latest() == {"previous_version": NO_MODEL, "version": "first",
                                          "swapped": True}
    assert svc.recommend(RankQuery(k=5))["items"]
    with pytest.raises(ArtifactError):  # without cold start (a pinned or direct use): an error
        RankerService(str(tmp_path / "other"))


def test_the_ranker_answers_a_coalesced_batch_in_order_and_fails_only_the_failing_request(
    svc: RankerService,
) -> None:
    """``GNNRanker.recommend_many`` (the ingress's coalesced calls): each query gets the answer
    ``recommend`` gives it alone, in order; a query that raises gets its error in its place."""
    import asyncio
    from types import SimpleNamespace

    from actors.ranker import GNNRanker

    class _Service:
        def recommend(self, q: RankQuery) -> dict[str, Any]:
            if q.user_id == "refused":
                raise BadRequestError("refused for the test", field="user_id")
            if q.user_id == "bug":
                raise RuntimeError("a bug in ranking one request")
            return svc.recommend(q)

    observed: list[float] = []
    cls = next(c for c in GNNRanker.func_or_class.__mro__ if "recommend_many" in vars(c))
    replica = object.__new__(cls)
    replica.service = _Service()
    replica._metrics = SimpleNamespace(latency=SimpleNamespace(observe=observed.append))
    item = _busy_item(svc)
    queries = [RankQuery(session_id="a", events=((item, "view", T0, None),), now=T0, k=5),
               RankQuery(user_id="refused", now=T0),
               RankQuery(k=3, now=T0),
               RankQuery(user_id="bug", now=T0),
               RankQuery(query="milk", k=4, now=T0)]
    out = asyncio.run(replica.recommend_many(queries))
    assert len(out) == 5 and len(observed) == 5  # every request's own latency
    for n in (0, 2, 4):
        assert out[n] == svc.recommend(queries[n])
    assert [len(out[n]["items"]) for n in (0, 2, 4)] == [5, 3, 4]
    assert isinstance(out[1], BadRequestError) and out[1].field == "user_id"
    assert isinstance(out[3], RuntimeError)
