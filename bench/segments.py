"""Recall@20 of one published model version by shopper segment, on its own test split.

Loads the version and the data it was trained on (the built-in data by default), runs the
offline protocol (:func:`graph.evaluate.evaluate`, as ``train_job.py`` runs it, on ``--workers``
Ray actors) and prints the main table and the segment table
(:func:`graph.evaluate.format_segments`): new shoppers, then light, medium and heavy thirds of
the shoppers by how many distinct items their history holds, each with every model's recall@20
and intentrec's lead over the segment's best baseline. ``train_job.py`` prints the same table;
this reads it off a version already trained. Writes JSON with the metrics.

    python bench/segments.py --artifacts artifacts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(artifacts: str, workers: int) -> dict[str, Any]:
    import ray

    from graph.artifacts import read_artifact
    from graph.evaluate import evaluate
    from graph.parallel import ranking_pool
    from graph.pipeline import PipelineConfig, prepare_data
    from graph.ranking import Ranker
    from graph.recommend import Recommender

    art = read_artifact(artifacts)
    cfg = PipelineConfig.model_validate({**art.manifest["config"], "output": artifacts})
    d = prepare_data(cfg, progress=print)
    rec = Recommender.build(art.items, Ranker(art.user_emb, art.item_emb, art.signals),
                            art.item_static, art.learned, text=art.text)
    ray.init(address="local", num_cpus=workers, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        t = time.perf_counter()
        with ranking_pool(rec, workers) as pool:
            metrics = evaluate(d.train, d.test, d.inter_full, rec, d.split_at,
                               seed=cfg.train.seed, max_users=cfg.eval_max_users,
                               max_baskets=cfg.eval_max_baskets, pool=pool,
                               progress=lambda line: print("  " + line, flush=True))
        seconds = time.perf_counter() - t
    finally:
        ray.shutdown()
    return {"version": art.version, "workers": workers, "evaluate_s": round(seconds, 1),
            "metrics": metrics, "load_average": os.getloadavg(),
            "machine": platform.processor() or platform.machine()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--workers", type=int, default=2, help="Ray actors that rank (1: this process ranks)")
    p.add_argument("--output", default=str(REPO / "bench/results/segments.json"))
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    r = run(a.artifacts, a.workers)
    from graph.evaluate import format_segments, format_table

    print("\n" + format_table(r["metrics"]) + "\n\n" + format_segments(r["metrics"]))
    print(f"\nversion {r['version']}, evaluated in {r['evaluate_s']:.0f}s")
    Path(a.output).write_text(json.dumps(r, indent=2, default=str) + "\n")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
