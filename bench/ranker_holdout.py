"""Held-out validation recall of candidate-generation and ranker variants (never the test split).

What ``train_job.py`` does to fit its ranker, on a split of the validation window's shoppers: the
GNN is trained on the events before the validation cut (Ray Train, as in the job; cached in
``--emb-cache`` so later runs skip it), the LightGBM ranker is fitted on the validation requests
of three quarters of the shoppers, and recall@20 is measured on the requests of the other quarter
through the served path (candidates, features, cascade). A variant overrides module constants
(``--set graph.retrieval.PEERS_K=200``) and LightGBM parameters (``--param num_leaves=63``), or
fits its ranker as one of the job's ablations (``--ablation ctx:no_context``);
``--variant`` runs several in one process, each with its own candidates and ranker, on the same
held-out shoppers. This is how changes are chosen without looking at the test split. A constant
only reaches the code that reads it at call time: one used as a function's default argument is
bound at import, and setting it changes nothing (a variant identical to the base is the sign).

    python bench/ranker_holdout.py --variant base --variant peers200 \
        --set peers200:graph.retrieval.PEERS_K=200
    python bench/ranker_holdout.py --cascade 'three=((20, 100), (80, 50))'

Besides the four tasks it measures the held-out shoppers' in-session baskets again without the
shopper (``anonymous_session``, ``cold_start``: :func:`graph.evaluate.anonymous_tasks`), and
prints the best baseline of each task under the variants.

``--cascade`` ranks the held-out requests with other early-exit stages (and every tree on every
candidate) using the same fitted ranker, so their difference is the cascade's alone.

Prints one row per variant and task and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import pickle
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HELD_OUT_SHARE = 0.25


@contextmanager
def overridden(settings: list[tuple[str, str]]) -> Iterator[None]:
    """Module constants set to new values (``module.NAME``, a Python literal) for the block."""
    old = []
    for target, value in settings:
        mod_name, _, name = target.rpartition(".")
        mod = importlib.import_module(mod_name)
        if not hasattr(mod, name):
            raise SystemExit(f"--set {target}: {mod_name} has no {name}")
        old.append((mod, name, getattr(mod, name)))
        setattr(mod, name, ast.literal_eval(value))
    try:
        yield
    finally:
        for mod, name, value in reversed(old):
            setattr(mod, name, value)


def embeddings(d: Any, cache: Path, epochs: int | None,
               gnn: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The GNN's embeddings trained on events before the validation cut (as ``train_job.py``),
    with ``gnn`` overriding :class:`~graph.config.TrainConfig` fields."""
    if cache.exists():
        with cache.open("rb") as f:
            return pickle.load(f)  # our own file, written below
    import train_job
    from graph.config import TrainConfig
    from graph.train_loop import fit, format_progress

    train_job.init_ray(None)
    # A checkpoint folder per cache: a run of the same name would resume another's checkpoint.
    cfg = TrainConfig(storage_path=str(cache.parent.resolve() / f"ckpt_{cache.stem}"),
                      **({"epochs": epochs} if epochs else {}), **(gnn or {}))
    res = fit(d.inter_fit, cfg, progress=lambda m: print("[train] " + format_progress(m)))
    emb = (res.user_emb, res.item_emb)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as f:
        pickle.dump(emb, f)
    return emb


def run(variants: dict[str, dict[str, Any]], emb_cache: Path, epochs: int | None,
        seed: int = 0, cascades: dict[str, str] | None = None,
        gnn: dict[str, Any] | None = None,
        signal_params: dict[str, Any] | None = None) -> dict[str, Any]:
    import numpy as np

    from graph import ltr, ranker_fit
    from graph.evaluate import (
        BASELINES,
        anonymous_tasks,
        recommender_rankings,
        task_rankings,
        validation_tasks,
    )
    from graph.features import item_features
    from graph.ltr import fit_ranker
    from graph.metrics import summarize
    from graph.pipeline import PipelineConfig, prepare_data
    from graph.ranking import Ranker
    from graph.recommend import Recommender
    from graph.signals import SignalParams, fit_signals
    from graph.text import ItemText

    d = prepare_data(PipelineConfig())
    fit_emb = embeddings(d, emb_cache, epochs, gnn)
    text = ItemText.build(d.ds.items, progress=lambda m: None)
    ranker = Ranker(*fit_emb, fit_signals(d.fit_part, d.inter_full,
                                          params=SignalParams(**(signal_params or {}))))
    static = item_features(d.fit_part, d.ds.items, ranker)
    tasks = validation_tasks(d.fit_part, d.val_part, d.inter_full, d.val_cut,
                             country=ranker.signals.params.country, seed=seed)
    users = np.unique(np.concatenate([q.users for q in tasks]))
    held = np.random.default_rng(seed + 7).choice(users, int(len(users) * HELD_OUT_SHARE),
                                                  replace=False)
    fit_b = [q.take(np.flatnonzero(~np.isin(q.users, held))) for q in tasks]
    eval_b = [q.take(np.flatnonzero(np.isin(q.users, held))) for q in tasks]
    # The held-out shoppers' baskets again with the shopper withheld (graph.evaluate.anonymous_tasks).
    by_name = {q.name: q for q in eval_b}
    anonymous = anonymous_tasks(by_name["in_session"], by_name["in_session_blind"])
    print(f"[holdout] fitting on {sum(map(len, fit_b)):,} requests, measuring on "
          f"{sum(map(len, eval_b)):,} ({len(held):,} held-out shoppers), and "
          f"{sum(map(len, anonymous)):,} of them without their shopper")
    cascades = cascades or {}
    out: dict[str, Any] = {}
    for name, v in variants.items():
        t0 = time.perf_counter()
        with overridden(v["set"]):
            rec = Recommender.build(d.ds.items, ranker, static, text=text)
            rng = np.random.default_rng(seed)
            vr = ranker_fit.validation_requests(fit_b, rec.catalogue.categories,
                                                rec.catalogue.titles, rng)
            tr, va = ranker_fit.fit_sets(rec, vr.requests, vr.targets, rng, shoppers=vr.shoppers)
            lr = fit_ranker(tr.data, va.data, ablation=v["ablation"],
                            sources=tr.sources, valid_sources=va.sources, seed=seed,
                            params=v["params"], progress=print)
            rows = {}
            by_cascade: dict[str, dict[str, Any]] = {}
            for q in [*eval_b, *anonymous]:
                ranked, report, base = task_rankings(rec, q, {name: lr}, 20,
                                                     baselines=list(BASELINES))
                m = summarize(ranked[name], q.targets, 20)
                rows[q.name] = {"recall@20": m["recall@20"], "ndcg@20": m["ndcg@20"],
                                "candidate_recall": report["candidate_recall"],
                                "candidates": report["candidates"], "n": len(q),
                                "baselines": {b: summarize(top, q.targets, 20)["recall@20"]
                                              for b, top in base.items()}}
                if not cascades:
                    continue
                # The same ranker under other cascades, against every tree on every candidate.
                with overridden([("graph.ltr.CASCADE", "()")]):
                    whole = recommender_rankings(rec, q, {name: lr}, 20)[0][name]
                for cname, stages in [("shipped", None), *cascades.items()]:
                    with overridden([] if stages is None else [("graph.ltr.CASCADE", stages)]):
                        top = recommender_rankings(rec, q, {name: lr}, 20)[0][name]
                    same = [len(np.intersect1d(a[a >= 0], b[b >= 0])) / max((b >= 0).sum(), 1)
                            for a, b in zip(top, whole, strict=True)]
                    by_cascade.setdefault(cname, {"stages": stages or repr(ltr.CASCADE)})[q.name] = {
                        "recall@20": summarize(top, q.targets, 20)["recall@20"],
                        "whole_model_recall@20": summarize(whole, q.targets, 20)["recall@20"],
                        "top20_same_as_whole_model": float(np.mean(same))}
        out[name] = {"set": v["set"], "params": v["params"],
                     "ablation": v["ablation"], "rounds": lr.info["rounds"],
                     "tasks": rows, "seconds": round(time.perf_counter() - t0, 1)}
        if by_cascade:
            out[name]["cascades"] = by_cascade
        print(f"[holdout] {name} done in {out[name]['seconds']:.0f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--variant", action="append", default=[],
                   help="a variant's name (repeatable; default: one named base)")
    p.add_argument("--set", action="append", default=[], metavar="VARIANT:MODULE.NAME=VALUE",
                   help="a module constant of a variant (a Python literal)")
    p.add_argument("--param", action="append", default=[], metavar="VARIANT:KEY=VALUE",
                   help="a LightGBM parameter of a variant")
    p.add_argument("--ablation", action="append", default=[], metavar="VARIANT:NAME",
                   help="fit a variant's ranker as an ablation of graph.ltr.ABLATIONS (its "
                        "features and candidate sources left out, e.g. no_context)")
    p.add_argument("--cascade", action="append", default=[], metavar="NAME=STAGES",
                   help="also rank with these cascade stages (graph.ltr.CASCADE, e.g. "
                        "'three=((20, 100), (80, 50))') and compare with the shipped one and the "
                        "whole model, on the same fitted ranker")
    p.add_argument("--epochs", type=int, default=None, help="GNN epochs (default: the job's)")
    p.add_argument("--gnn", action="append", default=[], metavar="KEY=VALUE",
                   help="a GNN training setting (graph.config.TrainConfig, e.g. batch_size=16384); "
                        "give another --emb-cache with it")
    p.add_argument("--signals", action="append", default=[], metavar="KEY=VALUE",
                   help="a signal setting for every variant of the run (graph.signals."
                        "SignalParams, e.g. ease_lambda=200.0): the signals are fitted once per "
                        "run, so compare with a run without it")
    p.add_argument("--emb-cache", default=str(REPO / ".holdout" / "fit_emb.pkl"),
                   help="the GNN embeddings before the validation cut (trained when missing)")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the held-out shoppers, the validation tasks' sampling and the "
                        "ranker's fit: other seeds give other held-out quarters to check a "
                        "difference on")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "ranker_holdout.json"))
    opts = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    names = opts.variant or ["base"]
    variants: dict[str, dict[str, Any]] = {n: {"set": [], "params": {}, "ablation": "full"}
                                           for n in names}
    for spec, key in [(s, "set") for s in opts.set] + [(s, "params") for s in opts.param]:
        name, _, rest = spec.partition(":")
        target, eq, value = rest.partition("=")
        if name not in variants or not eq:
            raise SystemExit(f"--{'set' if key == 'set' else 'param'} {spec!r}: write "
                             f"VARIANT:NAME=VALUE with VARIANT one of {names}")
        if key == "set":
            variants[name]["set"].append((target, value))
        else:
            try:
                variants[name]["params"][target] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                variants[name]["params"][target] = value
    from graph.ltr import ABLATIONS

    for spec in opts.ablation:
        name, _, ablation = spec.partition(":")
        if name not in variants or ablation not in ABLATIONS:
            raise SystemExit(f"--ablation {spec!r}: write VARIANT:NAME with VARIANT one of {names} "
                             f"and NAME one of {sorted(ABLATIONS)}")
        variants[name]["ablation"] = ablation
    cascades = dict(c.split("=", 1) for c in opts.cascade)
    gnn = {k: ast.literal_eval(v) for k, _, v in (g.partition("=") for g in opts.gnn)}
    signal_params = {k: ast.literal_eval(v)
                     for k, _, v in (g.partition("=") for g in opts.signals)}
    res = run(variants, Path(opts.emb_cache), opts.epochs, seed=opts.seed, cascades=cascades,
              gnn=gnn, signal_params=signal_params)
    tasks = list(next(iter(res.values()))["tasks"])
    print(f"\n{'variant':<14}" + "".join(f"{t:>24}" for t in tasks))
    print(f"{'':<14}" + "".join(f"{'recall@20  cand.recall':>24}" for _ in tasks))
    for name, r in res.items():
        print(f"{name:<14}" + "".join(
            f"{r['tasks'][t]['recall@20']:>12.4f}{r['tasks'][t]['candidate_recall']:>12.4f}"
            for t in tasks))
    first = next(iter(res.values()))["tasks"]
    print(f"{'best baseline':<14}" + "".join(
        f"{max(first[t]['baselines'].values()):>12.4f}{'':>12}" for t in tasks))
    for name, r in res.items():
        for cname, c in r.get("cascades", {}).items():
            print(f"{name}/{cname} {c['stages']}: " + ", ".join(
                f"{t} recall@20 {c[t]['recall@20']:.4f} (whole model "
                f"{c[t]['whole_model_recall@20']:.4f}, top 20 same {c[t]['top20_same_as_whole_model']:.2%})"
                for t in tasks))
    doc = {"command": "python bench/ranker_holdout.py " + " ".join(argv or sys.argv[1:]),
           "held_out_share": HELD_OUT_SHARE, "gnn": gnn, "signals": signal_params,
           "seed": opts.seed, "variants": res}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
