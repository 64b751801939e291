"""The Grafana dashboard under deploy/grafana/ reads metrics the code really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "intentrec.json"
SOURCES = [REPO / "serve_app.py", *sorted((REPO / "actors").glob("*.py"))]


def _exported_metric_names() -> set[str]:
    """Names given to ``Counter(...)``, ``Gauge(...)`` and ``Histogram(...)`` in the serving code."""
    text = "\n".join(p.read_text() for p in SOURCES)
    return set(re.findall(r"(?:Counter|Gauge|Histogram)\(\s*\"(intentrec_[a-z_]+)\"", text))


def test_every_intentrec_metric_on_the_dashboard_is_exported() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m)
            for e in exprs for m in re.findall(r"ray_(intentrec_[a-z_]+)", e)}
    exported = _exported_metric_names()
    assert {"intentrec_requests", "intentrec_impressions", "intentrec_clicks"} <= exported
    assert used and used <= exported, used - exported
    # Every metric the code exports is on the dashboard.
    assert exported <= used, exported - used


def test_the_dashboard_covers_what_an_operator_asks_first() -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("requests", "latency", "events", "model version", "click-through", "shards"):
        assert topic in titles, topic
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] == "intentrec"
