"""Operator plots (graph/plots.py) and the evaluation's progress bar."""

from __future__ import annotations

import io

import pytest

from graph.evaluate import progress_bar
from graph.plots import latency_cdf_png, metrics_chart_png, training_curve_png

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


def test_metrics_chart_draws_the_evaluation_table_and_refuses_an_empty_one() -> None:
    metrics = {m: {t: {"recall@20": v, "ndcg@20": v / 2} for t in ("next_basket_all", "in_session")}
               for m, v in (("popularity", 0.05), ("buy_again", 0.12), ("intentrec", 0.15))}
    png = metrics_chart_png({**metrics, "ablations": {"x": 1}})
    assert png.startswith(PNG) and _size(png)[0] > _size(png)[1]
    with pytest.raises(ValueError, match="evaluation"):
        metrics_chart_png({})


def test_latency_cdf_with_a_bound() -> None:
    png = latency_cdf_png({"serve": [1.0, 2.0, 5.0, 40.0], "in-process": [], "x": [3.0]},
                          bound_ms=50)
    assert png.startswith(PNG)


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
