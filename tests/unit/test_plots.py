"""Operator plots (graph/plots.py) and the evaluation's progress bar."""

from __future__ import annotations

import io

import numpy as np
import pytest

from graph.evaluate import progress_bar
from graph.plots import (
    latency_cdf_figure,
    latency_cdf_png,
    metrics_chart_figure,
    metrics_chart_png,
    training_curve_figure,
    training_curve_png,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.size


def test_training_curve_is_a_png_with_and_without_validation_recall() -> None:
    history = [{"epoch": e, "loss": 0.7 / e} for e in range(1, 6)]
    plain = training_curve_png(history)
    assert plain.startswith(PNG) and min(_size(plain)) > 200
    with_val = training_curve_png([{**h, "val_recall@20": 0.1 * h["epoch"]} for h in history])
    assert with_val.startswith(PNG) and with_val != plain


def test_training_curve_draws_each_epochs_loss_and_validation_recall() -> None:
    history = [{"epoch": e, "loss": 0.7 / e} for e in range(1, 6)]
    fig = training_curve_figure(history)
    assert len(fig.axes) == 1, "no validation recall: no second axis"
    (loss,) = fig.axes[0].get_lines()
    assert list(loss.get_xdata()) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(loss.get_ydata(), [0.7 / e for e in range(1, 6)])
    assert list(fig.axes[0].get_xticks()) == [1, 2, 3, 4, 5]
    # Validation recall on epochs 2 and 4 only: drawn on a second axis at those epochs.
    fig = training_curve_figure([{**h, "val_recall@20": 0.1 * h["epoch"]} if h["epoch"] % 2 == 0
                                 else h for h in history])
    assert len(fig.axes) == 2
    (val,) = fig.axes[1].get_lines()
    assert list(val.get_xdata()) == [2, 4]
    np.testing.assert_allclose(val.get_ydata(), [0.2, 0.4])
    assert fig.axes[1].get_ylabel() == "recall@20"


def test_metrics_chart_draws_the_evaluation_table_and_refuses_an_empty_one() -> None:
    metrics = {m: {t: {"recall@20": v, "ndcg@20": v / 2} for t in ("next_basket_all", "in_session")}
               for m, v in (("popularity", 0.05), ("buy_again", 0.12), ("intentrec", 0.15))}
    png = metrics_chart_png({**metrics, "ablations": {"x": 1}})
    assert png.startswith(PNG) and _size(png)[0] > _size(png)[1]
    with pytest.raises(ValueError, match="evaluation"):
        metrics_chart_png({})


def test_metrics_chart_bars_are_the_tables_values_per_model_and_task() -> None:
    table = {"popularity": {"next_basket_all": {"recall@20": 0.05, "ndcg@20": 0.03},
                            "in_session": {"recall@20": 0.07, "ndcg@20": 0.04}},
             "intentrec": {"next_basket_all": {"recall@20": 0.15, "ndcg@20": 0.09},
                           "in_session": {"recall@20": 0.23, "ndcg@20": 0.14}},
             "ablations": {"intentrec_no_gnn": {}}}
    fig = metrics_chart_figure(table)
    assert [ax.get_title() for ax in fig.axes] == ["recall@20", "ndcg@20"]
    for ax, metric in zip(fig.axes, ("recall@20", "ndcg@20"), strict=True):
        # Models absent from the table (buy_again, itemknn) and the ablations get no bars.
        assert [c.get_label() for c in ax.containers] == ["popularity", "intentrec"]
        for bars, model in zip(ax.containers, ("popularity", "intentrec"), strict=True):
            heights = [b.get_height() for b in bars]
            np.testing.assert_allclose(
                heights, [table[model][t][metric] for t in ("next_basket_all", "in_session")])
        # Only the tasks in the table, in the schema's order, each under its own bar group.
        assert [t.get_text() for t in ax.get_xticklabels()] == ["next basket\nall",
                                                                  "in session"]


def test_latency_cdf_with_a_bound() -> None:
    png = latency_cdf_png({"serve": [1.0, 2.0, 5.0, 40.0], "in-process": [], "x": [3.0]},
                          bound_ms=50)
    assert png.startswith(PNG)


def test_latency_cdf_steps_through_the_sorted_latencies_up_to_the_bound() -> None:
    fig = latency_cdf_figure({"serve": [40.0, 1.0, 5.0, 2.0], "in-process": [], "x": [3.0]},
                             bound_ms=50)
    (ax,) = fig.axes
    serve, x, bound = ax.get_lines()[:3]  # the empty series is skipped
    assert list(serve.get_xdata()) == [1.0, 2.0, 5.0, 40.0]
    np.testing.assert_allclose(serve.get_ydata(), [0.25, 0.5, 0.75, 1.0])
    assert serve.get_label().startswith("serve (n=4, p99 39 ms")
    assert list(x.get_xdata()) == [3.0] and list(x.get_ydata()) == [1.0]
    assert list(bound.get_xdata()) == [50, 50] and bound.get_label() == "bound 50 ms"
    assert ax.get_xscale() == "log"


def test_progress_bar_counts_and_estimates_what_is_left() -> None:
    assert progress_bar(0, 100, 0.0) == "[------------------------]  0/100 requests  0%  0s"
    line = progress_bar(1_536, 4_096, 12.0)
    assert line.startswith("[#########---------------]  1,536/4,096 requests  38%  12s")
    assert line.endswith("about 20s left")
    assert progress_bar(10, 10, 3.0).endswith("100%  3s")


def test_serve_bench_plots_the_half_max_runs_from_the_load_generator_latencies() -> None:
    from bench.loadgen import LoadResult
    from bench.serve_bench import latency_cdf

    res = LoadResult.of([0.001, 0.002, 0.010], errors=0, seconds=1.0, cpu_s=0.0, status={})
    assert res.latencies_ms == [1.0, 2.0, 10.0]
    png = latency_cdf({("events", "serve", 0.5): res.latencies_ms,
                       ("events", "bound", 0.5): [0.5, 0.7],
                       ("events", "serve", 0.25): [100.0]}, 50.0)
    assert png.startswith(PNG)


def test_serve_bench_cdf_keeps_the_half_max_runs_or_every_run_when_none_ran_at_half() -> None:
    from bench.serve_bench import latency_cdf_series

    runs = {("events", "serve", 0.5): [1.0], ("events", "bound", 0.5): [0.5],
            ("recommendations", "serve", 0.5): [9.0], ("events", "serve", 0.25): [100.0]}
    assert latency_cdf_series(runs) == {"events, in-process bound": [0.5],
                                        "events, Serve app": [1.0],
                                        "recommendations, Serve app": [9.0]}
    quarter = {("events", "serve", 0.25): [100.0], ("events", "bound", 0.25): [2.0]}
    assert latency_cdf_series(quarter) == {"events, in-process bound, 0.25x max": [2.0],
                                           "events, Serve app, 0.25x max": [100.0]}


def test_serve_bench_counts_replicas_in_transition_and_ignores_running_or_stopped_ones() -> None:
    from ray.serve._private.common import ReplicaState

    from bench.serve_bench import in_transition

    states = {
        "GNNRanker": {ReplicaState.RUNNING: 1, ReplicaState.STARTING: 1},
        "Ingress": {ReplicaState.RUNNING: 1, ReplicaState.STOPPED: 2},
        "ContextEnricher": {"RUNNING": 1, "STOPPING": 1, "UPDATING": 0},
    }
    assert in_transition(states) == {"GNNRanker": {"STARTING": 1},
                                     "ContextEnricher": {"STOPPING": 1}}
    assert in_transition({"GNNRanker": {ReplicaState.RUNNING: 2}}) == {}


def test_serve_bench_verdict_judges_the_ranker_targets_on_the_worst_concurrency() -> None:
    from bench.serve_bench import verdict

    def row(ep: str, c: int, target: str, rps: float, cpu: float) -> dict[str, object]:
        return {"endpoint": ep, "concurrency": c, "target": target, "throughput": rps,
                "errors": 0, "server_cpu_ms_per_req": cpu}

    rows = [row("recommendations", 1, "serve", 90.0, 13.9), row("recommendations", 1, "bound", 300.0, 2.9),
            row("recommendations", 8, "serve", 152.0, 7.5), row("recommendations", 8, "bound", 377.0, 2.6),
            row("events", 8, "serve", 500.0, 2.0), row("events", 8, "bound", 1600.0, 0.5)]
    v = verdict(rows, [])
    rec = v["recommendations"]
    assert abs(rec["ratio_c8"] - 152.0 / 377.0) < 1e-9
    # 0.40 passes the serving issue's 0.25 and fails the ranker issue's 0.6
    assert rec["ratio_c8_ok"] is True and rec["ratio_c8_ranker_ok"] is False
    # the worst concurrency decides: c=1's 13.9 ms fails Serve's 8 ms although c=8 is under it
    assert rec["serve_cpu_ms_worst"] == 13.9 and rec["serve_cpu_ok"] is False
    assert rec["bound_cpu_ms_worst"] == 2.9 and rec["bound_cpu_ok"] is True
    # the ranker's targets are for recommendations only
    assert "serve_cpu_ok" not in v["events"] and "ratio_c8_ranker_ok" not in v["events"]
    faster = [r if r["target"] == "bound" else {**r, "server_cpu_ms_per_req": 7.9} for r in rows
              if r["endpoint"] == "recommendations"]
    assert verdict(faster, [])["recommendations"]["serve_cpu_ok"] is True
