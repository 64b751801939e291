"""GNN training benchmark: epoch time, edges/second and worker memory for 1 and 2 workers.

Configurations are ``WORKERSxCPUS`` (Ray Train workers x cores per worker). By default
``2x1`` (DDP, one core each) and ``1x2`` (one worker, two torch threads) run twice,
interleaved, with the same global batch (``--global-batch``, 16,384 edges: each worker takes
its share), so both take the same optimisation steps and only where the work runs differs.
Every step propagates over the whole graph on every worker, a cost independent of the batch:
more workers add one gradient all-reduce of every embedding per step and do the propagation
once each; more threads make the one propagation faster. ``--batch-size`` instead fixes the
batch per worker (more workers then take fewer, larger global steps).

Runs :func:`graph.train_loop.fit` (Ray Train, DDP, full-graph LightGCN propagation per step) on
the built-in data's training graph (purchases before the default split; ``--max-users`` takes a
seeded sample of households), or with ``--synthetic`` on a random graph of the built-in size
(2,469 users, 92k items, ~870k edges). Each worker count trains in a fresh run folder, so
nothing resumes. ``edges_per_second`` counts positive training edges over all workers per
second of epoch wall time; ``peak_rss_mb`` is the largest worker's peak RSS (``ru_maxrss``),
``peak_rss_mb_total`` the sum over workers; the driver is not counted. ``setup_s`` is the rest
of the run's wall time: worker start-up, graph transfer, adjacency build, checkpoint upload.

The numbers depend on the CPU cores the workers get: on a machine shared with other jobs they
vary from run to run.

Usage: ``python bench/train_bench.py [--epochs 2] [--max-users 500] [--configs 2x1,1x2]``
Results print as a table and go to ``bench/results/train_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local bench cluster, as in the tests
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from graph.config import TrainConfig  # noqa: E402
from graph.interactions import Interactions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train_bench.json"


def builtin_graph(max_users: int | None, seed: int) -> tuple[Interactions, str]:
    """The built-in data's training graph (events before the default split)."""
    from graph.data import load_builtin, temporal_split
    from graph.interactions import build_interactions

    ds = load_builtin(max_users=max_users, seed=seed)
    train, _ = temporal_split(ds.events, ds.default_split_at)
    name = ds.name if max_users is None else f"{ds.name} ({max_users} sampled users)"
    return build_interactions(train, ds.items), name


def synthetic_graph(
    num_users: int = 2469, num_items: int = 92_000, num_edges: int = 870_000, seed: int = 0
) -> tuple[Interactions, str]:
    """A random graph of the built-in size: popularity-skewed items, 5 feature fields."""
    rng = np.random.default_rng(seed)
    # Item popularity falls off as rank^-0.7 (a long tail, like the built-in catalogue).
    pop = rng.permutation(np.arange(1, num_items + 1, dtype=np.float64) ** -0.7)
    keys = np.empty(0, dtype=np.int64)
    while keys.size < num_edges:
        users = rng.integers(0, num_users, num_edges)
        items = rng.choice(num_items, size=num_edges, p=pop / pop.sum())
        keys = np.unique(np.concatenate([keys, users * num_items + items]))
    keys = np.sort(rng.choice(keys, size=num_edges, replace=False))
    edge_index = np.stack([keys // num_items, keys % num_items])
    cards = [30, 300, 4000, 6000, 100]
    feats = np.stack([rng.integers(1, c, num_items) for c in cards], axis=1)
    inter = Interactions(
        user_ids=np.array([f"u{i}" for i in range(num_users)]),
        item_ids=np.array([f"i{i}" for i in range(num_items)]),
        edge_index=torch.from_numpy(edge_index),
        edge_weight=torch.from_numpy(rng.gamma(1.0, 1.0, edge_index.shape[1]).astype(np.float32)),
        item_features=torch.from_numpy(feats.astype(np.int64)),
        feature_names=["department", "category", "subcategory", "brand", "price_band"],
        feature_cardinalities=cards,
    )
    return inter, "synthetic (random graph of the built-in size)"


def run(inter: Interactions, cfg: TrainConfig) -> dict[str, Any]:
    """One fresh training run; the epoch metrics averaged over epochs after the first."""
    from graph.train_loop import fit, format_progress

    tag = f"{cfg.num_workers}x{cfg.cpus_per_worker}, {cfg.batch_size:,} edges/worker"

    def progress(m: dict[str, Any]) -> None:
        print(f"  [{tag}] {format_progress(m)}", flush=True)

    result = fit(inter, cfg, progress=progress)
    hist = result.history
    # The first epoch pays one-off costs (allocator warm-up); average the rest when there are.
    steady = hist[1:] or hist
    epoch_s = float(np.mean([h["epoch_seconds"] for h in steady]))
    return {
        "workers": cfg.num_workers,
        "cpus_per_worker": cfg.cpus_per_worker,
        "malloc": "retain" if cfg.retain_freed_memory else "default",
        "batch_per_worker": cfg.batch_size,
        "global_batch": cfg.batch_size * cfg.num_workers,
        "steps_per_epoch": math.ceil((inter.num_edges // cfg.num_workers) / cfg.batch_size),
        "epochs": len(hist),
        "epoch_s": epoch_s,
        "edges_per_s": float(np.mean([h["edges_per_second"] for h in steady])),
        "peak_rss_mb": max(h["peak_rss_mb"] for h in hist),
        "peak_rss_mb_total": max(h["peak_rss_mb_total"] for h in hist),
        "train_s": result.train_seconds,
        "setup_s": result.train_seconds - sum(h["epoch_seconds"] for h in hist),
        "final_loss": hist[-1]["loss"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'workers':>7} {'cpus/w':>6} {'malloc':>7} {'batch/w':>8} {'steps':>6} {'epoch s':>8} "
        f"{'edges/s':>10} "
        f"{'peak RSS/worker MB':>19} {'RSS all workers MB':>19} {'setup s':>8} {'loss':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['workers']:>7} {r['cpus_per_worker']:>6} {r.get('malloc', 'default'):>7} "
            f"{r['batch_per_worker']:>8,} "
            f"{r['steps_per_epoch']:>6} "
            f"{r['epoch_s']:>8.1f} {r['edges_per_s']:>10,.0f} "
            f"{r['peak_rss_mb']:>19,.0f} {r['peak_rss_mb_total']:>19,.0f} "
            f"{r['setup_s']:>8.1f} {r['final_loss']:>7.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    ap.add_argument("--max-users", type=int, default=None, help="sample of households")
    ap.add_argument(
        "--configs", default="2x1,1x2,2x1,1x2",
        help="comma-separated WORKERSxCPUS_PER_WORKER, run in this order",
    )
    ap.add_argument("--synthetic", action="store_true", help="random graph of the built-in size")
    ap.add_argument("--dim", type=int, default=None, help="embedding width (TrainConfig default)")
    batch = ap.add_mutually_exclusive_group()
    batch.add_argument("--global-batch", type=int, default=16384,
                       help="edges per step over all workers, each taking its share (default)")
    batch.add_argument("--batch-size", type=int, default=None,
                       help="edges per step per worker instead (the global batch grows with "
                            "the workers)")
    ap.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    ap.add_argument(
        "--malloc", choices=("retain", "default", "both"), default="retain",
        help="glibc's thresholds in the workers: raised (TrainConfig.retain_freed_memory, the "
             "default), glibc's own, or both, each config run once with each (alternated)",
    )
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    try:
        configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",") if c]
    except ValueError:
        configs = []
    if not configs or any(len(c) != 2 or min(c) < 1 for c in configs):
        ap.error(f"--configs ({args.configs!r}) must look like 1x1,2x1,1x2")

    import ray

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    inter, data_name = synthetic_graph() if args.synthetic else builtin_graph(args.max_users, 0)
    print(
        f"[data] {data_name}: {inter.num_users:,} users x {inter.num_items:,} items, "
        f"{inter.num_edges:,} edges ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    ray.init(
        address="local",
        num_cpus=max([os.cpu_count() or 1] + [w * c for w, c in configs]),
        num_gpus=max(w for w, _ in configs) if args.use_gpu else None,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        )}},
        log_to_driver=False,
    )
    overrides: dict[str, Any] = {"epochs": args.epochs, "use_gpu": args.use_gpu}
    if args.dim is not None:
        overrides["dim"] = args.dim
    retains = {"retain": [True], "default": [False], "both": [False, True]}[args.malloc]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="intentrec-train-bench-") as storage:
            runs = [(c, r) for c in configs for r in retains]
            for i, ((workers, cpus), retain) in enumerate(runs):
                per_worker = args.batch_size or max(1, args.global_batch // workers)
                cfg = TrainConfig(
                    **overrides,
                    num_workers=workers,
                    cpus_per_worker=cpus,
                    batch_size=per_worker,
                    storage_path=storage,
                    run_name=f"bench-{i}-{workers}x{cpus}",  # a fresh folder: nothing resumes
                    retain_freed_memory=retain,
                )
                rows.append(run(inter, cfg))
    finally:
        ray.shutdown()

    table = format_table(rows)
    print()
    print(table)
    out = {
        "benchmark": "train_bench",
        "data": {
            "name": data_name,
            "num_users": inter.num_users,
            "num_items": inter.num_items,
            "num_edges": inter.num_edges,
        },
        "config": TrainConfig(**overrides, storage_path="/unused").model_dump(
            exclude={"storage_path", "run_name", "num_workers", "cpus_per_worker", "batch_size"}
        ),
        "batch": ({"per_worker": args.batch_size} if args.batch_size
                  else {"global": args.global_batch}),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.use_gpu else None,
            # Other jobs on the machine slow the workers down: a load average above the core
            # count means the numbers are pessimistic.
            "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "rows": rows,
        "table": table,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.output)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
