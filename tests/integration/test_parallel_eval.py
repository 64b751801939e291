"""The evaluation's Ray actor pool (graph/parallel.py) ranks exactly as the driver does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from graph import schema as S
from graph.evaluate import evaluate, recommender_rankings, validation_tasks
from graph.interactions import Interactions
from graph.parallel import ranking_pool
from graph.ranker_fit import fit_on_validation
from graph.recommend import Recommender
from graph.signals import RankingSignals
from graph.tasks import QueryBatch, in_session_tasks, next_basket_tasks
from tests.unit.test_evaluate import CUT, setup

Fitted = tuple[pd.DataFrame, pd.DataFrame, Interactions, RankingSignals, Recommender]

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    return setup()


def test_pool_rankings_equal_the_driver_loop_for_every_task_and_ranker(fitted: Fitted) -> None:
    train, test, inter, _, rec = fitted
    nb_all, nb_disc = next_basket_tasks(train, test, inter, CUT)
    ins, blind = in_session_tasks(test, inter, country="US")
    other = fit_on_validation(rec, _validation(train, inter), seed=3, ablations=("no_session",),
                              progress=lambda _: None)["no_session"]
    rankers = {"intentrec": rec.learned, "intentrec_no_session": other}
    with ranking_pool(rec, workers=2) as pool:
        assert pool is not None and pool.size == 2
        for q in (nb_all, nb_disc, ins, blind):
            assert len(q) > 3
            # batch=3: many chunks, finishing out of order on two actors.
            mine, mine_report = recommender_rankings(rec, q, rankers, 10, batch=3)
            before = pool.answered
            theirs, their_report = recommender_rankings(rec, q, rankers, 10, batch=3, pool=pool)
            assert pool.answered - before == -(-len(q) // 3)  # every chunk went to an actor
            assert set(theirs) == set(rankers)
            for name in rankers:
                np.testing.assert_array_equal(theirs[name], mine[name])
            assert their_report == mine_report
            assert (mine["intentrec"] >= 0).any()


def test_evaluate_with_a_pool_gives_the_same_metrics(fitted: Fitted) -> None:
    train, test, inter, _, rec = fitted
    without = evaluate(train, test, inter, rec, CUT, progress=lambda _: None, k=10)
    with ranking_pool(rec, workers=2) as pool:
        with_pool = evaluate(train, test, inter, rec, CUT, progress=lambda _: None, k=10,
                             pool=pool)
        assert pool is not None and pool.answered > 0
    assert with_pool == without


def test_no_pool_below_two_workers(fitted: Fitted) -> None:
    *_, rec = fitted
    with ranking_pool(rec, workers=1) as pool:
        assert pool is None


def _validation(train: pd.DataFrame, inter: Interactions) -> list[QueryBatch]:
    val_cut = CUT - pd.Timedelta(days=21)
    hist, window = train[train[S.TS_COL] < val_cut], train[train[S.TS_COL] >= val_cut]
    return validation_tasks(hist, window, inter, val_cut, country="US")


def test_signals_fitted_in_a_ray_task_equal_the_drivers_and_are_writable(fitted: Fitted) -> None:
    import dataclasses

    import scipy.sparse as sp

    from graph.pipeline import signals_in_background
    from graph.signals import fit_signals

    train, _, inter, _, _ = fitted
    wait = signals_in_background(train, inter)
    mine, theirs = fit_signals(train, inter), wait()
    for f in dataclasses.fields(mine):
        a, b = getattr(mine, f.name), getattr(theirs, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(b, a, err_msg=f.name)
            assert b.flags.writeable, f.name
        elif sp.issparse(a):
            assert (a != b).nnz == 0, f.name
        else:
            assert b == a, f.name
