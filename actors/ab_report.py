"""``python -m actors.ab_report``: a readable A/B comparison of model versions from the feedback
counters (:mod:`actors.feedback`): impressions, clicks and add-to-carts per ``model_version``.

Two sources::

    # Ray's Prometheus endpoint on every node (ray start --metrics-export-port=8080): counts
    # since the ingress replicas started, summed over the nodes given
    python -m actors.ab_report --metrics http://head:8080/metrics --metrics http://worker:8080/metrics
    # a Prometheus server that scrapes them: the increase over a window
    python -m actors.ab_report --prometheus http://prometheus:9090 --window 24h

For each version it prints the counts and the click-through and add-to-cart rates (per item
shown); for the treatment against the control, the difference of the rates with a 95% two-
proportion (Wald) confidence interval, and whether it excludes zero. The interval treats every
impression as an independent trial; the items of one answer, and one shopper's answers, are
correlated, so it is narrower than the truth: read a difference whose interval barely excludes
zero as "not yet".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import httpx

from actors.feedback import UNKNOWN_VERSION

COUNTERS = ("impressions", "clicks", "add_to_cart")
# Ray prefixes application metrics with ray_ and Prometheus counters end in _total.
_FAMILY = {f"ray_intentrec_{c}": c for c in COUNTERS}
Counts = dict[str, dict[str, float]]  # model_version -> counter -> value


@dataclass(frozen=True)
class Arm:
    """One version's counts and rates (rates per item shown; None without impressions)."""

    version: str
    impressions: int
    clicks: int
    add_to_cart: int

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.impressions if self.impressions else None

    @property
    def atc_rate(self) -> float | None:
        return self.add_to_cart / self.impressions if self.impressions else None


@dataclass(frozen=True)
class Difference:
    """Treatment rate minus control rate, with its confidence interval."""

    metric: str
    control: float
    treatment: float
    diff: float
    low: float
    high: float
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def two_proportion_interval(x_c: int, n_c: int, x_t: int, n_t: int,
                            confidence: float = 0.95) -> tuple[float, float, float]:
    """``p_t - p_c`` and its Wald interval: ``± z * sqrt(p_c(1-p_c)/n_c + p_t(1-p_t)/n_t)``.

    Raises:
        ValueError: An arm without trials (``n`` of 0).
    """
    if n_c <= 0 or n_t <= 0:
        raise ValueError(f"both arms need impressions (control {n_c}, treatment {n_t})")
    p_c, p_t = x_c / n_c, x_t / n_t
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * math.sqrt(p_c * (1 - p_c) / n_c + p_t * (1 - p_t) / n_t)
    diff = p_t - p_c
    return diff, diff - half, diff + half


def counts_from_exposition(texts: Iterable[str]) -> Counts:
    """Sum the feedback counters by ``model_version`` over Prometheus text expositions (one per
    node; every replica's series are added)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Counts = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            name = _FAMILY.get(family.name.removesuffix("_total"))
            if name is None:
                continue
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                version = s.labels.get("model_version", UNKNOWN_VERSION)
                per = out.setdefault(version, dict.fromkeys(COUNTERS, 0.0))
                per[name] += s.value
    return out


def counts_from_prometheus(base_url: str, window: str, client: httpx.Client) -> Counts:
    """The counters' increase over ``window`` (a PromQL duration such as ``24h``) by
    ``model_version``, from a Prometheus server's query API."""
    out: Counts = {}
    for name in COUNTERS:
        query = (f"sum by (model_version) "
                 f"(increase(ray_intentrec_{name}_total[{window}]))")
        r = client.get(base_url.rstrip("/") + "/api/v1/query", params={"query": query})
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {query!r}: {body.get('error', body)}")
        for row in body["data"]["result"]:
            version = row["metric"].get("model_version", UNKNOWN_VERSION)
            per = out.setdefault(version, dict.fromkeys(COUNTERS, 0.0))
            per[name] += float(row["value"][1])
    return out


@dataclass(frozen=True)
class Report:
    arms: list[Arm]
    control: str | None
    treatment: str | None
    differences: list[Difference]
    unattributed: dict[str, int]


def compare(counts: Counts, control: str | None = None, treatment: str | None = None,
            confidence: float = 0.95) -> Report:
    """The A/B comparison of two versions (default: the two with the most impressions, the
    larger one the control, as the main version of a split gets the larger share)."""
    arms = sorted((Arm(v, *(round(c[k]) for k in COUNTERS)) for v, c in counts.items()
                   if v != UNKNOWN_VERSION), key=lambda a: (-a.impressions, a.version))
    unknown = counts.get(UNKNOWN_VERSION, {})
    unattributed = {k: round(unknown.get(k, 0.0)) for k in COUNTERS[1:]}
    by_version = {a.version: a for a in arms}
    for name, v in (("control", control), ("treatment", treatment)):
        if v is not None and v not in by_version:
            raise ValueError(f"--{name} {v!r} has no counts; versions seen: {sorted(by_version)}")
    shown = [a.version for a in arms if a.impressions > 0]
    control = control or next((v for v in shown if v != treatment), None)
    treatment = treatment or next((v for v in shown if v != control), None)
    diffs: list[Difference] = []
    if control is not None and treatment is not None:
        c, t = by_version[control], by_version[treatment]
        if c.impressions and t.impressions:
            for metric, x_c, x_t in (("click-through", c.clicks, t.clicks),
                                     ("add-to-cart", c.add_to_cart, t.add_to_cart)):
                d, lo, hi = two_proportion_interval(x_c, c.impressions, x_t, t.impressions,
                                                    confidence)
                diffs.append(Difference(metric, x_c / c.impressions, x_t / t.impressions,
                                        d, lo, hi, confidence))
    return Report(arms, control, treatment, diffs, unattributed)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render(report: Report) -> str:
    """The report as a plain-text table."""
    lines = [f"{'model_version':<28} {'impressions':>12} {'clicks':>8} {'CTR':>8} "
             f"{'add_to_cart':>12} {'ATC rate':>9}"]
    for a in report.arms:
        role = (" (control)" if a.version == report.control
                else " (treatment)" if a.version == report.treatment else "")
        lines.append(f"{(a.version + role)[:28]:<28} {a.impressions:>12,} {a.clicks:>8,} "
                     f"{_pct(a.ctr):>8} {a.add_to_cart:>12,} {_pct(a.atc_rate):>9}")
    if not report.differences:
        lines.append("no comparison: two versions with impressions are needed")
    for d in report.differences:
        verdict = ("the interval excludes 0" if d.excludes_zero
                   else "the interval includes 0: no difference shown yet")
        lines.append(f"{d.metric}: {report.treatment} - {report.control} = "
                     f"{100 * d.diff:+.2f} points, {100 * d.confidence:.0f}% CI "
                     f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}] ({verdict})")
    if any(report.unattributed.values()):
        lines.append(f"not attributed to a version (answer unknown to the ingress replica): "
                     f"{report.unattributed['clicks']} clicks, "
                     f"{report.unattributed['add_to_cart']} add-to-carts")
    lines.append("rates are per item shown; the interval counts every impression as an "
                 "independent trial, so it is optimistic")
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    return {"arms": [{**asdict(a), "ctr": a.ctr, "atc_rate": a.atc_rate} for a in report.arms],
            "control": report.control, "treatment": report.treatment,
            "differences": [{**asdict(d), "excludes_zero": d.excludes_zero}
                            for d in report.differences],
            "unattributed": report.unattributed}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m actors.ab_report", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--metrics", action="append", metavar="URL",
                     help="Ray's Prometheus endpoint of a node (repeat for every node)")
    src.add_argument("--prometheus", metavar="URL", help="a Prometheus server's base URL")
    p.add_argument("--window", default="24h",
                   help="with --prometheus: the PromQL duration to compare over (default 24h)")
    p.add_argument("--control", help="the control version (default: most impressions)")
    p.add_argument("--treatment", help="the treatment version (default: the next one)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="confidence of the interval, between 0 and 1 (default 0.95)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if not 0.0 < args.confidence < 1.0:
        p.error(f"--confidence ({args.confidence}) must be between 0 and 1, e.g. 0.95")
    with httpx.Client(timeout=30.0) as client:
        if args.prometheus:
            counts = counts_from_prometheus(args.prometheus, args.window, client)
        else:
            texts = []
            for url in args.metrics:
                r = client.get(url)
                r.raise_for_status()
                texts.append(r.text)
            counts = counts_from_exposition(texts)
    try:
        report = compare(counts, args.control, args.treatment, args.confidence)
    except ValueError as exc:
        p.error(str(exc))
    print(json.dumps(as_json(report), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
