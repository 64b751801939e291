"""Training–serving skew (graph.skew): the training profile, the PSI, a replica's monitor, and
the monitor on a real small artifact through RankerService (no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from actors.api import ModelInfo
from actors.ranker import RankerService, RankQuery
from graph.artifacts import read_artifact
from graph.ltr import LearnedRanker
from graph.ranking import ContextSignal
from graph.skew import BINS, PSI_MAJOR, SAMPLE_EVERY, FeatureProfile, SkewMonitor, sample_rows

T0 = 1_512_000_000.0  # 2017-11-30: the built-in data's last weeks, fixed (no wall clock)


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.normal(size=n), rng.exponential(size=n), rng.normal(3, 2, size=n),
                            rng.integers(0, 2, size=n)]).astype(np.float32)


FEATS = ("a", "b", "c", "flag")


def test_repeated_values_share_a_bin_and_missing_values_have_their_own() -> None:
    rng = np.random.default_rng(0)
    n = 10_000
    mostly_zero = np.where(rng.random(n) < 0.8, 0.0, rng.random(n) + 0.5)
    constant = np.ones(n)
    missing = np.where(rng.random(n) < 0.3, np.nan, rng.normal(size=n))
    p = FeatureProfile.fit(np.column_stack([mostly_zero, constant, missing]), ("z", "one", "nan"))
    assert p.shares.shape == (3, BINS + 1)
    np.testing.assert_allclose(p.shares.sum(axis=1), 1.0)
    # The zeros are one bin, up to halfway to the smallest other value; the rest split at the
    # deciles above.
    assert p.edges[0, 0] == pytest.approx(mostly_zero[mostly_zero > 0].min() / 2)
    assert p.shares[0, 0] == pytest.approx(np.mean(mostly_zero == 0.0))
    assert p.shares[0, BINS] == 0.0
    # A constant feature: no edge (nothing above it), everything in bin 0.
    assert np.isinf(p.edges[1]).all()
    assert p.shares[1, 0] == 1.0
    # Missing values in the last bin; the present ones in deciles of their own.
    assert p.shares[2, BINS] == pytest.approx(np.mean(np.isnan(missing)))
    present = p.shares[2, :BINS]
    np.testing.assert_allclose(present, (1 - p.shares[2, BINS]) / BINS, atol=0.002)


def test_a_value_that_moves_by_a_rounding_error_stays_in_its_bin() -> None:
    # Candidates on two values (as brand_pop's on the built-in data sit on its largest brands),
    # which refitted signals move by a little.
    rng = np.random.default_rng(0)
    two = np.where(rng.random(5_000) < 0.3, 9.21, 11.53)
    binary = (rng.random(5_000) < 0.1).astype(np.float64)
    p = FeatureProfile.fit(np.column_stack([two, binary]), ("brand_pop", "src"))
    moved = np.column_stack([two * 1.001, binary])
    np.testing.assert_allclose(p.psi(p.counts(moved)), 0.0, atol=1e-12)
    # A real move is still one: the smaller value's items now above the edge.
    swapped = np.column_stack([np.where(two < 10, 11.0, 11.53), binary])
    assert p.psi(p.counts(swapped))[0] > PSI_MAJOR


def test_psi_is_zero_on_the_training_rows_and_flags_only_the_shifted_feature() -> None:
    x = _rows(20_000, 0)
    p = FeatureProfile.fit(x, FEATS)
    np.testing.assert_allclose(p.psi(p.counts(x)), 0.0, atol=1e-12)
    fresh = _rows(20_000, 1)  # the same distribution, another draw: sampling noise only
    assert (p.psi(p.counts(fresh)) < 0.01).all()
    shifted = fresh.copy()
    shifted[:, 2] += 2.0  # one standard deviation
    psi = p.psi(p.counts(shifted))
    assert psi[2] > PSI_MAJOR, psi
    assert (np.delete(psi, 2) < 0.01).all(), psi
    # No live rows: no PSI, not a zero that reads as "stable".
    assert np.isnan(p.psi(np.zeros_like(p.shares))).all()


def test_weighted_sampled_rows_stand_for_all_candidates() -> None:
    # 50 requests of 1 bought and 99 other candidates; the training set keeps the bought one and
    # 9 random others, each standing for 11 (ranker_fit.label).
    rng = np.random.default_rng(0)
    full = rng.exponential(size=(50, 100))
    full[:, 0] += 5.0  # the bought candidate scores high
    kept = np.concatenate([np.concatenate([[row[0]], rng.choice(row[1:], 9, replace=False)])
                           for row in full])
    w = np.tile(np.r_[1.0, np.full(9, 99 / 9)], 50)
    whole = FeatureProfile.fit(full.reshape(-1, 1), ("f",))
    weighted = FeatureProfile.fit(kept.reshape(-1, 1), ("f",), w)
    unweighted = FeatureProfile.fit(kept.reshape(-1, 1), ("f",))
    assert weighted.rows == pytest.approx(5000.0)
    # Against all candidates, the weighted profile is close; the unweighted one, where a tenth of
    # the rows are bought items, is not.
    all_counts = whole.counts(full.reshape(-1, 1))
    assert weighted.psi(weighted.counts(full.reshape(-1, 1)))[0] < 0.02
    assert unweighted.psi(unweighted.counts(full.reshape(-1, 1)))[0] > \
        3 * weighted.psi(weighted.counts(full.reshape(-1, 1)))[0]
    assert whole.psi(all_counts)[0] == pytest.approx(0.0, abs=1e-12)


def test_the_profile_reads_back_exactly() -> None:
    x = _rows(5_000, 0)
    x[::7, 1] = np.nan
    p = FeatureProfile.fit(x, FEATS, mix={"known_shopper": 0.75, "session": 0.5, "query": 0.1})
    q = FeatureProfile.from_json(p.to_json())
    assert q.features == p.features and q.rows == p.rows and q.mix == p.mix
    np.testing.assert_array_equal(q.edges, p.edges)
    np.testing.assert_array_equal(q.shares, p.shares)
    np.testing.assert_array_equal(q.counts(x), p.counts(x))


def test_sample_rows_is_seeded_uniform_and_within_each_part() -> None:
    a, b = sample_rows([700, 300], max_rows=100, seed=3)
    assert len(a) + len(b) == 100
    assert a.min() >= 0 and a.max() < 700 and b.min() >= 0 and b.max() < 300
    assert (np.diff(a) > 0).all() and (np.diff(b) > 0).all()
    a2, b2 = sample_rows([700, 300], max_rows=100, seed=3)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    whole = sample_rows([40, 10], max_rows=100)
    np.testing.assert_array_equal(whole[0], np.arange(40))
    np.testing.assert_array_equal(whole[1], np.arange(10))


def test_the_monitor_bins_one_request_in_every_and_reports_the_mix() -> None:
    x = _rows(4_000, 0)
    p = FeatureProfile.fit(x, FEATS, mix={"known_shopper": 1.0, "session": 0.5, "query": 0.0})
    # The monitor's rows have the features in another order, with a column it does not track.
    cols = [3, 0, 2, 1]
    live = np.zeros((4_000, 5), dtype=np.float32)
    live[:, cols] = x
    mon = SkewMonitor(p, cols, every=4)
    assert mon.report()["status"] == "no requests yet"
    binned = [mon.observe(live[i * 400:(i + 1) * 400], user=False, session=True, query=False)
              for i in range(10)]
    assert binned == [True, False, False, False, True, False, False, False, True, False]
    r = mon.report()
    assert r["requests_ranked"] == 10 and r["requests_binned"] == 3
    assert r["candidates_binned"] == 1200 and r["sample_every"] == 4
    assert r["request_mix"]["known_shopper"] == {"training": 1.0, "live": 0.0}
    assert r["request_mix"]["session"] == {"training": 0.5, "live": 1.0}
    assert r["status"] == "stable" and set(r["psi"]) == set(FEATS)
    assert [t["feature"] for t in r["top"]] == list(r["psi"])[:5]
    with pytest.raises(ValueError, match="every"):
        SkewMonitor(p, cols, every=0)


# --- the real path ---------------------------------------------------------------------------
def _context(ts: float) -> dict[str, object]:
    """The context signal fields the ingress sends for a request at ``ts``."""
    return dataclasses.asdict(ContextSignal.from_timestamp(ts))


@pytest.fixture(scope="module")
def fresh(svd_artifact_root: str) -> RankerService:
    return RankerService(svd_artifact_root)


def test_the_trained_ranker_keeps_a_profile_of_its_own_features(svd_artifact_root: str) -> None:
    art = read_artifact(svd_artifact_root)
    lr = art.learned
    assert lr.profile is not None and lr.profile.features == lr.features
    assert set(lr.profile.mix) == {"known_shopper", "session", "query"}
    assert lr.profile.rows > 1_000
    # Sampled negatives stand for all candidates: the profile counts more rows than were fitted.
    assert lr.profile.rows > lr.info.get("rows", 0)
    again = LearnedRanker.from_files(lr.to_files())
    assert again.profile is not None
    np.testing.assert_array_equal(again.profile.shares, lr.profile.shares)


def test_a_replica_counts_ranked_requests_and_a_clock_off_by_a_year_shows(
        fresh: RankerService) -> None:
    m = fresh.model
    assert m.skew is not None
    assert m.skew.seen == 0, "the warm-up request is no served request"
    users = list(m.user_index)[:2 * SAMPLE_EVERY]
    gauge: list[tuple[str, dict[str, float]]] = []
    fresh.on_skew = lambda version, psi: gauge.append((version, psi))
    for u in users:
        fresh.recommend(RankQuery(user_id=u, k=10, now=T0, context=_context(T0)))
    info = fresh.model_info()
    skew = ModelInfo.model_validate(info).feature_skew
    assert skew is not None and skew.requests_ranked == len(users)
    assert skew.requests_binned == 2 and skew.sample_every == SAMPLE_EVERY
    assert set(skew.psi) == set(m.rec.learned.features)
    assert skew.request_mix["known_shopper"].live == 1.0
    assert gauge and gauge[0][0] == m.version and set(gauge[0][1]) == set(skew.psi)

    # Every request binned, in time and then with a clock a year ahead (every "days since"
    # grows by 365).
    psi = {}
    for name, ts in (("in time", T0), ("a year late", T0 + 365 * 86400.0)):
        m.skew = SkewMonitor(m.skew.profile, m.skew.columns, every=1)
        for u in users:
            fresh.recommend(RankQuery(user_id=u, k=10, now=ts, context=_context(ts)))
        psi[name] = fresh.model_info()["feature_skew"]["psi"]
    in_time = psi["in time"]["days_since_last"]
    late = psi["a year late"]
    # Measured: 0.046 in time, 2.607 a year late (32 shoppers, every request binned).
    assert in_time < PSI_MAJOR < late["days_since_last"], (in_time, late)
    # What does not depend on the request's time hardly moved (the candidates change a little:
    # buy-again and repeat timing read the clock). Measured: gnn 0.040 → 0.044, pop 0.018 →
    # 0.016, department 0.032 → 0.048, price 0.135 → 0.141.
    for f in ("gnn", "pop", "department", "price"):
        assert abs(late[f] - psi["in time"][f]) < 0.05, (f, psi["in time"][f], late[f])


def test_a_ranker_without_a_profile_says_how_to_get_one(fresh: RankerService) -> None:
    m = fresh.model
    kept, m.skew = m.skew, None  # as a version trained before profiles were kept
    try:
        out = fresh.recommend(RankQuery(user_id=next(iter(m.user_index)), k=5, now=T0))
        assert out["items"]
        skew = fresh.model_info()["feature_skew"]
        assert skew["status"] == "no profile" and "python train_job.py" in skew["detail"]
        ModelInfo.model_validate(fresh.model_info())
    finally:
        m.skew = kept



def test_the_offline_bench_asks_the_test_month_in_the_training_mix(svd_artifact_root: str) -> None:
    """bench/skew_offline.py: the version's profile against the next month's requests, drawn in
    the shares of its training requests (what a healthy deployment's PSI looks like)."""
    from bench.skew_offline import measure
    from tests.conftest import SERVING_MAX_USERS

    res = measure(svd_artifact_root, requests=200, max_users=SERVING_MAX_USERS)
    art = read_artifact(svd_artifact_root)
    assert set(res["psi"]) == set(art.learned.features)
    val, asked = res["validation_requests"], res["requests"]
    assert sum(asked.values()) == pytest.approx(200, abs=len(val))
    for task, n in asked.items():
        assert n == round(200 * val[task] / sum(val.values())), (task, asked, val)
    # Drawn in the training shares, the test month's requests have the training mix of
    # sessions and searches (within sampling noise), so a large PSI is not the mix's.
    mix = res["request_mix"]
    assert mix["known_shopper"]["live"] == pytest.approx(mix["known_shopper"]["training"], abs=0.05)
    assert mix["session"]["live"] == pytest.approx(mix["session"]["training"], abs=0.1)
    assert mix["query"]["live"] == pytest.approx(mix["query"]["training"], abs=0.1)
    # ... and no shopper withheld: the version was fitted without anonymous twins.
    assert res["anonymous_twins"] == 0
    assert res["requests_binned"] == res["requests_ranked"] == sum(asked.values()) + res[
        "anonymous_twins"]
