"""Plots an operator looks at: the training curve and the evaluation metrics of a model version
(saved next to its ``metrics.json``), and the serving benchmark's latency CDF.

matplotlib's object API on the Agg canvas: no display, no pyplot global state, safe in Ray
workers and threads. Each function returns PNG bytes, so the caller writes them wherever the
artifact lives (a local folder or a pyarrow URI).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from graph import schema as S

TRAINING_CURVE = "training_curve.png"
METRICS_CHART = "metrics.png"
# The metrics of the bar chart, one panel each.
CHART_METRICS = ("recall@20", "ndcg@20")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def training_curve_png(history: Sequence[Mapping[str, Any]], title: str = "") -> bytes:
    """:func:`training_curve_figure` as PNG bytes."""
    return _png(training_curve_figure(history, title))


def training_curve_figure(history: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """Loss per epoch (left axis) and, when the history has it, validation recall (right axis).

    Args:
        history: One dict per epoch with ``epoch`` and ``loss`` (``graph.train_loop`` reports),
            optionally ``val_recall@20``.

    Returns:
        The matplotlib ``Figure`` (first axes: the loss; a twin axes: validation recall).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    epochs = [int(h["epoch"]) for h in history]
    ax.plot(epochs, [float(h["loss"]) for h in history], marker="o", color="#0b6bcb",
            label="training loss (BPR)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    val = [(e, float(h[S.VAL_METRIC])) for e, h in zip(epochs, history, strict=True)
           if S.VAL_METRIC in h]
    if val:
        ax2 = ax.twinx()
        ax2.plot([e for e, _ in val], [v for _, v in val], marker="s", color="#1a7f37",
                 label="validation recall@20")
        ax2.set_ylabel("recall@20")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left" if val else "best")
    ax.set_title(title or "training curve")
    if epochs:
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: math.ceil(len(epochs) / 20)])
    return fig


def metrics_chart_png(metrics: Mapping[str, Any], title: str = "") -> bytes:
    """:func:`metrics_chart_figure` as PNG bytes."""
    return _png(metrics_chart_figure(metrics, title))


def metrics_chart_figure(metrics: Mapping[str, Any], title: str = "") -> Any:
    """Grouped bars: every model of ``metrics.json`` on every task, one panel per metric of
    :data:`CHART_METRICS`. Models or tasks missing from ``metrics`` are left out.

    Returns:
        The matplotlib ``Figure``: one axes per metric, one bar container per model (labelled
        with the model's name), one bar per task in :data:`graph.schema.TASKS` order.

    Raises:
        ValueError: ``metrics`` holds no model's task metrics (an evaluation was skipped).
    """
    from matplotlib.figure import Figure

    models = [m for m in S.MODEL_NAMES if isinstance(metrics.get(m), Mapping)]
    tasks = [t for t in S.TASKS if any(t in metrics[m] for m in models)]
    if not models or not tasks:
        raise ValueError("metrics has no evaluation table to chart (was the evaluation skipped?)")
    fig = Figure(figsize=(5.0 * len(CHART_METRICS), 3.8))
    width = 0.8 / len(models)
    colors = ("#8c959f", "#bf8700", "#8250df", "#0b6bcb")
    for n, metric in enumerate(CHART_METRICS):
        ax = fig.add_subplot(1, len(CHART_METRICS), n + 1)
        for j, model in enumerate(models):
            vals = [float(metrics[model].get(t, {}).get(metric, float("nan"))) for t in tasks]
            ax.bar([i + (j - (len(models) - 1) / 2) * width for i in range(len(tasks))], vals,
                   width, label=model, color=colors[j % len(colors)])
        ax.set_xticks(range(len(tasks)), [_task_label(t) for t in tasks], fontsize=8)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
        if n == 0:
            ax.legend(fontsize=8)
    fig.suptitle(title or "offline evaluation (higher is better)")
    return fig


def _task_label(task: str) -> str:
    """``next_basket_discovery`` → ``next basket\ndiscovery`` (two short lines under a bar group)."""
    words = task.replace("_", " ")
    for head in ("next basket ", "in session "):
        if words.startswith(head):
            return head.strip() + "\n" + words[len(head):]
    return words


def latency_cdf_png(samples_ms: Mapping[str, Sequence[float]], bound_ms: float | None = None,
                    title: str = "") -> bytes:
    """:func:`latency_cdf_figure` as PNG bytes."""
    return _png(latency_cdf_figure(samples_ms, bound_ms, title))


def latency_cdf_figure(samples_ms: Mapping[str, Sequence[float]], bound_ms: float | None = None,
                       title: str = "") -> Any:
    """Cumulative distribution of request latencies, one curve per series, log-scaled time axis,
    with an optional vertical line at the latency bound.

    Args:
        samples_ms: Series name → latencies in milliseconds (empty series are skipped).
        bound_ms: The target (e.g. the p99 bound) drawn as a dashed line.

    Returns:
        The matplotlib ``Figure``: one step line per non-empty series, then the bound's line.
    """
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for name, values in samples_ms.items():
        xs = np.sort(np.asarray(values, dtype=np.float64))
        if len(xs) == 0:
            continue
        ys = np.arange(1, len(xs) + 1) / len(xs)
        ax.step(xs, ys, where="post", label=f"{name} (n={len(xs):,}, p99 "
                f"{np.percentile(xs, 99):.0f} ms)")
    if bound_ms is not None:
        ax.axvline(bound_ms, color="#b42318", linestyle="--", label=f"bound {bound_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    for q in (0.5, 0.99):
        ax.axhline(q, color="#d0d7de", linewidth=0.8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "latency CDF")
    return fig
