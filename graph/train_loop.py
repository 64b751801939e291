"""Distributed training of :class:`~graph.model.IntentGNN` with Ray Train (Train V2).

Every worker holds the whole graph (full-graph LightGCN propagation each step) and trains on
its shard of the positive edges; DDP averages the gradients. Each epoch ends with one
``ray.train.report`` per worker carrying the epoch's metrics, rank 0's with a checkpoint. The
per-worker code itself (set-up, epochs, checkpoint files, seeding) is plain torch in
:mod:`graph.training`; this module is the Ray wiring around it.

Resume: Ray Train V2 restores a run from its folder ``storage_path/run_name``. Calling
:func:`fit` again with the same ``storage_path`` and ``run_name`` makes
``ray.train.get_checkpoint()`` return the latest checkpoint in that folder, and
:func:`train_func` continues from the epoch after it. A new ``run_name`` starts from scratch.
"""

from __future__ import annotations

import logging
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

from graph import storage
from graph.config import TrainConfig
from graph.errors import DataError, IntentrecError, UnavailableError
from graph.model import IntentGNN, export_embeddings
from graph.training import (
    EpochStats,
    build_graph_adjacency,
    build_model,
    check_compatible,
    graph_payload,
    has_edges,
    load_meta,
    load_state,
    make_optimizer,
    model_args,
    peak_rss_mb,
    save_state,
    setup_worker,
    train_epoch,
)
from graph.validation import VAL_METRIC, ValidationSample, embedding_recall

if TYPE_CHECKING:
    from graph.interactions import Interactions
    from graph.text import ItemText

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


# --------------------------------------------------------------------------------------
# The per-worker function
# --------------------------------------------------------------------------------------


def train_func(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop.

    Args:
        config: ``{"cfg": TrainConfig.model_dump(), "graph": ObjectRef or payload dict,
            "validation": ValidationSample or None}`` (the payload from
            :func:`~graph.training.graph_payload`). With a validation sample, rank 0 adds
            ``val_recall@20`` and its cost ``val_seconds`` to each epoch's metrics
            (:mod:`graph.validation`).
    """
    cfg = TrainConfig.model_validate(config["cfg"])
    graph = config["graph"]
    payload: dict[str, Any] = ray.get(graph) if isinstance(graph, ray.ObjectRef) else graph
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    worker = setup_worker(payload, cfg, device, rank)
    model, adj, edge_index, sampler = worker.model, worker.adj, worker.edge_index, worker.sampler

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
    validation: ValidationSample | None = config.get("validation") if rank == 0 else None
    trained = has_edges(payload) if validation is not None else None

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
            "cpus_per_worker": cfg.cpus_per_worker,
        }
        if validation is not None and trained is not None:
            # Rank 0 only: the other ranks start the next epoch and wait for it at its first
            # all-reduce, so the cost is one propagation and one scoring per epoch.
            t0 = time.perf_counter()
            user_emb, item_emb = export_embeddings(model, adj, trained[1], trained[0])
            metrics[VAL_METRIC] = embedding_recall(torch.from_numpy(user_emb),
                                                   torch.from_numpy(item_emb), validation)
            metrics["val_seconds"] = time.perf_counter() - t0
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
    rss = peak_rss_mb()
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


def worker_cpus(num_workers: int, free_cpus: list[float]) -> int:
    """Cores for each of ``num_workers`` Ray Train workers when the config leaves it open.

    The most cores per worker such that every worker fits on a node's free CPUs (several
    workers may share a node). At least 1: on a busy cluster the workers then wait for a core
    rather than fail.

    Args:
        num_workers: Ray Train workers.
        free_cpus: The CPUs free now on each alive node.
    """
    best = 1
    for cpus in range(2, int(max(free_cpus, default=0.0)) + 1):
        if sum(int(free // cpus) for free in free_cpus) >= num_workers:
            best = cpus
    return best


def free_cpus_per_node() -> list[float]:
    """The CPUs free now on each alive node of the running Ray cluster."""
    try:
        # Private, but what Ray's own placement helpers (ray.util.tpu) read.
        from ray._private.state import available_resources_per_node

        per_node = available_resources_per_node()
    except (ImportError, AttributeError):  # another Ray: the cluster as one node
        return [float(ray.available_resources().get("CPU", 0.0))]
    return [float(res.get("CPU", 0.0)) for res in per_node.values()]


def resolve_workers(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``cpus_per_worker`` filled in from the running cluster when it is None."""
    if cfg.cpus_per_worker is not None:
        return cfg
    cpus = worker_cpus(cfg.num_workers, free_cpus_per_node())
    return cfg.model_copy(update={"cpus_per_worker": cpus})


def format_progress(metrics: dict[str, Any]) -> str:
    """One progress line: ``epoch 3/20  loss 0.2134  12.3s  98k edges/s  1234 MB/worker``, then
    ``val recall@20 0.0812 (0.21s)`` when the epoch was validated."""
    eps = float(metrics.get("edges_per_second", float("nan")))
    line = (
        f"epoch {metrics['epoch']}/{metrics.get('epochs', '?')}  "
        f"loss {float(metrics['loss']):.4f}  {float(metrics['epoch_seconds']):.1f}s  "
        f"{eps / 1000:.0f}k edges/s  peak {float(metrics.get('peak_rss_mb', 0.0)):.0f} MB/worker"
    )
    if VAL_METRIC in metrics:
        line += (f"  val recall@20 {float(metrics[VAL_METRIC]):.4f} "
                 f"({float(metrics.get('val_seconds', 0.0)):.2f}s)")
    return line


def _print_progress(metrics: dict[str, Any]) -> None:
    print(format_progress(metrics), flush=True)


def fit(
    inter: Interactions, cfg: TrainConfig, progress: ProgressFn | None = None,
    validation: ValidationSample | None = None, text: ItemText | None = None,
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
        validation: Users and their held-out items: each epoch then reports
            ``val_recall@20`` of the embeddings (:mod:`graph.validation`). None: no validation.
        text: The catalogue's text vectors: each item's layer-0 vector gains a learned
            projection of its text vector (:class:`graph.model.IntentGNN`). None: no text input.

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
    cfg = resolve_workers(cfg)
    payload = graph_payload(inter, text)
    num_edges = payload["edge_index"].shape[1]
    if num_edges < cfg.num_workers:
        raise DataError(
            f"the graph has {num_edges} edges, fewer than num_workers ({cfg.num_workers}); "
            "use fewer workers"
        )
    expected = model_args(payload, cfg)
    run_path = storage.join(cfg.storage_path, cfg.run_name)  # before a URI's ?options
    resumed_from = _previous_epoch(run_path, expected, payload["fingerprint"])

    buffer = _ProgressBuffer.remote()  # type: ignore[attr-defined]
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.model_dump(), "graph": ray.put(payload),
                           "validation": validation},
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
    trained_users, trained_items = has_edges(payload)
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
        text_vectors=getattr(trained, "text_vectors", None),
        text_row=getattr(trained, "text_row", None),
    )
    model.load_state_dict(trained.state_dict())
    return export_embeddings(
        model, build_graph_adjacency(payload), result.trained_items, result.trained_users
    )


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
