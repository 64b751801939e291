"""The offline evaluation in the driver against the same evaluation on a pool of Ray actors
(graph/parallel.py), on one published model version, in one run.

Loads the version and the data it was trained on (the built-in data by default), runs
:func:`graph.evaluate.evaluate` (the four tasks, baselines, uncertainty and the search task, as
``train_job.py`` runs it) first in this process, then with ``--workers`` actors, checks that the
two give the same metrics, and prints the wall time of each with their ratio, the metrics table
and what ranks the recommendations (:func:`graph.evaluate.format_contributions`). Writes JSON
with the metrics.

    python bench/eval_parallel.py --artifacts artifacts            # 2 actors, the full protocol
    python bench/eval_parallel.py --artifacts artifacts --max-baskets 2000 --max-users 500
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


def run(artifacts: str, workers: int, max_users: int | None, max_baskets: int | None
        ) -> dict[str, Any]:
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

    def once(pool: Any) -> tuple[float, dict[str, Any]]:
        t = time.perf_counter()
        m = evaluate(d.train, d.test, d.inter_full, rec, d.split_at, seed=cfg.train.seed,
                     max_users=max_users, max_baskets=max_baskets, pool=pool,
                     progress=lambda line: print("  " + line, flush=True))
        return time.perf_counter() - t, m

    print(f"[bench] evaluate in this process (version {art.version})")
    driver_s, driver_m = once(None)
    ray.init(address="local", num_cpus=workers, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        print(f"[bench] evaluate on {workers} Ray actors")
        t = time.perf_counter()
        with ranking_pool(rec, workers) as pool:
            assert pool is not None, "a pool needs at least 2 workers"
            pool_s, pool_m = once(pool)
        pool_total_s = time.perf_counter() - t
    finally:
        ray.shutdown()
    same = json.dumps(driver_m, sort_keys=True, default=str) == json.dumps(
        pool_m, sort_keys=True, default=str)
    return {"version": art.version, "workers": workers, "cpus": os.cpu_count(),
            "max_users": max_users, "max_baskets": max_baskets,
            "driver_s": round(driver_s, 1), "pool_s": round(pool_s, 1),
            "pool_with_start_and_close_s": round(pool_total_s, 1),
            "speedup": round(driver_s / pool_total_s, 2), "same_metrics": same,
            "metrics": driver_m,
            "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-users", type=int, default=None)
    p.add_argument("--max-baskets", type=int, default=None)
    p.add_argument("--output", default=str(REPO / "bench/results/eval_parallel.json"))
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    r = run(a.artifacts, a.workers, a.max_users, a.max_baskets)
    from graph.evaluate import format_contributions, format_table

    print("\n" + format_table(r["metrics"]) + "\n\n" + format_contributions(r["metrics"]))
    print(f"\n{'evaluation':<34} | wall s\n{'-' * 44}")
    print(f"{'in the driver':<34} | {r['driver_s']:>6.1f}")
    print(f"{f'{a.workers} Ray actors':<34} | {r['pool_s']:>6.1f}")
    print(f"{'  with their start and close':<34} | {r['pool_with_start_and_close_s']:>6.1f}")
    print(f"speedup {r['speedup']:.2f}x; the same metrics: {'yes' if r['same_metrics'] else 'NO'}")
    Path(a.output).write_text(json.dumps(r, indent=2, default=str) + "\n")
    print(f"wrote {a.output}")
    if not r["same_metrics"]:
        sys.exit("the pool's metrics differ from the driver's: a bug in graph/parallel.py")


if __name__ == "__main__":
    main()
