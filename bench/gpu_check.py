"""GPU check of the training code path, on a machine without Ray.

The Ray workers of :func:`graph.train_loop.fit` run plain-torch code from
:mod:`graph.training`; this script runs that same code in one process, so that it can be tried
on a GPU machine that has torch, torch_geometric, numpy and pydantic but no Ray. It never
imports Ray (``tests/unit/test_model.py`` checks that).

Two modes:

``--save-payload PATH`` (on a machine with the project's dependencies): the built-in data's
training graph (purchases before the default split), exactly as
:func:`graph.training.graph_payload` makes it for the workers, saved with ``torch.save``
(indices stored as int32; the fingerprint is checked again on load).

``--payload PATH`` (on the GPU machine): picks ``cuda:0`` if available (else the CPU, saying
so), sets up one worker as ``train_func`` does (:func:`graph.training.setup_worker`, then the
model moved to the device as Ray's ``prepare_model`` does for a single worker, which adds no
DDP wrapper), trains ``--epochs`` epochs with :func:`graph.training.train_epoch`, then times
``--cpu-steps`` steps of the same loop on the CPU and extrapolates a CPU epoch from them
(labelled as such). Checks: losses finite and decreasing, the loss on a fixed probe batch
lower after training, the same initial probe loss on the CPU and the device, and
:func:`graph.model.export_embeddings` giving finite float32 numpy arrays of the right shapes.

Usage::

    python bench/gpu_check.py --save-payload bench/gpu_payload.pt
    python bench/gpu_check.py --payload bench/gpu_payload.pt --epochs 3 --out OUT/gpu_check.json

The table goes to stdout, the numbers to ``--out`` (default ``bench/results/gpu_check.json``);
the exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graph.config import TrainConfig  # noqa: E402
from graph.model import bpr_loss, export_embeddings  # noqa: E402
from graph.training import (  # noqa: E402
    WorkerSetup,
    has_edges,
    make_optimizer,
    make_payload,
    peak_rss_mb,
    setup_worker,
    train_epoch,
)

FORMAT = "intentrec-gpu-payload/1"
RESULTS = REPO / "bench" / "results" / "gpu_check.json"
# Probe loss at initialisation, CPU vs device: the same seeded weights, float32 sums in
# another order.
INIT_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------
# The payload file
# --------------------------------------------------------------------------------------


def save_payload(path: Path, max_users: int | None, text_input: str = "auto") -> dict[str, Any]:
    """Write the built-in training graph's payload to ``path``; returns its summary.

    ``text_input`` decides, as ``train_job.py --text-input`` does, whether the items' text
    vectors (the GNN's layer-0 text projection) travel with it: ``auto`` takes them when at least
    half of the items have a title of their own (not so for the built-in data), ``on`` always.
    """
    from graph.data import load_builtin, temporal_split
    from graph.interactions import build_interactions
    from graph.text import ItemText, own_title_share, wants_text_input
    from graph.training import graph_payload

    t0 = time.perf_counter()
    ds = load_builtin(max_users=max_users)
    train, _ = temporal_split(ds.events, ds.default_split_at)
    text = (ItemText.build(ds.items)
            if wants_text_input(text_input, own_title_share(ds.items)) else None)
    payload = graph_payload(build_interactions(train, ds.items), text)
    int32 = np.iinfo(np.int32).max
    if max(payload["num_users"], payload["num_items"], *payload["feature_cardinalities"]) > int32:
        raise SystemExit("the graph is too large for int32 indices")
    data = {
        "name": ds.name if max_users is None else f"{ds.name} ({max_users} sampled users)",
        "split_at": str(ds.default_split_at),
        "num_users": payload["num_users"],
        "num_items": payload["num_items"],
        "num_edges": int(payload["edge_index"].shape[1]),
        "text_vectors": None if text is None else list(text.vectors.shape),
    }
    blob = payload_blob(payload, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    size_mb = path.stat().st_size / 2**20
    print(
        f"[payload] {data['name']}, split at {data['split_at']}: {data['num_users']:,} users x "
        f"{data['num_items']:,} items, {data['num_edges']:,} edges, text vectors "
        f"{'none' if text is None else 'x'.join(map(str, text.vectors.shape))}, fingerprint "
        f"{payload['fingerprint']} -> {path} ({size_mb:.1f} MiB, {time.perf_counter() - t0:.0f}s)"
    )
    return {**data, "fingerprint": payload["fingerprint"], "size_mb": size_mb}


def payload_blob(payload: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """What :func:`save_payload` writes: the payload's tensors, indices stored as int32."""
    blob = {
        "format": FORMAT,
        "edge_index": torch.from_numpy(payload["edge_index"].astype(np.int32)),
        "edge_weight": torch.from_numpy(payload["edge_weight"]),
        "item_features": torch.from_numpy(payload["item_features"].astype(np.int32)),
        "feature_cardinalities": payload["feature_cardinalities"],
        "num_users": payload["num_users"],
        "num_items": payload["num_items"],
        "fingerprint": payload["fingerprint"],
        "data": data,
    }
    if payload.get("text_vectors") is not None:
        blob["text_vectors"] = torch.from_numpy(payload["text_vectors"])
        blob["text_row"] = torch.from_numpy(payload["text_row"].astype(np.int32))
    return blob


def load_payload(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training payload (int64 indices, validated) and the data summary from ``path``.

    Raises:
        SystemExit: If the file is not a payload or its arrays do not match its fingerprint.
    """
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SystemExit(f"{path} is not a {FORMAT} file: write it with --save-payload")
    payload = make_payload(
        blob["edge_index"], blob["edge_weight"], blob["item_features"],
        blob["feature_cardinalities"], blob["num_users"], blob["num_items"],
        blob.get("text_vectors"), blob.get("text_row"),
    )
    if payload["fingerprint"] != blob["fingerprint"]:
        raise SystemExit(
            f"{path}: the arrays hash to {payload['fingerprint']}, the file says "
            f"{blob['fingerprint']}: the file is damaged, write it again with --save-payload"
        )
    return payload, dict(blob["data"])


# --------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------


def capped_edges(edge_index: np.ndarray, steps: int | None, batch_size: int) -> np.ndarray:
    """A seeded random subset of ``steps * batch_size`` edges (all of them if ``steps`` is None).

    :func:`~graph.training.train_epoch` over it takes exactly ``steps`` full-size steps; each
    step still propagates over the whole graph, so a step costs what it costs in a full epoch.
    """
    if steps is None or steps * batch_size >= edge_index.shape[1]:
        return edge_index
    keep = np.random.default_rng(1).choice(edge_index.shape[1], steps * batch_size, replace=False)
    return edge_index[:, np.sort(keep)]


def steps_per_epoch(num_edges: int, batch_size: int) -> int:
    """Steps of one full epoch for one worker (as :func:`~graph.training.epoch_batches`)."""
    return max(1, math.ceil(num_edges / batch_size))


def make_probe(worker: WorkerSetup, cfg: TrainConfig) -> tuple[np.ndarray, ...]:
    """A fixed batch (users, positives, negatives) to compare losses on, from its own seed."""
    rng = np.random.default_rng([cfg.seed, 999])
    num_edges = worker.edge_index.shape[1]
    cols = rng.choice(num_edges, min(cfg.batch_size, num_edges), replace=False)
    users, pos = worker.edge_index[0, cols], worker.edge_index[1, cols]
    return users, pos, worker.sampler.sample(users, cfg.num_negatives, rng)


@torch.no_grad()
def probe_loss(worker: WorkerSetup, probe: tuple[np.ndarray, ...], cfg: TrainConfig) -> float:
    device = worker.adj.device
    user_emb, item_emb = worker.model(worker.adj)
    users, pos, neg = (torch.from_numpy(a).to(device) for a in probe)
    return float(bpr_loss(user_emb[users], item_emb[pos], item_emb[neg], cfg.reg))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_run(
    payload: dict[str, Any], cfg: TrainConfig, device: torch.device, max_steps: int | None
) -> dict[str, Any]:
    """Set up one worker on ``device`` as ``train_func`` does and train ``cfg.epochs`` epochs."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    worker = setup_worker(payload, cfg, device)
    # What ray.train.torch.prepare_model does for a single worker: move, no DDP wrapper.
    worker.model.to(device)
    optimizer = make_optimizer(worker.model, cfg)
    sync(device)
    setup_s = time.perf_counter() - t0
    setup_mem = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    edges = capped_edges(worker.edge_index, max_steps, cfg.batch_size)
    probe = make_probe(worker, cfg)
    probe_before = probe_loss(worker, probe, cfg)

    epochs = []
    for epoch in range(1, cfg.epochs + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        stats = train_epoch(worker.model, optimizer, worker.adj, edges, worker.sampler, cfg, epoch)
        sync(device)
        wall = time.perf_counter() - start
        epochs.append({
            "epoch": epoch,
            "steps": stats.num_steps,
            "edges": stats.num_edges,
            "loss": stats.loss,
            "seconds": wall,
            "seconds_per_step": wall / stats.num_steps,
            "edges_per_second": stats.num_edges / wall,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        })
        print(
            f"  [{device}] epoch {epoch}/{cfg.epochs}: {stats.num_steps} steps, loss "
            f"{stats.loss:.4f}, {wall:.2f}s, {stats.num_edges / wall:,.0f} edges/s", flush=True,
        )
    probe_after = probe_loss(worker, probe, cfg)

    trained_users, trained_items = has_edges(payload)
    user_emb, item_emb = export_embeddings(worker.model, worker.adj, trained_items, trained_users)
    return {
        "setup_seconds": setup_s,
        "setup_gpu_mb": setup_mem,
        "epochs": epochs,
        "truncated_to_steps": None if edges is worker.edge_index else max_steps,
        "probe_loss_before": probe_before,
        "probe_loss_after": probe_after,
        "model_device": str(next(worker.model.parameters()).device),
        "adj_device": str(worker.adj.device),
        "adj_nnz": int(worker.adj._nnz()),
        "text_dim": worker.model.text_dim,
        "text_vectors_device": (
            None if worker.model.text_proj is None else str(worker.model.text_vectors.device)
        ),
        "num_parameters": sum(p.numel() for p in worker.model.parameters()),
        "user_emb": user_emb,
        "item_emb": item_emb,
    }


def cpu_run(payload: dict[str, Any], cfg: TrainConfig, steps: int) -> dict[str, Any]:
    """``steps`` steps of epoch 1 on the CPU; a full CPU epoch extrapolated from them."""
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    worker = setup_worker(payload, cfg, cpu)  # sets cfg.cpus_per_worker torch threads
    optimizer = make_optimizer(worker.model, cfg)
    setup_s = time.perf_counter() - t0
    probe_init = probe_loss(worker, make_probe(worker, cfg), cfg)
    edges = capped_edges(worker.edge_index, steps, cfg.batch_size)
    stats = train_epoch(worker.model, optimizer, worker.adj, edges, worker.sampler, cfg, 1)
    per_step = stats.seconds / stats.num_steps
    full_steps = steps_per_epoch(worker.edge_index.shape[1], cfg.batch_size)
    print(
        f"  [cpu, {cfg.cpus_per_worker} threads] {stats.num_steps} steps: {per_step:.2f}s/step, "
        f"loss {stats.loss:.4f}", flush=True,
    )
    return {
        "threads": cfg.cpus_per_worker,
        "setup_seconds": setup_s,
        "steps_measured": stats.num_steps,
        "seconds_measured": stats.seconds,
        "seconds_per_step": per_step,
        "loss": stats.loss,
        "probe_loss_init": probe_init,
        "steps_per_full_epoch": full_steps,
        "epoch_seconds_extrapolated": per_step * full_steps,
        "edges_per_second_extrapolated": stats.num_edges / stats.seconds,
    }


# --------------------------------------------------------------------------------------
# Checks and report
# --------------------------------------------------------------------------------------


def run_checks(
    dev: dict[str, Any], cpu: dict[str, Any] | None, device: torch.device, payload: dict[str, Any],
    dim: int,
) -> dict[str, bool | None]:
    """Named pass/fail results; None where a check does not apply to this run."""
    losses = [e["loss"] for e in dev["epochs"]]
    user_emb, item_emb = dev["user_emb"], dev["item_emb"]
    checks: dict[str, bool | None] = {
        "trained_on_device": dev["model_device"].startswith(device.type)
        and dev["adj_device"].startswith(device.type),
        "losses_finite": all(math.isfinite(x) for x in losses),
        "losses_decreasing": (
            all(b < a for a, b in itertools.pairwise(losses)) if len(losses) > 1 else None
        ),
        "probe_loss_decreased": dev["probe_loss_after"] < dev["probe_loss_before"],
        "embeddings_numpy_float32": all(
            isinstance(e, np.ndarray) and e.dtype == np.float32 for e in (user_emb, item_emb)
        ),
        "embedding_shapes": user_emb.shape == (payload["num_users"], dim)
        and item_emb.shape == (payload["num_items"], dim),
        "embeddings_finite": bool(np.isfinite(user_emb).all() and np.isfinite(item_emb).all()),
        "init_loss_cpu_matches_device": None,
        # The layer-0 text projection (catalogues with titles): its vectors moved with the model.
        "text_input_on_device": (
            None if dev["text_vectors_device"] is None
            else dev["text_vectors_device"].startswith(device.type)
        ),
    }
    if cpu is not None:
        checks["init_loss_cpu_matches_device"] = (
            abs(cpu["probe_loss_init"] - dev["probe_loss_before"]) < INIT_TOLERANCE
        )
    return checks


def format_report(
    dev: dict[str, Any], cpu: dict[str, Any] | None, checks: dict[str, bool | None],
    device_label: str,
) -> str:
    head = (
        f"{'epoch':>5} {'steps':>6} {'seconds':>8} {'s/step':>7} {'loss':>8} {'edges/s':>11} "
        f"{'peak GPU MB':>11}"
    )
    lines = [f"device: {device_label}", head, "-" * len(head)]
    for e in dev["epochs"]:
        mem = f"{e['peak_gpu_mb']:>11,.0f}" if e["peak_gpu_mb"] is not None else f"{'-':>11}"
        lines.append(
            f"{e['epoch']:>5} {e['steps']:>6} {e['seconds']:>8.2f} {e['seconds_per_step']:>7.3f} "
            f"{e['loss']:>8.4f} {e['edges_per_second']:>11,.0f} {mem}"
        )
    if dev["truncated_to_steps"] is not None:
        lines.append(f"(epochs truncated to {dev['truncated_to_steps']} steps by --max-steps)")
    lines.append(
        f"setup {dev['setup_seconds']:.1f}s; probe loss {dev['probe_loss_before']:.4f} -> "
        f"{dev['probe_loss_after']:.4f}"
    )
    if cpu is not None:
        lines.append(
            f"cpu ({cpu['threads']} threads): {cpu['steps_measured']} steps measured, "
            f"{cpu['seconds_per_step']:.3f} s/step; EXTRAPOLATED full epoch "
            f"({cpu['steps_per_full_epoch']} steps): {cpu['epoch_seconds_extrapolated']:.1f}s"
        )
        which = "epochs 2+" if len(dev["epochs"]) > 1 else "epoch 1, with its warm-up"
        lines.append(f"cpu s/step / device s/step (device {which}): {speedup(dev, cpu):.1f}x")
    for name, ok in checks.items():
        lines.append(f"  {'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {name}")
    return "\n".join(lines)


def speedup(dev: dict[str, Any], cpu: dict[str, Any]) -> float:
    # The first device epoch pays one-off costs (CUDA kernels, allocator); skip it when we can.
    steady = dev["epochs"][1:] or dev["epochs"]
    device_step = float(np.mean([e["seconds_per_step"] for e in steady]))
    return float(cpu["seconds_per_step"] / device_step)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save-payload", type=Path, help="write the built-in training graph here")
    mode.add_argument("--payload", type=Path, help="train on this payload file")
    ap.add_argument("--max-users", type=int, default=None, help="--save-payload: sample households")
    ap.add_argument(
        "--text-input", choices=("auto", "on", "off"), default="auto",
        help="--save-payload: include the items' text vectors (as train_job.py --text-input)",
    )
    ap.add_argument("--epochs", type=int, default=3, help="epochs on the device (default 3)")
    ap.add_argument("--max-steps", type=int, default=None, help="truncate device epochs to N steps")
    ap.add_argument("--cpu-steps", type=int, default=5, help="CPU steps to time (0: skip)")
    ap.add_argument(
        "--cpu-threads", type=int, default=None, help="torch threads of the CPU run (default: all)"
    )
    ap.add_argument("--dim", type=int, default=None, help="embedding width (TrainConfig default)")
    ap.add_argument("--batch-size", type=int, default=None, help="edges per step")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    if args.save_payload is not None:
        save_payload(args.save_payload, args.max_users, args.text_input)
        return 0

    t_start = time.perf_counter()
    payload, data = load_payload(args.payload)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    device_label = (
        f"cuda:0 ({torch.cuda.get_device_name(0)})"
        if cuda
        else "cpu (CUDA is not available: the device epochs run on the CPU)"
    )
    text_shape = data.get("text_vectors")
    print(f"[data] {data['name']}: {data['num_users']:,} users x {data['num_items']:,} items, "
          f"{data['num_edges']:,} edges, text vectors "
          f"{'none' if text_shape is None else 'x'.join(map(str, text_shape))}")
    print(f"[device] {device_label}", flush=True)
    threads = args.cpu_threads or len(os.sched_getaffinity(0))
    overrides: dict[str, Any] = {"epochs": args.epochs, "num_workers": 1, "use_gpu": cuda,
                                 "cpus_per_worker": threads,
                                 "storage_path": "/tmp/intentrec-gpu-check-unused"}
    if args.dim is not None:
        overrides["dim"] = args.dim
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    cfg = TrainConfig(**overrides)

    dev = device_run(payload, cfg, device, args.max_steps)
    cpu = None
    if args.cpu_steps > 0:
        cpu = cpu_run(payload, cfg.model_copy(update={"use_gpu": False}), args.cpu_steps)
    checks = run_checks(dev, cpu, device, payload, cfg.dim)
    report = format_report(dev, cpu, checks, device_label)
    print()
    print(report)

    passed = all(ok is not False for ok in checks.values())
    out = {
        "benchmark": "gpu_check",
        "passed": passed,
        "checks": checks,
        "data": data,
        "config": cfg.model_dump(exclude={"storage_path", "run_name"}),
        "device": {
            "name": device_label,
            "cuda_available": cuda,
            "cuda_version": torch.version.cuda,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_threads": threads,
        },
        "device_run": {k: v for k, v in dev.items() if k not in ("user_emb", "item_emb")},
        "cpu_run": cpu,
        "cpu_over_device_seconds_per_step": speedup(dev, cpu) if cpu is not None else None,
        "peak_rss_mb": peak_rss_mb(),
        "total_seconds": time.perf_counter() - t_start,
        "report": report,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)
    print(f"\n{'all checks passed' if passed else 'CHECKS FAILED'}; wrote {args.out} "
          f"({out['total_seconds']:.0f}s in all)")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
