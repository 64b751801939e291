"""The search task with the shopper known and withheld, for one or more published versions.

The job's ``search`` table asks each simulated query (:func:`graph.tasks.search_task`) with the
basket's shopper; a visitor who has not signed in searches too. This asks a seeded sample of the
same queries both ways, through :func:`graph.search_eval.evaluate_search`, for each version
given (all of the same data and split), and prints recall@20 of intentrec and the search
baselines. Writes JSON.

    python bench/anonymous_search.py --artifacts /tmp/a/artifacts --artifacts /tmp/b/artifacts
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(roots: list[str], queries: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    import numpy as np

    from graph.artifacts import read_artifact
    from graph.evaluate import protocol_tasks
    from graph.pipeline import PipelineConfig, prepare_data
    from graph.ranking import Ranker
    from graph.recommend import Recommender
    from graph.search_eval import evaluate_search
    from graph.tasks import search_task

    out = []
    d = None
    for root in roots:
        art = read_artifact(root)
        cfg = PipelineConfig.model_validate({**art.manifest["config"], "output": root})
        if d is None:
            d = prepare_data(cfg, progress=lambda _line: None)
        rec = Recommender.build(art.items, Ranker(art.user_emb, art.item_emb, art.signals),
                                art.item_static, art.learned, text=art.text)
        _, _, ins, _ = protocol_tasks(d.train, d.test, d.inter_full, d.split_at,
                                      country=rec.ranker.signals.params.country, seed=seed)
        sq = search_task(ins, rec.catalogue.categories, rec.catalogue.titles, seed=seed)
        n = min(queries, len(sq))
        sub = sq.take(np.sort(np.random.default_rng(seed).choice(len(sq), n, replace=False)))
        row: dict[str, Any] = {"version": art.version, "root": root, "queries": n}
        for name, q in (("known", sub),
                        ("anonymous", replace(sub, users=np.full(n, -1, dtype=np.int64)))):
            res = evaluate_search(rec, q, art.learned, 20)
            row[name] = {m: round(v["search"]["recall@20"], 4) for m, v in res.items()}
            print(f"{art.version} {name}: " + ", ".join(f"{m} {v}" for m, v in row[name].items()),
                  flush=True)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--artifacts", action="append", required=True)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "anonymous_search.json"))
    opts = p.parse_args(argv)
    rows = measure(opts.artifacts, opts.queries, opts.seed)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(
        {"command": "python bench/anonymous_search.py " + " ".join(argv or sys.argv[1:]),
         "versions": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
