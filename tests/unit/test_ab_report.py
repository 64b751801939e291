"""The A/B report (actors/ab_report.py): counts from Prometheus text and from Prometheus' query
API, rates, and the two-proportion interval."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from actors.ab_report import (
    compare,
    counts_from_exposition,
    counts_from_prometheus,
    main,
    render,
    two_proportion_interval,
)

# What Ray's metrics agent serves: one series per ingress replica and position.
EXPOSITION = """\
# HELP ray_intentrec_impressions_total Items shown in recommendation responses
# TYPE ray_intentrec_impressions_total counter
ray_intentrec_impressions_total{model_version="A",position="1",ReplicaId="r1"} 600.0
ray_intentrec_impressions_total{model_version="A",position="2",ReplicaId="r2"} 400.0
ray_intentrec_impressions_total{model_version="B",position="1",ReplicaId="r1"} 1000.0
# HELP ray_intentrec_clicks_total Click events credited to a response
# TYPE ray_intentrec_clicks_total counter
ray_intentrec_clicks_total{model_version="A",position="1",ReplicaId="r1"} 70.0
ray_intentrec_clicks_total{model_version="A",position="2",ReplicaId="r2"} 30.0
ray_intentrec_clicks_total{model_version="B",position="1",ReplicaId="r1"} 130.0
ray_intentrec_clicks_total{model_version="unknown",position="none",ReplicaId="r2"} 4.0
# HELP ray_intentrec_add_to_cart_total Add-to-cart events credited to a response
# TYPE ray_intentrec_add_to_cart_total counter
ray_intentrec_add_to_cart_total{model_version="A",position="1",ReplicaId="r1"} 20.0
ray_intentrec_add_to_cart_total{model_version="B",position="3",ReplicaId="r1"} 21.0
# HELP ray_intentrec_requests_total HTTP requests
# TYPE ray_intentrec_requests_total counter
ray_intentrec_requests_total{endpoint="model",status="200"} 9.0
"""


def test_counts_are_summed_over_replicas_and_nodes() -> None:
    counts = counts_from_exposition([EXPOSITION, EXPOSITION.replace("130.0", "0.0")])
    assert counts["A"] == {"impressions": 2000, "clicks": 200, "add_to_cart": 40}
    assert counts["B"] == {"impressions": 2000, "clicks": 130, "add_to_cart": 42}
    assert counts["unknown"]["clicks"] == 8


def test_interval_matches_the_textbook_numbers() -> None:
    # 100/1000 against 130/1000: difference 0.03, se sqrt(.1*.9/1000 + .13*.87/1000) = 0.014251.
    diff, low, high = two_proportion_interval(100, 1000, 130, 1000)
    assert diff == pytest.approx(0.03)
    assert (low, high) == (pytest.approx(0.002068, abs=1e-6), pytest.approx(0.057932, abs=1e-6))
    _, low99, high99 = two_proportion_interval(100, 1000, 130, 1000, confidence=0.99)
    assert low99 < 0 < high99  # not significant at 99%
    with pytest.raises(ValueError, match="impressions"):
        two_proportion_interval(1, 0, 1, 10)


def test_report_names_control_treatment_rates_and_verdict() -> None:
    report = compare(counts_from_exposition([EXPOSITION]))
    assert (report.control, report.treatment) == ("A", "B")  # tie on impressions: by name
    ctr, atc = report.differences
    assert (ctr.control, ctr.treatment) == (0.1, 0.13) and ctr.excludes_zero
    assert (atc.control, atc.treatment) == (0.02, 0.021) and not atc.excludes_zero
    text = render(report)
    assert "A (control)" in text and "B (treatment)" in text and "13.00%" in text
    assert "+3.00 points, 95% CI [+0.21, +5.79] (the interval excludes 0)" in text
    assert "no difference shown yet" in text  # the add-to-cart line
    assert "4 clicks" in text  # unattributed, said so
    swapped = compare(counts_from_exposition([EXPOSITION]), control="B", treatment="A")
    assert swapped.differences[0].diff == pytest.approx(-0.03)
    with pytest.raises(ValueError, match="versions seen"):
        compare(counts_from_exposition([EXPOSITION]), control="C")


def test_one_version_only_says_there_is_nothing_to_compare() -> None:
    one = "\n".join(line for line in EXPOSITION.splitlines() if 'model_version="B"' not in line)
    report = compare(counts_from_exposition([one + "\n"]))
    assert report.differences == [] and "two versions with impressions" in render(report)


def test_prometheus_source_queries_the_increase_over_the_window(
        capsys: pytest.CaptureFixture[str]) -> None:
    queries: list[str] = []
    values = {"impressions": ("1000", "1000"), "clicks": ("100", "130"),
              "add_to_cart": ("20", "21")}

    def handler(request: httpx.Request) -> httpx.Response:
        q = request.url.params["query"]
        queries.append(q)
        name = next(n for n in values if f"ray_intentrec_{n}_total[6h]" in q)
        a, b = values[name]
        return httpx.Response(200, json={"status": "success", "data": {
            "resultType": "vector", "result": [
                {"metric": {"model_version": "A"}, "value": [0, a]},
                {"metric": {"model_version": "B"}, "value": [0, b]}]}})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        counts = counts_from_prometheus("http://prom:9090/", "6h", client)
    assert queries[0] == "sum by (model_version) (increase(ray_intentrec_impressions_total[6h]))"
    assert counts["B"] == {"impressions": 1000, "clicks": 130, "add_to_cart": 21}


def test_cli_reads_metrics_endpoints(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    real_client = httpx.Client

    def client(**kw: Any) -> httpx.Client:
        return real_client(transport=httpx.MockTransport(
            lambda r: httpx.Response(200, text=EXPOSITION)), **kw)

    monkeypatch.setattr(httpx, "Client", client)
    assert main(["--metrics", "http://127.0.0.1:8080/metrics", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["control"] == "A" and out["differences"][0]["excludes_zero"] is True
    with pytest.raises(SystemExit):
        main(["--metrics", "http://127.0.0.1:8080/metrics", "--confidence", "95"])
    assert "--confidence (95.0) must be between 0 and 1" in capsys.readouterr().err
