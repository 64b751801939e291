"""The offline new-items report (:mod:`graph.cold_items`) on a slice, without Ray.

``train_job.py`` prints the same table after its evaluation; this script gets it alone, in one
process: the run's data (:func:`graph.pipeline.prepare_data`), the GNN trained with the plain-torch
per-worker code the Ray Train workers run (:mod:`graph.training`, one worker), the learned ranker
(:func:`graph.pipeline.fit_recommender`), then :func:`graph.cold_items.evaluate_cold_items`.

Usage::

    python bench/cold_items.py --max-users 300 --epochs 2 --out bench/results/cold_items.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graph.cold_items import COLD_KEY, evaluate_cold_items, format_cold_items  # noqa: E402
from graph.config import TrainConfig  # noqa: E402
from graph.item_encoder import ItemEncoder  # noqa: E402
from graph.model import export_embeddings  # noqa: E402
from graph.pipeline import PipelineConfig, fit_recommender, prepare_data  # noqa: E402
from graph.train_loop import TrainResult, embed  # noqa: E402
from graph.training import (  # noqa: E402
    graph_payload,
    has_edges,
    make_optimizer,
    setup_worker,
    train_epoch,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-users", type=int, default=300)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-baskets", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cold_items.json"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=a.epochs, num_workers=1, seed=a.seed,
                      storage_path=str(REPO / "checkpoints"))
    d = prepare_data(PipelineConfig(max_users=a.max_users, train=cfg))
    payload = graph_payload(d.inter_fit)
    w = setup_worker(payload, cfg, torch.device("cpu"))
    opt = make_optimizer(w.model, cfg)
    for epoch in range(a.epochs):
        stats = train_epoch(w.model, opt, w.adj, w.edge_index, w.sampler, cfg, epoch)
        print(f"[train] epoch {epoch + 1}/{a.epochs} loss {stats.loss:.4f}", flush=True)
    users, items = has_edges(payload)
    fit_emb = export_embeddings(w.model, w.adj, items, users)
    result = TrainResult(*fit_emb, model=w.model, trained_users=users, trained_items=items)
    rec, _ = fit_recommender(d, fit_emb, embed(result, d.inter_full), seed=a.seed)
    encoder = ItemEncoder.from_gnn(w.model, d.inter_full, d.ds.items)
    cold = evaluate_cold_items(rec, encoder, d.ds.items, d.train, d.test, seed=a.seed,
                               max_baskets=a.max_baskets, progress=print)
    print(format_cold_items({COLD_KEY: cold}))
    out = {"command": "python bench/cold_items.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
           "max_users": a.max_users, "epochs": a.epochs, "seconds": time.perf_counter() - t0,
           COLD_KEY: cold}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
