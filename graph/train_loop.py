"""Distributed training of :class:`~graph.model.IntentGNN` with Ray Train (Train V2).

Every worker holds the whole graph (full-graph LightGCN propagation each step) and trains on
its shard of the positive edges; DDP averages the gradients. Each epoch ends with one
``ray.train.report`` per worker carrying the epoch's metrics, rank 0's with a checkpoint.

Resume: Ray Train V2 restores a run from its folder ``storage_path/run_name``. Calling
:func:`fit` again with the same ``storage_path`` and ``run_name`` makes
``ray.train.get_checkpoint()`` return the latest checkpoint in that folder, and
:func:`train_func` continues from the epoch after it. A new ``run_name`` starts from scratch.

Randomness: model initialisation is seeded with ``seed`` on every rank (identical weights);
the epoch's edge permutation with ``(seed, epoch)`` (identical on every rank, so the
``rank::world_size`` shards partition it); negatives and id-dropout masks with
``(seed, epoch, rank)``. Every stream is derived from the epoch number, so a resumed run
draws exactly what an uninterrupted run would have drawn, without restoring generator state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import UserCallback
from torch import Tensor, nn

from graph.config import TrainConfig
from graph.errors import ConfigError, DataError, IntentrecError, UnavailableError
from graph.model import IntentGNN, NegativeSampler, bpr_loss, build_adjacency, export_embeddings

if TYPE_CHECKING:
    from graph.interactions import Interactions

STATE_FILE = "state.pt"
META_FILE = "meta.json"
# The model shape a checkpoint must match to be resumed or exported.
_MODEL_KEYS = ("num_users", "num_items", "feature_cardinalities", "dim", "num_layers")

ProgressFn = Callable[[dict[str, Any]], None]
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        user_emb: Final user embeddings, row = user index of the Interactions.
        item_emb: Final item embeddings, row = item index (cold items from features only).
        history: Per-epoch metrics of the epochs trained by this call (a resumed run lists
            only the epochs after the checkpoint it resumed from).
        train_seconds: Wall time of the Ray Train run.
        checkpoint_path: Location of the checkpoint the embeddings come from.
        model: The trained model on the CPU (for :func:`embed` over a newer graph).
        trained_users: True for users with edges in the training graph.
        trained_items: True for items with edges in the training graph.

    Shapes:
        - user_emb: ``[U, d]`` float32
        - item_emb: ``[I, d]`` float32
    """

    user_emb: np.ndarray
    item_emb: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    checkpoint_path: str | None = None
    model: IntentGNN | None = field(default=None, repr=False)
    trained_users: np.ndarray | None = field(default=None, repr=False)
    trained_items: np.ndarray | None = field(default=None, repr=False)


@dataclass
class EpochStats:
    """What one worker did in one epoch."""

    loss_sum: float
    num_edges: int
    num_steps: int
    seconds: float

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.num_edges, 1)


# --------------------------------------------------------------------------------------
# Graph payload: the tensors every worker needs, as plain numpy (cheap to ray.put).
# --------------------------------------------------------------------------------------


def graph_payload(inter: Interactions) -> dict[str, Any]:
    """The training graph as numpy arrays and ints, validated.

    Raises:
        DataError: If shapes or index ranges are inconsistent.
    """
    edge_index = _as_numpy(inter.edge_index).astype(np.int64, copy=False)
    edge_weight = _as_numpy(inter.edge_weight).astype(np.float32, copy=False)
    item_features = _as_numpy(inter.item_features).astype(np.int64, copy=False)
    num_users, num_items = len(inter.user_ids), len(inter.item_ids)
    cards = [int(c) for c in inter.feature_cardinalities]
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise DataError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    num_edges = edge_index.shape[1]
    if edge_weight.shape != (num_edges,):
        raise DataError(
            f"edge_weight must have shape [{num_edges}] (one per edge), "
            f"got {list(edge_weight.shape)}"
        )
    if num_edges == 0:
        raise DataError("the interaction graph has no edges: there is nothing to train on")
    if edge_index[0].min() < 0 or edge_index[0].max() >= num_users:
        raise DataError(f"edge_index[0] must hold user indices in [0, {num_users})")
    if edge_index[1].min() < 0 or edge_index[1].max() >= num_items:
        raise DataError(f"edge_index[1] must hold item indices in [0, {num_items})")
    if item_features.ndim != 2 or item_features.shape != (num_items, len(cards)):
        raise DataError(
            f"item_features must have shape [num_items={num_items}, F={len(cards)}], "
            f"got {list(item_features.shape)}"
        )
    if num_items and ((item_features < 0).any() or (item_features >= np.array(cards)).any()):
        raise DataError("item_features[:, f] must hold codes in [0, feature_cardinalities[f])")
    digest = hashlib.blake2b(digest_size=8)
    for arr in (edge_index, edge_weight, item_features):
        digest.update(np.ascontiguousarray(arr).tobytes())
    return {
        "edge_index": edge_index,
        "edge_weight": edge_weight,
        "item_features": item_features,
        "feature_cardinalities": cards,
        "num_users": num_users,
        "num_items": num_items,
        "fingerprint": digest.hexdigest(),
    }


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def build_model(payload: dict[str, Any], cfg: TrainConfig) -> IntentGNN:
    """A freshly initialised model for the payload's graph, seeded with ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return IntentGNN(
        payload["num_users"],
        payload["num_items"],
        payload["feature_cardinalities"],
        dim=cfg.dim,
        num_layers=cfg.num_layers,
        item_features=torch.from_numpy(np.array(payload["item_features"], dtype=np.int64)),
    )


def build_graph_adjacency(payload: dict[str, Any], device: torch.device | None = None) -> Tensor:
    """:func:`~graph.model.build_adjacency` for a payload, on ``device``."""
    adj = build_adjacency(
        torch.from_numpy(np.array(payload["edge_index"], dtype=np.int64)),
        torch.from_numpy(np.array(payload["edge_weight"], dtype=np.float32)),
        payload["num_users"],
        payload["num_items"],
    )
    return adj if device is None else adj.to(device)


def model_args(payload: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The model shape recorded in (and checked against) a checkpoint."""
    return {
        "num_users": int(payload["num_users"]),
        "num_items": int(payload["num_items"]),
        "feature_cardinalities": list(payload["feature_cardinalities"]),
        "dim": cfg.dim,
        "num_layers": cfg.num_layers,
    }


# --------------------------------------------------------------------------------------
# One epoch: shared by the Ray worker and by in-process training (tests, debugging).
# --------------------------------------------------------------------------------------


def epoch_batches(
    num_edges: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[np.ndarray]:
    """This rank's mini-batches (edge positions) of one epoch.

    The permutation depends on ``(seed, epoch)`` only, so every rank draws the same one and
    the ``rank::world_size`` shards partition the edges. ``batch_size`` is per rank: each step
    propagates over the whole graph on every rank (a cost independent of the batch), so more
    workers must mean fewer steps per epoch, not smaller batches. Every rank gets the same
    number of batches, as DDP all-reduces once per step.

    Shapes:
        - output: list of ``[b]`` int64 arrays, ``b <= batch_size + 1``
    """
    if num_edges < world_size:
        raise ValueError(f"{num_edges} edges cannot be split across {world_size} workers")
    perm = np.random.default_rng([seed, epoch, 0]).permutation(num_edges)
    shard = perm[rank::world_size]
    # The smallest shard decides, so that no rank gets an empty batch.
    num_steps = max(1, math.ceil((num_edges // world_size) / batch_size))
    return list(np.array_split(shard, num_steps))


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    adj: Tensor,
    edge_index: np.ndarray,
    sampler: NegativeSampler,
    cfg: TrainConfig,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> EpochStats:
    """One epoch of BPR mini-batches with full-graph propagation per step.

    Args:
        model: An :class:`IntentGNN`, possibly DDP-wrapped.
        optimizer: Optimizer over ``model``'s parameters.
        adj: Normalised adjacency on the model's device.
        edge_index: All positive (user, item) pairs, on the CPU.
        sampler: Negative sampler over the same positives.
        cfg: Training configuration (batch size, negatives, reg, id_dropout, seed).
        epoch: Epoch number (1-based); seeds this epoch's shuffling and sampling.
        rank: This worker's rank.
        world_size: Number of workers.

    Returns:
        This rank's loss sum, edge count, step count and wall time.

    Shapes:
        - edge_index: ``[2, E]`` int64
    """
    start = time.perf_counter()
    device = adj.device
    num_items = sampler.num_items
    rng = np.random.default_rng([cfg.seed, epoch, 1, rank])
    model.train()
    loss_sum, seen, steps = 0.0, 0, 0
    for batch in epoch_batches(
        edge_index.shape[1], cfg.batch_size, epoch, cfg.seed, rank, world_size
    ):
        users = edge_index[0, batch]
        pos = edge_index[1, batch]
        neg = sampler.sample(users, cfg.num_negatives, rng)
        mask = None
        if cfg.id_dropout > 0:
            mask = torch.from_numpy(rng.random(num_items) < cfg.id_dropout).to(device)
        user_emb, item_emb = model(adj, id_dropout_mask=mask)
        loss = bpr_loss(
            user_emb[torch.from_numpy(users).to(device)],
            item_emb[torch.from_numpy(pos).to(device)],
            item_emb[torch.from_numpy(neg).to(device)],
            cfg.reg,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(batch)
        seen += len(batch)
        steps += 1
    return EpochStats(loss_sum, seen, steps, time.perf_counter() - start)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over all parameters (L2 is in the loss, on the batch embeddings only)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def save_state(
    directory: str,
    model: IntentGNN,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict[str, Any]],
    meta: dict[str, Any],
) -> None:
    """Write a checkpoint: weights + optimizer state (``state.pt``) and ``meta.json``."""
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
        os.path.join(directory, STATE_FILE),
    )
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump({**meta, "epoch": epoch, "history": history}, f)


def load_state(directory: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read ``state.pt`` of a checkpoint folder (tensors mapped to ``device``)."""
    state: dict[str, Any] = torch.load(
        os.path.join(directory, STATE_FILE), map_location=device, weights_only=True
    )
    return state


def load_meta(directory: str) -> dict[str, Any]:
    """Read ``meta.json`` of a checkpoint folder: epoch, history, model shape, seed."""
    with open(os.path.join(directory, META_FILE)) as f:
        meta: dict[str, Any] = json.load(f)
    return meta


def check_compatible(
    meta: dict[str, Any], expected: dict[str, Any], fingerprint: str | None, where: str
) -> None:
    """Raise ConfigError unless a checkpoint was trained for this model shape and graph."""
    saved = meta.get("model_args", {})
    diffs = [
        f"{k}={saved.get(k)!r} (now {expected[k]!r})"
        for k in _MODEL_KEYS
        if saved.get(k) != expected[k]
    ]
    if diffs:
        raise ConfigError(
            f"the checkpoint in {where} was trained with {', '.join(diffs)}: it cannot be "
            "resumed; use a new run_name or delete that folder",
            field="run_name",
        )
    if fingerprint is not None and meta.get("graph_fingerprint") != fingerprint:
        raise ConfigError(
            f"the checkpoint in {where} was trained on another graph (different edges, "
            "weights or item features): use a new run_name to train on this data, or delete "
            "that folder",
            field="run_name",
        )


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# The per-worker function
# --------------------------------------------------------------------------------------


def train_func(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop.

    Args:
        config: ``{"cfg": TrainConfig.model_dump(), "graph": ObjectRef or payload dict}``
            (the payload from :func:`graph_payload`).
    """
    cfg = TrainConfig.model_validate(config["cfg"])
    graph = config["graph"]
    payload: dict[str, Any] = ray.get(graph) if isinstance(graph, ray.ObjectRef) else graph
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)

    model = build_model(payload, cfg)  # seeded: identical on every rank
    _seed_everything(cfg.seed + rank)
    expected = model_args(payload, cfg)
    start_epoch, history = 0, []
    opt_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            meta = load_meta(ckpt_dir)
            check_compatible(meta, expected, payload["fingerprint"], str(checkpoint.path))
            state = load_state(ckpt_dir)
        model.load_state_dict(state["model"])
        opt_state = state["optimizer"]
        start_epoch, history = int(meta["epoch"]), list(meta["history"])

    edge_index = np.array(payload["edge_index"], dtype=np.int64)
    adj = build_graph_adjacency(payload, device)
    sampler = NegativeSampler(edge_index, payload["num_items"])
    ddp_model = ray.train.torch.prepare_model(
        model,
        parallel_strategy_kwargs={
            # item_features is identical on every rank: no need to broadcast it every step.
            "broadcast_buffers": False,
            # Gradients live in DDP's all-reduce buckets: one copy of every embedding's
            # gradient fewer per step (they are dense over the whole graph).
            "gradient_as_bucket_view": True,
        },
    )
    optimizer = make_optimizer(ddp_model, cfg)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    meta_out = {
        "model_args": expected,
        "graph_fingerprint": payload["fingerprint"],
        "seed": cfg.seed,
        "run_name": cfg.run_name,
    }
    num_edges = edge_index.shape[1]

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        stats = train_epoch(
            ddp_model, optimizer, adj, edge_index, sampler, cfg, epoch, rank, world_size
        )
        loss, seconds, rss_max, rss_sum = _reduce_stats(stats, device, world_size)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "epochs": cfg.epochs,
            "loss": loss,
            "epoch_seconds": seconds,
            "edges_per_second": num_edges / seconds if seconds > 0 else float("nan"),
            "peak_rss_mb": rss_max,
            "peak_rss_mb_total": rss_sum,
            "num_workers": world_size,
        }
        history.append(metrics)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_state(tmp, model, optimizer, epoch, history, meta_out)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)


def _reduce_stats(
    stats: EpochStats, device: torch.device, world_size: int
) -> tuple[float, float, float, float]:
    """Global (loss, epoch seconds, max worker peak RSS, summed peak RSS) over all ranks."""
    rss = _peak_rss_mb()
    if world_size == 1 or not torch.distributed.is_initialized():
        return stats.loss, stats.seconds, rss, rss
    sums = torch.tensor([stats.loss_sum, float(stats.num_edges), rss], dtype=torch.float64)
    maxes = torch.tensor([stats.seconds, rss], dtype=torch.float64)
    sums, maxes = sums.to(device), maxes.to(device)
    torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
    torch.distributed.all_reduce(maxes, op=torch.distributed.ReduceOp.MAX)
    s, m = sums.cpu().tolist(), maxes.cpu().tolist()
    return s[0] / max(s[1], 1.0), m[0], m[1], s[2]


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


def format_progress(metrics: dict[str, Any]) -> str:
    """One progress line: ``epoch 3/20  loss 0.2134  12.3s  98k edges/s  1234 MB``."""
    eps = float(metrics.get("edges_per_second", float("nan")))
    return (
        f"epoch {metrics['epoch']}/{metrics.get('epochs', '?')}  "
        f"loss {float(metrics['loss']):.4f}  {float(metrics['epoch_seconds']):.1f}s  "
        f"{eps / 1000:.0f}k edges/s  peak {float(metrics.get('peak_rss_mb', 0.0)):.0f} MB/worker"
    )


def _print_progress(metrics: dict[str, Any]) -> None:
    print(format_progress(metrics), flush=True)


def fit(
    inter: Interactions, cfg: TrainConfig, progress: ProgressFn | None = None
) -> TrainResult:
    """Train IntentGNN with Ray Train and return the final embeddings.

    Ray must already be initialised by the caller (``ray.init(...)``, with the project
    importable on the workers, e.g. through ``runtime_env``); ``fit`` never starts or joins a
    cluster itself. Re-running with the same ``cfg.storage_path`` and ``cfg.run_name``
    resumes from the latest checkpoint there and trains up to ``cfg.epochs``.

    Args:
        inter: The training graph.
        cfg: Training configuration.
        progress: Called on the driver with each epoch's metrics (from a helper thread, in
            epoch order). None prints one line per epoch; pass ``lambda m: None`` to silence.

    Returns:
        Embeddings computed on the driver (CPU) from the final checkpoint, the per-epoch
        history of this call, wall time and the checkpoint location.

    Raises:
        UnavailableError: If Ray is not initialised.
        DataError: If the graph is inconsistent or has fewer edges than workers.
        ConfigError: If the run folder holds a checkpoint of a differently shaped model.
    """
    from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        raise UnavailableError(
            "Ray is not initialised: call ray.init() (or ray.init(address='auto') to join a "
            "cluster) before graph.train_loop.fit()"
        )
    payload = graph_payload(inter)
    num_edges = payload["edge_index"].shape[1]
    if num_edges < cfg.num_workers:
        raise DataError(
            f"the graph has {num_edges} edges, fewer than num_workers ({cfg.num_workers}); "
            "use fewer workers"
        )
    expected = model_args(payload, cfg)
    run_path = _join(cfg.storage_path, cfg.run_name)
    resumed_from = _previous_epoch(run_path, expected, payload["fingerprint"])

    buffer = _ProgressBuffer.remote()  # type: ignore[attr-defined]
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.model_dump(), "graph": ray.put(payload)},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": 1 if cfg.use_gpu else 0},
        ),
        run_config=RunConfig(
            storage_path=cfg.storage_path,
            name=cfg.run_name,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # ray.train's RunConfig is typed against V1's callback base; this is V2's.
            callbacks=[_ReportForwarder(buffer)],  # type: ignore[list-item]
        ),
    )
    stop = threading.Event()
    forward = progress or _print_progress
    poller = threading.Thread(
        target=_poll_progress, args=(buffer, forward, stop), name="intentrec-train-progress",
        daemon=True,
    )
    poller.start()
    start = time.perf_counter()
    try:
        result: Result = trainer.fit()
    finally:
        train_seconds = time.perf_counter() - start
        stop.set()
        poller.join()
        _drain(buffer, forward)
        ray.kill(buffer)

    if result.checkpoint is None:
        raise IntentrecError(f"training under {run_path} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        meta = load_meta(ckpt_dir)
        check_compatible(meta, expected, payload["fingerprint"], run_path)
        state = load_state(ckpt_dir)
    model = build_model(payload, cfg)
    model.load_state_dict(state["model"])
    trained_users, trained_items = _has_edges(payload)
    user_emb, item_emb = export_embeddings(
        model, build_graph_adjacency(payload), trained_items, trained_users
    )
    return TrainResult(
        user_emb=user_emb,
        item_emb=item_emb,
        history=[h for h in meta["history"] if int(h["epoch"]) > resumed_from],
        train_seconds=train_seconds,
        checkpoint_path=_checkpoint_uri(cfg.storage_path, result.checkpoint.path),
        model=model,
        trained_users=trained_users,
        trained_items=trained_items,
    )


def embed(result: TrainResult, inter: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of a trained model propagated over another graph with the same nodes.

    LightGCN propagation has no parameters, so a model trained on an earlier window can be
    propagated over the full training graph: the newest edges shape the embeddings without
    retraining. Id embeddings of users and items that had no edges in the *training* graph
    are zeroed (never trained); such items rely on their features and new neighbours.

    Args:
        result: What :func:`fit` returned.
        inter: A graph over the same users, items and feature vocabularies.

    Returns:
        ``(user_emb, item_emb)`` float32 numpy arrays.

    Raises:
        DataError: If ``inter`` has other users, items or feature vocabularies.

    Shapes:
        - output: ``([U, d], [I, d])``
    """
    trained = result.model
    if trained is None or result.trained_items is None:
        raise IntentrecError("this TrainResult holds no model: it did not come from fit()")
    payload = graph_payload(inter)
    if (payload["num_users"], payload["num_items"], payload["feature_cardinalities"]) != (
        trained.num_users, trained.num_items, trained.feature_cardinalities
    ):
        raise DataError(
            f"embed() needs the training graph's nodes: the model has {trained.num_users} "
            f"users, {trained.num_items} items, feature sizes {trained.feature_cardinalities}; "
            f"the graph has {payload['num_users']}, {payload['num_items']}, "
            f"{payload['feature_cardinalities']}. Build it with the same user_ids and items"
        )
    model = IntentGNN(
        trained.num_users,
        trained.num_items,
        trained.feature_cardinalities,
        dim=trained.dim,
        num_layers=trained.num_layers,
        item_features=torch.from_numpy(payload["item_features"]),
    )
    model.load_state_dict(trained.state_dict())
    return export_embeddings(
        model, build_graph_adjacency(payload), result.trained_items, result.trained_users
    )


def _has_edges(payload: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    edge_index = payload["edge_index"]
    users = np.bincount(edge_index[0], minlength=payload["num_users"]) > 0
    items = np.bincount(edge_index[1], minlength=payload["num_items"]) > 0
    return users, items


def _join(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def _checkpoint_uri(storage_path: str, fs_path: str) -> str:
    # Checkpoint.path drops the URI scheme ("bucket/run/ckpt"); give it back.
    if "://" in storage_path and "://" not in fs_path:
        return f"{storage_path.split('://', 1)[0]}://{fs_path}"
    return fs_path


def _previous_epoch(run_path: str, expected: dict[str, Any], fingerprint: str) -> int:
    """Epoch of the checkpoint a run at ``run_path`` would resume from (0 if none).

    Checked on the driver so that an incompatible checkpoint fails fast with a clear error
    instead of failing every worker (and every retry).
    """
    from ray.train import Result

    # Reading the snapshot logs Ray's "a run snapshot was found" notice at INFO; the
    # controller logs it again when it restores the run, once is enough.
    ckpt_log = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = ckpt_log.level
    ckpt_log.setLevel(logging.WARNING)
    try:
        previous = Result.from_path(run_path)
    except RuntimeError:  # no run folder or no checkpoint snapshot yet: a fresh run
        return 0
    finally:
        ckpt_log.setLevel(level)
    if previous.checkpoint is None:
        return 0
    with previous.checkpoint.as_directory() as ckpt_dir:
        meta = load_meta(ckpt_dir)
    check_compatible(meta, expected, fingerprint, run_path)
    log.info("resuming run %s from its epoch-%s checkpoint", run_path, meta["epoch"])
    return int(meta["epoch"])


# --------------------------------------------------------------------------------------
# Progress: the controller forwards each report to a buffer actor the driver polls.
# --------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class _ProgressBuffer:
    """Holds reported metrics until the driver's poller drains them."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []

    def put(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def drain(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items


class _ReportForwarder(UserCallback):
    """Runs on the Ray Train controller: sends rank 0's metrics of each report to the buffer."""

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if metrics:
            # Fire and forget: the controller must not block on the driver's poller.
            self._buffer.put.remote(dict(metrics[0]))


def _drain(buffer: Any, progress: ProgressFn) -> None:
    try:
        items = ray.get(buffer.drain.remote(), timeout=30)
    except Exception:  # the buffer is best effort; training results do not depend on it
        return
    for item in items:
        try:
            progress(item)
        except Exception as exc:  # a broken progress callback must not kill training
            print(f"progress callback failed: {exc!r}", file=sys.stderr)


def _poll_progress(buffer: Any, progress: ProgressFn, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        _drain(buffer, progress)
