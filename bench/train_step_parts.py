"""Where one GNN training step's time goes, in one process (no Ray), part by part.

Sets up one worker as a Ray Train worker does (:func:`graph.training.setup_worker` on the
built-in training graph, one torch thread by default) and times the parts of
:func:`graph.training.train_epoch`'s step: negative sampling, the layer-0 embedding, the
propagation, the BPR loss, the backward pass and Adam's update. Each ``--dim`` runs in its own
fresh process, once with glibc's own allocator thresholds and once with the workers' raised
ones (:func:`graph.malloc.retain_freed_memory`), alternated, so the two can be compared part by
part. Prints a table and writes JSON.

    python bench/train_step_parts.py --dims 64,128 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PARTS = ("sample", "layer0", "propagate", "loss", "backward", "adam")


def measure(dim: int, steps: int, threads: int, retain: bool) -> dict[str, Any]:
    """One configuration in this process: mean ms per step for each part, after 2 warm-up
    steps (the first steps pay one-off allocations)."""
    import numpy as np
    import torch

    from bench.train_bench import builtin_graph
    from graph.config import TrainConfig
    from graph.model import bpr_loss
    from graph.training import epoch_batches, graph_payload, make_optimizer, setup_worker

    inter, _ = builtin_graph(None, 0)
    cfg = TrainConfig(dim=dim, cpus_per_worker=threads, retain_freed_memory=retain,
                      storage_path="/unused")
    worker = setup_worker(graph_payload(inter), cfg, torch.device("cpu"))
    model, adj, edges, sampler = worker.model, worker.adj, worker.edge_index, worker.sampler
    opt = make_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    totals = dict.fromkeys(PARTS, 0.0)
    batches = epoch_batches(edges.shape[1], cfg.batch_size, 1, cfg.seed)
    for i, batch in enumerate(batches[: steps + 2]):
        t = [time.perf_counter()]
        users, pos = edges[0, batch], edges[1, batch]
        neg = sampler.sample(users, cfg.num_negatives, rng)
        mask = torch.from_numpy(rng.random(sampler.num_items) < cfg.id_dropout)
        t.append(time.perf_counter())
        x = model.layer0(mask)
        t.append(time.perf_counter())
        total = x
        for conv in model.convs:
            x = conv(x, adj)
            total = total + x
        out = total / (model.num_layers + 1)
        user_emb, item_emb = out[: model.num_users], out[model.num_users:]
        t.append(time.perf_counter())
        loss = bpr_loss(user_emb[torch.from_numpy(users)], item_emb[torch.from_numpy(pos)],
                        item_emb[torch.from_numpy(neg)], cfg.reg)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if i >= 2:
            for name, a, b in zip(PARTS, t, t[1:], strict=False):
                totals[name] += b - a
    n = max(min(steps, len(batches) - 2), 1)
    parts = {name: round(v / n * 1000, 1) for name, v in totals.items()}
    return {"dim": dim, "threads": threads, "malloc": "retain" if retain else "default",
            "steps": n, "batch": cfg.batch_size, "step_ms": round(sum(parts.values()), 1),
            "parts_ms": parts}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'dim':>4} {'malloc':>7} {'step ms':>8} " + " ".join(f"{p:>9}" for p in PARTS)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['dim']:>4} {r['malloc']:>7} {r['step_ms']:>8.0f} "
                     + " ".join(f"{r['parts_ms'][p]:>9.0f}" for p in PARTS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="64,128", help="comma-separated embedding widths")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a worker's cores)")
    p.add_argument("--repeats", type=int, default=1, help="alternated pairs per width")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # DIM:RETAIN, in a child
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "train_step_parts.json"))
    args = p.parse_args(argv)
    if args.one:  # a child process: one configuration, its row as JSON on the last line
        dim, retain = args.one.split(":")
        print(json.dumps(measure(int(dim), args.steps, args.threads, retain == "1")))
        return 0
    try:
        dims = [int(d) for d in args.dims.split(",") if d]
    except ValueError:
        p.error(f"--dims ({args.dims!r}) must look like 64,128")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    rows = []
    for dim in dims:
        for _ in range(args.repeats):
            for retain in ("0", "1"):  # a fresh process each: mallopt is process-wide
                out = subprocess.run(
                    [sys.executable, __file__, "--one", f"{dim}:{retain}", "--steps",
                     str(args.steps), "--threads", str(args.threads)],
                    capture_output=True, text=True, env=env, check=False)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return out.returncode
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(rows)
    print()
    print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({
        "benchmark": "train_step_parts", "rows": rows,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "libc": platform.libc_ver()},
    }, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
