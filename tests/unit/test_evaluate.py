"""The evaluation protocol on a tiny synthetic data set whose answers are known."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from graph import schema as S
from graph.data import temporal_split
from graph.evaluate import (
    PUBLISHED,
    IndexMap,
    buy_again_scores,
    evaluate,
    evaluate_version,
    format_ablations,
    format_anonymous,
    format_candidates,
    format_contributions,
    format_segments,
    format_table,
    format_uncertainty,
    itemknn_scores,
    lead_shortfalls,
    popularity_scores,
    recall_uncertainty,
    recommender_rankings,
    regression_shortfalls,
    run_queries,
    validation_tasks,
)
from graph.features import item_features
from graph.interactions import Interactions, build_interactions
from graph.ranker_fit import fit_on_validation
from graph.ranking import Ranker
from graph.recommend import Recommender, Request
from graph.retrieval import SOURCES
from graph.search_eval import BASELINES, format_search
from graph.signals import RankingSignals, fit_signals
from graph.tasks import QueryBatch, in_session_tasks, next_basket_tasks, search_task
from graph.text import ItemText

CUT = pd.Timestamp("2017-03-01")
NUM_ITEMS = 60


def items() -> pd.DataFrame:
    cats = [f"DEPT{n % 3} > CAT{n % 4} > SUB{n}" for n in range(NUM_ITEMS)]
    return pd.DataFrame({
        S.ITEM_COL: [f"i{n}" for n in range(NUM_ITEMS)], S.TITLE_COL: cats, S.CATEGORY_COL: cats,
        S.DEPARTMENT_COL: [c.split(" > ")[0] for c in cats], S.BRAND_COL: "b", S.PRICE_COL: 1.0,
    })


def events(baskets: list[tuple[str, pd.Timestamp, list[int]]]) -> pd.DataFrame:
    rows = [
        {S.USER_COL: u, S.ITEM_COL: f"i{i}", S.TS_COL: ts, S.EVENT_COL: S.PURCHASE,
         S.SESSION_COL: f"{u}-{ts:%Y%m%d%H}", S.QTY_COL: 1.0, S.PRICE_COL: 1.0, S.QUERY_COL: None}
        for u, ts, its in baskets for i in its
    ]
    return pd.DataFrame(rows).sort_values(S.TS_COL, kind="stable").reset_index(drop=True)


def dataset(seed: int = 0) -> pd.DataFrame:
    """User ``loyal`` buys item 0 in every basket; everyone else buys random popular stuff and
    the pair (5, 6) always together. Weekly baskets from January to the end of March."""
    rng = np.random.default_rng(seed)
    baskets: list[tuple[str, pd.Timestamp, list[int]]] = []
    for week in range(12):
        day = pd.Timestamp("2017-01-02") + pd.Timedelta(days=7 * week)
        baskets.append(("loyal", day + pd.Timedelta(hours=9), [0]))
        for u in range(6):
            its = list(rng.choice(np.arange(1, NUM_ITEMS), size=3, replace=False))
            if rng.random() < 0.5:
                its = [*its, 5, 6]
            baskets.append((f"u{u}", day + pd.Timedelta(hours=10 + u), sorted(set(its))))
    return events(baskets)


def setup(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, Interactions, RankingSignals,
                                   Recommender]:
    """Random embeddings and a LightGBM ranker fitted on the last three training weeks."""
    train, test = temporal_split(dataset(seed), CUT)
    inter = build_interactions(train, items())
    signals = fit_signals(train, inter)
    rng = np.random.default_rng(1)
    ranker = Ranker(rng.normal(size=(inter.num_users, 4)).astype(np.float32),
                    rng.normal(size=(inter.num_items, 4)).astype(np.float32), signals,
                    chunk_size=3)
    rec = Recommender.build(items(), ranker, item_features(train, items(), ranker),
                            text=ItemText.build(items()))
    val_cut = CUT - pd.Timedelta(days=21)
    hist, window = train[train[S.TS_COL] < val_cut], train[train[S.TS_COL] >= val_cut]
    tasks = validation_tasks(hist, window, inter, val_cut, country="US")
    rec.learned = fit_on_validation(rec, tasks, progress=lambda _: None)["full"]
    return train, test, inter, signals, rec


def ranked_by(rec: Recommender, q: QueryBatch, k: int) -> np.ndarray:
    return recommender_rankings(rec, q, {"intentrec": rec.learned}, k)[0]["intentrec"]


def test_buy_again_finds_the_item_a_user_always_buys() -> None:
    train, test, inter, signals, _ = setup()
    nb_all, _ = next_basket_tasks(train, test, inter, CUT)
    loyal = inter.user_index()["loyal"]
    row = int(np.flatnonzero(nb_all.users == loyal)[0])
    np.testing.assert_array_equal(nb_all.targets[row], [0])
    ranked = run_queries(buy_again_scores(signals, nb_all), nb_all, k=1, chunk=4)
    assert ranked[row, 0] == 0
    # Popularity does not know the loyal shopper (item 0 is bought by one user only).
    pop_ranked = run_queries(popularity_scores(signals, nb_all), nb_all, k=1, chunk=4)
    assert pop_ranked[row, 0] != 0


def test_discovery_excludes_what_the_user_bought_before() -> None:
    train, test, inter, signals, rec = setup()
    _, disc = next_basket_tasks(train, test, inter, CUT)
    loyal = inter.user_index()["loyal"]
    assert loyal not in disc.users  # bought nothing new after the cut
    assert len(disc) > 0  # the checks below run on some requests
    bought = {u: set(g) for u, g in train.groupby(S.USER_COL)[S.ITEM_COL]}
    for u, ex, t in zip(disc.users, disc.exclude, disc.targets, strict=True):
        prev = {int(x[1:]) for x in bought[str(inter.user_ids[u])]}
        assert ex is not None and set(ex.tolist()) == prev
        assert not set(t.tolist()) & prev
    rankings = [run_queries(fn, disc, k=NUM_ITEMS, chunk=4) for fn in (
        popularity_scores(signals, disc), buy_again_scores(signals, disc),
        itemknn_scores(signals, disc))]
    for ranked in [*rankings, ranked_by(rec, disc, NUM_ITEMS)]:
        for r, ex in zip(ranked, disc.exclude, strict=True):
            assert ex is not None and not np.isin(r[r >= 0], ex).any()


def test_in_session_reveals_half_and_ranks_the_rest() -> None:
    _, test, inter, _, _ = setup()
    ins, blind = in_session_tasks(test, inter, seed=3)
    again, _ = in_session_tasks(test, inter, seed=3)
    other, _ = in_session_tasks(test, inter, seed=4)
    assert len(ins) > 0 and len(ins) == len(blind)
    baskets = {
        s: {int(x[1:]) for x in g}
        for s, g in test.groupby(S.SESSION_COL)[S.ITEM_COL] if g.nunique() >= 4
    }
    assert len(ins) == len(baskets)
    for s, ex, t in zip(ins.sessions, ins.exclude, ins.targets, strict=True):
        assert s is not None and ex is not None
        basket = set(ex.tolist()) | set(t.tolist())
        assert basket in baskets.values()
        assert len(ex) == len(basket) // 2 and not set(ex.tolist()) & set(t.tolist())
        np.testing.assert_array_equal(np.sort(s.items), ex)  # revealed = the session's items
    assert all(s is None for s in blind.sessions)
    assert [t.tolist() for t in blind.targets] == [t.tolist() for t in ins.targets]
    # Seeded: the same seed reveals the same items, another seed other items.
    assert all(np.array_equal(a, b) for a, b in zip(ins.exclude, again.exclude, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(ins.exclude, other.exclude, strict=True))
    # Without device or region columns a request's context is its time alone.
    assert all(c is not None and (c.device, c.region) == (None, None) for c in ins.contexts)


def test_in_session_requests_carry_their_baskets_device_and_region() -> None:
    _, test, inter, _, _ = setup()
    test = test.copy()
    sessions = sorted(test[S.SESSION_COL].unique())
    device = {s: ("mobile" if n % 2 else "desktop") for n, s in enumerate(sessions)}
    test[S.DEVICE_COL] = test[S.SESSION_COL].map(device)
    test[S.REGION_COL] = None  # a column with no value sends no region
    first = test.index[test[S.SESSION_COL] == sessions[1]][0]
    test.loc[first, S.DEVICE_COL] = None  # the basket's first event with a value counts
    ins, blind = in_session_tasks(test, inter, seed=3)
    plain, _ = in_session_tasks(test.drop(columns=[S.DEVICE_COL, S.REGION_COL]), inter, seed=3)
    assert len(ins) > 0
    by_items: dict[frozenset[int], set[str]] = {}  # a basket's items -> its device(s)
    for _, g in test.sort_values(S.TS_COL).groupby(S.SESSION_COL):
        key, known = frozenset(int(x[1:]) for x in g[S.ITEM_COL]), g[S.DEVICE_COL].dropna()
        by_items.setdefault(key, set()).update(known.iloc[:1])
    for ex, tg, c, b in zip(ins.exclude, ins.targets, ins.contexts, blind.contexts, strict=True):
        assert ex is not None and c is not None and c == b
        assert c.device in by_items[frozenset(ex.tolist()) | frozenset(tg.tolist())]
        assert c.region is None
    # The same baskets and reveals as without the columns: only the context gained the device.
    assert all(np.array_equal(a, b) for a, b in zip(ins.exclude, plain.exclude, strict=True))
    assert {c.device for c in ins.contexts} == {"mobile", "desktop"}


def test_rankings_do_not_depend_on_the_test_window() -> None:
    # Leakage guard: the same users ranked against two different futures get identical rankings,
    # and evaluating leaves the fitted signals untouched.
    train, test, inter, signals, rec = setup()
    before = copy.deepcopy(signals)
    shuffled = test.copy()
    rng = np.random.default_rng(9)
    shuffled[S.ITEM_COL] = rng.permutation(shuffled[S.ITEM_COL].to_numpy())
    q1, _ = next_basket_tasks(train, test, inter, CUT)
    q2, _ = next_basket_tasks(train, shuffled, inter, CUT)
    common = np.intersect1d(q1.users, q2.users)
    assert len(common) > 0
    for make in (lambda q: itemknn_scores(signals, q), lambda q: buy_again_scores(signals, q)):
        r1 = run_queries(make(q1), q1, k=5, chunk=4)[np.isin(q1.users, common)]
        r2 = run_queries(make(q2), q2, k=5, chunk=4)[np.isin(q2.users, common)]
        np.testing.assert_array_equal(r1, r2)
    r1 = ranked_by(rec, q1, 5)[np.isin(q1.users, common)]
    r2 = ranked_by(rec, q2, 5)[np.isin(q2.users, common)]
    np.testing.assert_array_equal(r1, r2)
    evaluate(train, test, inter, rec, CUT, progress=lambda _: None)
    for name in ("popularity", "hist_weight", "hist_count", "context_lift", "holiday_lift"):
        np.testing.assert_array_equal(getattr(signals, name), getattr(before, name))
    assert (signals.item_sim != before.item_sim).nnz == 0


def test_signals_ignore_events_they_are_not_given() -> None:
    # fit_signals sees only what it is passed: adding the test window changes it (so the check
    # below has teeth), and the protocol passes the training window only.
    train, test, inter, signals, _ = setup()
    with_test = fit_signals(pd.concat([train, test]), inter, now=pd.Timestamp(train[S.TS_COL].max()))
    assert not np.array_equal(with_test.hist_count, signals.hist_count)
    again = fit_signals(train, inter)
    np.testing.assert_array_equal(again.hist_count, signals.hist_count)
    np.testing.assert_array_equal(again.popularity, signals.popularity)


def test_evaluate_reports_every_model_task_and_metric() -> None:
    train, test, inter, _, rec = setup()
    lines: list[str] = []
    res = evaluate(train, test, inter, rec, CUT, ablations={"intentrec_alone": rec.learned},
                   ablation_requests=3, progress=lines.append)
    abl = res.pop("ablations")
    search = res.pop("search")
    unc = res.pop("uncertainty")
    seg = res.pop("segments")
    anon = res.pop("anonymous")
    assert list(res) == list(S.MODEL_NAMES)
    # The segments split each task's requests: their counts add up to the task's, and their
    # recalls, weighted by those counts, to the task's recall, for every model.
    for task in S.TASKS:
        cells = seg["recall@20"][task]
        assert set(cells) <= {"new", "light", "medium", "heavy"} and cells
        assert sum(c["n"] for c in cells.values()) == res["intentrec"][task]["n"]
        for m in S.MODEL_NAMES:
            assert sum(c["n"] * c["models"][m] for c in cells.values()) / res[m][task]["n"] == \
                pytest.approx(res[m][task]["recall@20"])
        for c in cells.values():
            assert c["lead"] == pytest.approx(c["models"]["intentrec"]
                                              - c["models"][c["best_baseline"]])
    assert "next_basket_all" in format_segments({"segments": seg})
    # Without a known shopper: the in-session baskets again, every model, both tasks, and
    # buy_again (no history to use) is popularity.
    assert list(anon) == list(S.MODEL_NAMES)
    for m in S.MODEL_NAMES:
        assert list(anon[m]) == ["anonymous_session", "cold_start"]
        assert anon[m]["cold_start"]["n"] == res[m]["in_session"]["n"]
    assert anon["buy_again"]["cold_start"] == anon["popularity"]["cold_start"]
    assert "cold_start" in format_anonymous({"anonymous": anon})
    # The intervals: one per task, around intentrec's own recall, the lead over the task's best
    # baseline by mean recall, paired on the same requests.
    for task in S.TASKS:
        u = unc["recall@20"][task]
        assert u["mean"] == pytest.approx(res["intentrec"][task]["recall@20"])
        assert u["ci95"][0] <= u["mean"] <= u["ci95"][1]
        best = max([m for m in S.MODEL_NAMES if m != "intentrec"],
                   key=lambda b: res[b][task]["recall@20"])
        assert u["best_baseline"] == best
        assert u["lead"] == pytest.approx(u["mean"] - res[best][task]["recall@20"])
        assert u["lead_ci95"][0] <= u["lead"] <= u["lead_ci95"][1]
    assert "next_basket_all" in format_uncertainty({"uncertainty": unc})
    # The search task: every search baseline and intentrec, on the same simulated queries.
    assert list(search) == [*BASELINES, "intentrec"]
    baskets = res["popularity"]["in_session"]["n"]
    for tasks in search.values():
        assert list(tasks) == ["search"] and 0 < tasks["search"]["n"] <= baskets
        assert all(0.0 <= tasks["search"][x] <= 1.0 for x in S.METRICS)
    assert "popularity_in_category" in format_search({"search": search})
    for model in res:
        assert list(res[model]) == list(S.TASKS)
        for task in S.TASKS:
            m = res[model][task]
            extra = {"candidate_recall", "candidates", "source_recall", "contributions"} \
                if model == "intentrec" else set()
            assert set(m) == {*S.METRICS, "n", *extra}
            assert all(0.0 <= m[x] <= 1.0 for x in S.METRICS)
    # The ablation table: its rows rank the same seeded sample; the same ranker under another
    # name gets the same numbers there.
    assert list(abl) == ["intentrec_alone", "intentrec"]
    for task in S.TASKS:
        assert abl["intentrec"][task] == abl["intentrec_alone"][task]
        assert abl["intentrec"][task]["n"] == min(3, res["intentrec"][task]["n"])
    for task in S.TASKS:
        report = res["intentrec"][task]
        assert res["intentrec"][task]["recall@20"] <= report["candidate_recall"] + 1e-9
        assert set(report["source_recall"]) == set(SOURCES)
        assert max(report["source_recall"].values()) <= report["candidate_recall"] + 1e-9
    assert any(t in line for line in lines for t in S.TASKS)
    assert "in_session_blind" in format_candidates(res)
    for task in S.TASKS:
        shares = res["intentrec"][task]["contributions"]
        assert set(shares) == set(rec.learned.components)
        assert sum(v["share"] for v in shares.values()) == pytest.approx(1.0)
    table = format_contributions(res)
    assert all(t in table for t in S.TASKS) and all(c in table for c in rec.learned.components)
    assert "intentrec_alone" in format_ablations({**res, "ablations": abl})
    # Subsampling is seeded and reported.
    small = evaluate(train, test, inter, rec, CUT, max_users=3, max_baskets=2,
                     progress=lambda _: None)
    assert small["intentrec"]["next_basket_all"]["n"] == 3
    assert small["intentrec"]["in_session"]["n"] == 2


def test_contribution_report_adds_up_each_recommendations_own_explanation() -> None:
    _, test, inter, _, rec = setup()
    q, _ = in_session_tasks(test, inter)
    k = 5
    _, report = recommender_rankings(rec, q, {"intentrec": rec.learned}, k, batch=2)
    got = report["contributions"]
    # Each request alone, as serving answers it: its top k with their exact contributions, and
    # the contributions of its finalists (every candidate the whole model scored).
    lr = rec.learned
    comps = lr.components
    total_abs, total = dict.fromkeys(comps, 0.0), dict.fromkeys(comps, 0.0)
    score_lift, n = 0.0, 0
    for req in q.requests(k):
        p = rec.prepare(req)
        cas = rec.score([p])[0]
        r = rec.select(p, cas, k=k, explain=True)
        finals = lr.contributions_of(cas.leaves)
        mean = {c: float(np.mean([f[c] for f in finals])) for c in comps}
        for c, score in zip(r.contributions, r.scores, strict=True):
            assert sum(c.values()) == pytest.approx(float(score), abs=1e-4)
            for name in comps:
                total_abs[name] += abs(c[name] - mean[name])
                total[name] += c[name] - mean[name]
            score_lift += float(score) - float(np.mean(cas.scores[cas.rows]))
            n += 1
    assert n > 0
    grand = sum(total_abs.values())
    for name in comps:
        assert got[name]["share"] == pytest.approx(total_abs[name] / grand, abs=1e-6)
        assert got[name]["mean"] == pytest.approx(total[name] / n, abs=1e-6)
    # The lifts add up to how far the recommended items score above their request's finalists.
    assert sum(v["mean"] for v in got.values()) == pytest.approx(score_lift / n, abs=1e-4)
    assert score_lift > 0


def _gate_metrics(ours: list[float], best: list[float]) -> dict:
    """intentrec's and the baselines' recall@20 per task (in S.TASKS order); the best baseline
    of each task is ``itemknn``, the others score half of it."""
    out: dict = {"intentrec": {}, **{b: {} for b in BASELINES_OF_TABLE}}
    for task, o, b in zip(S.TASKS, ours, best, strict=True):
        out["intentrec"][task] = {"recall@20": o}
        for name in BASELINES_OF_TABLE:
            out[name][task] = {"recall@20": b if name == "itemknn" else b / 2}
    return out


BASELINES_OF_TABLE = ("popularity", "buy_again", "itemknn")


def test_publish_gate_names_each_task_where_the_lead_is_missing() -> None:
    ahead = _gate_metrics([0.14, 0.03, 0.23, 0.18], [0.13, 0.025, 0.17, 0.17])
    assert lead_shortfalls(ahead, 0.0) == []
    # A margin the smallest lead (discovery, +0.005) does not reach fails that task alone.
    short = lead_shortfalls(ahead, 0.006)
    assert len(short) == 1 and short[0].startswith("next_basket_discovery: ")
    assert "itemknn 0.0250" in short[0] and "+0.0050" in short[0] and "than 0.0060 required" in short[0]
    # A tie is not a lead; a task without requests (NaN) is not judged.
    tie = _gate_metrics([0.13, float("nan"), 0.23, 0.17], [0.13, 0.025, 0.17, 0.17])
    assert [t.split(":")[0] for t in lead_shortfalls(tie, 0.0)] == ["next_basket_all",
                                                                    "in_session_blind"]
    # Nothing judged at all is a shortfall, not a pass.
    empty = _gate_metrics([float("nan")] * 4, [0.1] * 4)
    assert lead_shortfalls(empty, 0.0) and "no task" in lead_shortfalls(empty, 0.0)[0]


def test_publish_gate_needs_the_evaluation() -> None:
    from pydantic import ValidationError

    from graph.pipeline import PipelineConfig

    assert PipelineConfig(require_lead=0.001).require_lead == 0.001
    with pytest.raises(ValidationError, match="--skip-eval"):
        PipelineConfig(require_lead=0.0, skip_eval=True)
    with pytest.raises(ValidationError, match="require_lead"):
        PipelineConfig(require_lead=-0.1)


def test_the_published_version_read_back_ranks_the_tasks_as_it_did_when_trained(tmp_path) -> None:
    """What ``--require-no-regression`` compares with: a version written to disk, read back as
    the ranker replica loads it, scores this run's tasks exactly as the evaluation that trained
    it did (same ids: the index map is the identity)."""
    from actors.loaded_model import LoadedModel
    from graph.artifacts import read_artifact, write_artifact

    train, test, inter, _, rec = setup()
    ours = evaluate(train, test, inter, rec, CUT, progress=lambda _: None)
    root = str(tmp_path / "artifacts")
    write_artifact(root, user_ids=inter.user_ids, items=items(), user_emb=rec.ranker.user_emb,
                   item_emb=rec.ranker.item_emb, signals=rec.ranker.signals, metrics={},
                   manifest={}, learned=rec.learned, item_static=rec.item_static, text=rec.text)
    art = read_artifact(root)
    index = IndexMap.between(inter.user_ids, inter.item_ids, art.user_ids,
                             art.items[S.ITEM_COL].to_numpy())
    assert (index.users == np.arange(inter.num_users)).all()
    assert (index.items == np.arange(inter.num_items)).all()
    lines: list[str] = []
    theirs = evaluate_version(LoadedModel.build(art).rec, index, train, test, inter, CUT,
                              country="US", progress=lines.append)
    assert list(theirs) == list(S.TASKS)
    for task in S.TASKS:
        assert theirs[task]["n"] == ours["intentrec"][task]["n"] > 0
        for x in S.METRICS:
            assert theirs[task][x] == pytest.approx(ours["intentrec"][task][x], abs=1e-12), (task, x)
    assert any(f"({PUBLISHED} version)" in line for line in lines)


def test_index_map_takes_requests_to_the_other_versions_rows_and_back() -> None:
    """Ids the other version does not know: the shopper is anonymous there, the items leave
    the session, the exclusions and the targets; its answers come back in this run's rows."""
    mine_users, mine_items = np.array(["a", "b", "c"]), np.array(["x", "y", "z", "w"])
    theirs_users, theirs_items = np.array(["c", "a"]), np.array(["w", "q", "x", "y"])
    m = IndexMap.between(mine_users, mine_items, theirs_users, theirs_items)
    assert m.users.tolist() == [1, -1, 0]
    assert m.items.tolist() == [2, 3, -1, 0]
    assert m.back.tolist() == [3, -1, 0, 1]
    q = QueryBatch("in_session", np.array([0, 1, -1]),
                   [((0, S.ADD_TO_CART, 5.0), (2, S.VIEW, 6.0)), (), ((2, S.VIEW, 1.0),)],
                   [None] * 3, np.array([10.0, 11.0, 12.0]),
                   [np.array([0, 2]), None, np.array([2])],
                   [np.array([1, 3]), np.array([2]), np.array([1, 2])])
    t = m.to_theirs(q)
    assert t.users.tolist() == [1, -1, -1]
    assert t.events == [((2, S.ADD_TO_CART, 5.0),), (), ()]
    assert [None if e is None else e.tolist() for e in t.exclude] == [[2], None, []]
    assert [x.tolist() for x in t.targets] == [[3, 0], [-1], [3]]
    assert t.times.tolist() == q.times.tolist() and len(t) == len(q)
    # Their rows back: "q" is unknown here, so that place is a miss (-1), as is padding.
    assert m.to_ours(np.array([[1, 0, 2, -1]])).tolist() == [[-1, 3, 0, -1]]


def test_regression_gate_names_each_task_where_the_new_model_is_lower() -> None:
    def with_published(ours: list[float], old: list[float]) -> dict:
        m = _gate_metrics(ours, [0.01] * 4)
        m[PUBLISHED] = {t: {"recall@20": v} for t, v in zip(S.TASKS, old, strict=True)}
        return m

    better = with_published([0.14, 0.03, 0.23, 0.18], [0.14, 0.029, 0.22, 0.18])
    assert regression_shortfalls(better, 0.0) == []  # equal is no regression
    worse = with_published([0.14, 0.03, 0.21, float("nan")], [0.141, 0.03, 0.23, 0.5])
    short = regression_shortfalls(worse, 0.0)
    assert [s.split(":")[0] for s in short] == ["next_basket_all", "in_session"]
    assert "0.2100 against the published version's 0.2300 (-0.0200" in short[1]
    # A tolerance lets small drops through, not larger ones; NaN tasks are not judged.
    assert [s.split(":")[0] for s in regression_shortfalls(worse, 0.005)] == ["in_session"]
    assert regression_shortfalls(worse, 0.02) == []
    # Nothing published before (no row): nothing to regress from.
    assert regression_shortfalls(_gate_metrics([0.1] * 4, [0.01] * 4), 0.0) == []


def test_regression_gate_refuses_a_published_version_trained_past_this_split(tmp_path) -> None:
    from pydantic import ValidationError

    from graph.artifacts import write_artifact
    from graph.errors import ConfigError
    from graph.pipeline import PipelineConfig, latest_moved, published_to_compare

    _, _, inter, _, rec = setup()
    root = str(tmp_path / "artifacts")
    cfg = PipelineConfig(output=root, require_no_regression=0.0)
    assert published_to_compare(cfg, CUT) is None  # nothing published yet
    version = write_artifact(
        root, user_ids=inter.user_ids, items=items(), user_emb=rec.ranker.user_emb,
        item_emb=rec.ranker.item_emb, signals=rec.ranker.signals, metrics={},
        manifest={"data": {"split_at": str(CUT)}}, learned=rec.learned,
        item_static=rec.item_static, text=rec.text)
    assert published_to_compare(cfg, CUT) == version
    assert published_to_compare(cfg, CUT + pd.Timedelta(days=7)) == version
    with pytest.raises(ConfigError, match="after this run's split") as err:
        published_to_compare(cfg, CUT - pd.Timedelta(days=1))
    assert version in err.value.message and "--split-at" in err.value.message
    # Without the gate nothing is read.
    assert published_to_compare(PipelineConfig(output=root), CUT - pd.Timedelta(days=1)) is None
    # LATEST moved while the run trained (a rollback, another job): the verdict no longer holds.
    assert latest_moved(root, version) == []
    moved = latest_moved(root, None)
    assert len(moved) == 1 and f"from nothing to {version}" in moved[0]
    assert latest_moved(str(tmp_path / "empty"), None) == []
    with pytest.raises(ValidationError, match="--skip-eval"):
        PipelineConfig(require_no_regression=0.0, skip_eval=True)


def test_recall_uncertainty_resamples_shoppers_and_pairs_the_lead() -> None:
    rng = np.random.default_rng(3)
    # 200 shoppers with 10 identical requests each: the requests say no more than the shoppers.
    shopper_value = rng.random(200)
    mine = np.repeat(shopper_value, 10)
    who = np.repeat(np.arange(200), 10)
    base = {"weak": mine - 0.05, "strong": mine - 0.01}
    per_request = {"in_session": {"intentrec": mine, **base}}
    out = recall_uncertainty(per_request, {"in_session": who}, ["weak", "strong"], seed=1)
    r = out["recall@20"]["in_session"]
    assert r["best_baseline"] == "strong"
    # Paired: the lead is the same on every request, so its interval has no width at all.
    assert r["lead"] == pytest.approx(0.01)
    assert r["lead_ci95"] == pytest.approx([0.01, 0.01])
    # Clustered: as wide as the interval of the 200 shoppers' own values, and about sqrt(10)
    # times the one that takes the 2,000 requests as independent.
    own = recall_uncertainty({"t": {"intentrec": shopper_value, "b": shopper_value}},
                             {"t": np.arange(200)}, ["b"], seed=1)["recall@20"]["t"]["ci95"]
    naive = recall_uncertainty({"t": {"intentrec": mine, "b": mine}}, {"t": np.arange(2000)},
                               ["b"], seed=1)["recall@20"]["t"]["ci95"]
    width = r["ci95"][1] - r["ci95"][0]
    assert width == pytest.approx(own[1] - own[0], rel=0.15)
    assert width > 2.5 * (naive[1] - naive[0])
    # Seeded: the same inputs give the same intervals.
    again = recall_uncertainty(per_request, {"in_session": who}, ["weak", "strong"], seed=1)
    assert again == out
    assert "+0.0100 [+0.0100, +0.0100] over strong" in format_uncertainty({"uncertainty": out})


def test_format_table_puts_intentrec_last_and_marks_the_best() -> None:
    metrics = {
        "intentrec": {"in_session": {"recall@20": 0.3, "ndcg@20": 0.1, "hit@20": 0.5, "n": 7}},
        "popularity": {"in_session": {"recall@20": 0.1, "ndcg@20": 0.2, "hit@20": 0.4, "n": 7}},
    }
    table = format_table(metrics)
    lines = table.splitlines()
    assert "in_session (n=7)" in lines[0]
    pop_row = next(x for x in lines if x.startswith("popularity"))
    ir_row = next(x for x in lines if x.startswith("intentrec"))
    assert lines.index(pop_row) < lines.index(ir_row)
    assert "0.3000*" in ir_row and "0.2000*" in pop_row and "0.1000*" not in table


def test_tasks_are_empty_not_broken_without_test_users() -> None:
    train, test, inter, _, _ = setup()
    late = test.assign(**{S.USER_COL: "stranger"})
    nb, _ = next_basket_tasks(train, late, inter, CUT)
    ins, _ = in_session_tasks(late, inter)
    known, _ = in_session_tasks(test, inter)
    assert len(nb) == 0
    # Unknown users still get in-session requests: as many baskets as with known users.
    assert len(ins) == len(known) > 0
    assert (np.asarray(ins.users) == -1).all()


def test_search_task_asks_about_a_hidden_item_by_its_category_words() -> None:
    _, test, inter, _, _ = setup()
    ins, _ = in_session_tasks(test, inter, seed=0)
    cats = items()[S.CATEGORY_COL].to_numpy()
    q = search_task(ins, cats, cats, seed=3)
    again = search_task(ins, cats, cats, seed=3)
    assert len(q) == len(ins) > 0 and q.queries == again.queries  # seeded
    assert q.queries is not None
    for text, tgt, hidden, ex in zip(q.queries, q.targets, ins.targets, q.exclude, strict=True):
        assert text is not None and not any(ch.isdigit() for ch in text)  # never an id
        assert len(tgt) and np.isin(tgt, hidden).all() and not np.isin(tgt, ex).any()
        assert len(set(cats[tgt])) == 1 and text.split()[0] in cats[tgt[0]].lower()
    assert [r.query for r in q.requests()] == q.queries


def test_early_stopping_holds_out_whole_shoppers() -> None:
    from graph.ranker_fit import split_requests

    # 40 shoppers with 1-5 requests each (a next-basket request and in-session baskets), and 10
    # anonymous requests, each its own shopper.
    rng = np.random.default_rng(3)
    requests = [Request(user=u) for u in range(40) for _ in range(int(rng.integers(1, 6)))]
    requests += [Request(user=None) for _ in range(10)]
    tr, va = split_requests(requests, np.random.default_rng(0), share=0.25)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(requests)))
    users_tr = {requests[i].user for i in tr if requests[i].user is not None}
    users_va = {requests[i].user for i in va if requests[i].user is not None}
    assert users_tr and users_va and not users_tr & users_va
    anonymous_va = sum(requests[i].user is None for i in va)
    assert len(users_va) + anonymous_va == round(0.25 * 50)  # a quarter of the 50 shoppers


def test_labelled_subset_keeps_rows_and_source_flags_together() -> None:
    from graph.features import FEATURES
    from graph.ltr import RankingData
    from graph.ranker_fit import LabelledSet
    from graph.retrieval import SOURCES

    # Three requests of 2, 3 and 1 rows; row r's features and source flags both encode r.
    x = np.repeat(np.arange(6, dtype=np.float32)[:, None], len(FEATURES), axis=1)
    src = np.zeros((6, len(SOURCES)), dtype=bool)
    src[np.arange(6), np.arange(6) % len(SOURCES)] = True
    lab = LabelledSet(RankingData(x, np.arange(6) % 2, np.array([2, 3, 1])), src, 0.5,
                      np.arange(6) + 1.0)
    sub = lab.subset(np.array([2, 0]))
    assert sub.weights.tolist() == [6.0, 1.0, 2.0]
    assert sub.data.group.tolist() == [1, 2]
    assert sub.data.x[:, 0].tolist() == [5, 0, 1]
    assert sub.sources.argmax(axis=1).tolist() == [5 % len(SOURCES), 0, 1]
    assert sub.candidate_recall == 0.5


def test_shopper_segments_are_thirds_of_the_shoppers_with_a_history() -> None:
    from graph.evaluate import segment_edges, shopper_segments

    # 90 users with 1..90 items in their history, 10 with none.
    breadth = np.concatenate([np.arange(1, 91), np.zeros(10, dtype=np.int64)])
    lo, hi = segment_edges(breadth)
    assert (lo, hi) == (30, 60)
    users = np.array([0, 29, 30, 59, 60, 89, 95, -1])  # 1, 30, 31, 60, 61, 90 items; none; unknown
    np.testing.assert_array_equal(shopper_segments(users, breadth, (lo, hi)),
                                  [1, 1, 2, 2, 3, 3, 0, 0])
    # Ties: most shoppers bought one item (a fashion shop): light and medium share an edge, and
    # medium is empty rather than a band that holds nobody's history length.
    ties = np.array([1] * 80 + [2] * 10 + [5] * 10)
    assert segment_edges(ties) == (1, 1)
    assert set(shopper_segments(np.arange(100), ties, (1, 1)).tolist()) == {1, 3}
    assert segment_edges(np.zeros(5, dtype=np.int64)) == (0, 0)


def test_segment_report_finds_the_segment_a_baseline_serves_better() -> None:
    from graph.evaluate import segment_report

    # 60 shoppers, one request each: 20 light, 20 medium, 20 heavy (1, 50, 100 items). intentrec
    # beats buy_again by 0.1 on light and medium shoppers and loses by 0.2 on heavy ones.
    breadth = np.repeat([1, 50, 100], 20)
    users = np.arange(60)
    base = np.full(60, 0.3)
    mine = np.concatenate([np.full(40, 0.4), np.full(20, 0.1)])
    pop = np.full(60, 0.05)
    per_request = {"t": {"popularity": pop, "buy_again": base, "intentrec": mine}}
    out = segment_report(per_request, {"t": users}, {"t": users}, breadth,
                         ["popularity", "buy_again"], samples=200)
    cells = out["recall@20"]["t"]
    assert list(cells) == ["light", "medium", "heavy"]
    assert out["edges"] == [1, 50]
    for name, lead in (("light", 0.1), ("medium", 0.1), ("heavy", -0.2)):
        assert cells[name]["n"] == cells[name]["shoppers"] == 20
        assert cells[name]["best_baseline"] == "buy_again"
        assert cells[name]["lead"] == pytest.approx(lead)
        lo, hi = cells[name]["lead_ci95"]
        assert lo == pytest.approx(lead) and hi == pytest.approx(lead)  # the same lead for all
    # The overall mean hides it: intentrec leads by 0.0 on average.
    assert mine.mean() == pytest.approx(base.mean())
    table = format_segments({"segments": out})
    assert "heavy (51+)" in table and "-0.2000" in table


def test_anonymous_twins_ask_a_share_of_requests_again_without_their_shopper() -> None:
    from graph.ranker_fit import split_requests, validation_requests

    train, _, inter, _, rec = setup()
    val_cut = CUT - pd.Timedelta(days=21)
    hist, window = train[train[S.TS_COL] < val_cut], train[train[S.TS_COL] >= val_cut]
    tasks = validation_tasks(hist, window, inter, val_cut, country="US")
    cat = rec.catalogue
    without = validation_requests(tasks, cat.categories, cat.titles, np.random.default_rng(0),
                                  anonymous_share=0.0)
    every = validation_requests(tasks, cat.categories, cat.titles, np.random.default_rng(0),
                                anonymous_share=1.0)
    n = len(without.requests)
    assert without.twins == 0 and n == sum(len(q) for q in tasks)
    # The originals (simulated searches included) are the same, and come first.
    assert all(a.user == b.user and same_but_the_shopper(a, b)
               for a, b in zip(every.requests[:n], without.requests, strict=True))
    # Every request of the eligible tasks has a twin, discovery's and blind's none; each twin
    # is its original without the shopper, with its targets, and stands for that shopper in the
    # split.
    eligible = sum(len(q) for q in tasks if q.name in ("next_basket_all", "in_session"))
    assert every.twins == eligible == len(every.requests) - n > 0
    for j in range(n, len(every.requests)):
        twin = every.requests[j]
        assert twin.user is None
        i = next(i for i, r in enumerate(every.requests[:n]) if r.user is not None
                 and same_but_the_shopper(r, twin)
                 and np.array_equal(every.targets[i], every.targets[j]))
        assert every.shoppers[j] == every.shoppers[i] == every.requests[i].user
    _, va = split_requests(every.requests, np.random.default_rng(0), shoppers=every.shoppers)
    side = np.zeros(len(every.requests), dtype=bool)
    side[va] = True
    for s in np.unique(every.shoppers):
        assert len(set(side[every.shoppers == s].tolist())) == 1  # a shopper on one side only
    # A share in between: about that share of the eligible requests.
    some = validation_requests(tasks, cat.categories, cat.titles, np.random.default_rng(0),
                               anonymous_share=0.5)
    assert 0 < some.twins < eligible


def same_but_the_shopper(a: Request, b: Request) -> bool:
    fields = ("item_events", "context", "now", "query", "session_query", "category", "k")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and (
        (a.exclude is None and b.exclude is None)
        or (a.exclude is not None and b.exclude is not None
        and np.array_equal(a.exclude, b.exclude)))
