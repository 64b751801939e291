"""The per-worker training code of :class:`~graph.model.IntentGNN`, in plain torch (no Ray).

:mod:`graph.train_loop` runs these functions inside Ray Train workers; tests, benchmarks and
``bench/gpu_check.py`` run them in-process. This module must not import Ray (directly or
through its imports), so that the training path can be exercised on a machine without it.

Randomness: model initialisation is seeded with ``seed`` on every rank (identical weights);
the epoch's edge permutation with ``(seed, epoch)`` (identical on every rank, so the
``rank::world_size`` shards partition it); negatives and id-dropout masks with
``(seed, epoch, rank)``. Every stream is derived from the epoch number, so a resumed run
draws exactly what an uninterrupted run would have drawn, without restoring generator state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from graph.config import TrainConfig
from graph.errors import ConfigError, DataError
from graph.malloc import retain_freed_memory
from graph.model import IntentGNN, NegativeSampler, bpr_loss, build_adjacency

if TYPE_CHECKING:
    from collections.abc import Sequence

    from graph.interactions import Interactions
    from graph.text import ItemText

STATE_FILE = "state.pt"
META_FILE = "meta.json"
# The model shape a checkpoint must match to be resumed or exported.
_MODEL_KEYS = ("num_users", "num_items", "feature_cardinalities", "dim", "num_layers", "text_dim")
# What a checkpoint written before a key existed means by it.
_MODEL_KEY_DEFAULTS: dict[str, Any] = {"text_dim": 0}


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


def graph_payload(inter: Interactions, text: ItemText | None = None) -> dict[str, Any]:
    """The training graph (and, given ``text``, the items' text vectors) as numpy arrays and
    ints, validated.

    Raises:
        DataError: If shapes or index ranges are inconsistent.
    """
    return make_payload(
        inter.edge_index,
        inter.edge_weight,
        inter.item_features,
        inter.feature_cardinalities,
        num_users=len(inter.user_ids),
        num_items=len(inter.item_ids),
        text_vectors=None if text is None else text.vectors,
        text_row=None if text is None else text.item_row,
    )


def make_payload(
    edge_index: Tensor | np.ndarray,
    edge_weight: Tensor | np.ndarray,
    item_features: Tensor | np.ndarray,
    feature_cardinalities: Sequence[int],
    num_users: int,
    num_items: int,
    text_vectors: np.ndarray | None = None,
    text_row: np.ndarray | None = None,
) -> dict[str, Any]:
    """:func:`graph_payload` from the graph's arrays (any integer/float dtypes), validated.

    Returns:
        ``edge_index`` int64, ``edge_weight`` float32, ``item_features`` int64,
        ``feature_cardinalities``, ``num_users``, ``num_items``, ``text_vectors`` float32 and
        ``text_row`` int64 (or None), and ``fingerprint`` (a hash of the arrays, recorded in
        checkpoints).

    Raises:
        DataError: If shapes or index ranges are inconsistent.

    Shapes:
        - edge_index: ``[2, E]``
        - edge_weight: ``[E]``
        - item_features: ``[I, F]``
    """
    edge_index = _as_numpy(edge_index).astype(np.int64, copy=False)
    edge_weight = _as_numpy(edge_weight).astype(np.float32, copy=False)
    item_features = _as_numpy(item_features).astype(np.int64, copy=False)
    num_users, num_items = int(num_users), int(num_items)
    cards = [int(c) for c in feature_cardinalities]
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
    arrays = [edge_index, edge_weight, item_features]
    if (text_vectors is None) != (text_row is None):
        raise DataError("give text_vectors and text_row together, or neither")
    if text_vectors is not None and text_row is not None:
        text_vectors = np.asarray(text_vectors, dtype=np.float32)
        text_row = np.asarray(text_row, dtype=np.int64)
        if text_vectors.ndim != 2 or text_row.shape != (num_items,):
            raise DataError(
                f"text_vectors must have shape [T, D] and text_row [num_items={num_items}], "
                f"got {list(text_vectors.shape)} and {list(text_row.shape)}"
            )
        if num_items and (text_row.min() < 0 or text_row.max() >= len(text_vectors)):
            raise DataError(f"text_row must hold rows of text_vectors in [0, {len(text_vectors)})")
        arrays += [text_vectors, text_row]
    digest = hashlib.blake2b(digest_size=8)
    for arr in arrays:
        digest.update(np.ascontiguousarray(arr).tobytes())
    return {
        "edge_index": edge_index,
        "edge_weight": edge_weight,
        "item_features": item_features,
        "feature_cardinalities": cards,
        "num_users": num_users,
        "num_items": num_items,
        "text_vectors": text_vectors,
        "text_row": text_row,
        "fingerprint": digest.hexdigest(),
    }


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def has_edges(payload: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Which users and which items have at least one edge in the payload's graph.

    Shapes:
        - output: ``([U] bool, [I] bool)``
    """
    edge_index = payload["edge_index"]
    users = np.bincount(edge_index[0], minlength=payload["num_users"]) > 0
    items = np.bincount(edge_index[1], minlength=payload["num_items"]) > 0
    return users, items


def build_model(payload: dict[str, Any], cfg: TrainConfig) -> IntentGNN:
    """A freshly initialised model for the payload's graph, seeded with ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    text_vectors, text_row = payload.get("text_vectors"), payload.get("text_row")
    return IntentGNN(
        payload["num_users"],
        payload["num_items"],
        payload["feature_cardinalities"],
        dim=cfg.dim,
        num_layers=cfg.num_layers,
        item_features=torch.from_numpy(np.array(payload["item_features"], dtype=np.int64)),
        text_vectors=None if text_vectors is None else torch.from_numpy(np.array(text_vectors)),
        text_row=None if text_row is None else torch.from_numpy(np.array(text_row)),
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
        "text_dim": 0 if payload.get("text_vectors") is None else int(
            np.shape(payload["text_vectors"])[1]),
    }


# --------------------------------------------------------------------------------------
# One worker's set-up and epoch: shared by the Ray worker and in-process training.
# --------------------------------------------------------------------------------------


@dataclass
class WorkerSetup:
    """What a worker builds before its first epoch.

    Attributes:
        model: The freshly initialised model, still on the CPU (Ray's ``prepare_model`` or
            the caller moves it to the device, after restoring a checkpoint into it).
        adj: Normalised adjacency, on the worker's device.
        edge_index: All positive (user, item) pairs, on the CPU.
        sampler: Negative sampler over the same positives.

    Shapes:
        - edge_index: ``[2, E]`` int64
    """

    model: IntentGNN
    adj: Tensor
    edge_index: np.ndarray
    sampler: NegativeSampler


def setup_worker(
    payload: dict[str, Any], cfg: TrainConfig, device: torch.device, rank: int = 0
) -> WorkerSetup:
    """Model, adjacency and sampler of one worker, seeded as every rank must be.

    On the CPU the worker uses ``cfg.cpus_per_worker`` torch threads (a process-wide setting;
    None leaves the process's own), and with ``cfg.retain_freed_memory`` the process keeps
    freed memory for the next step (:func:`graph.malloc.retain_freed_memory`: the whole-graph
    tensors are not faulted in from the kernel again at every step).
    """
    if device.type == "cpu":
        if cfg.retain_freed_memory:
            retain_freed_memory()
        if cfg.cpus_per_worker is not None:
            torch.set_num_threads(cfg.cpus_per_worker)
    model = build_model(payload, cfg)  # seeded: identical on every rank
    # After the model: initialisation must not depend on the rank.
    seed_everything(cfg.seed + rank)
    edge_index = np.array(payload["edge_index"], dtype=np.int64)
    adj = build_graph_adjacency(payload, device)
    sampler = NegativeSampler(edge_index, payload["num_items"])
    return WorkerSetup(model=model, adj=adj, edge_index=edge_index, sampler=sampler)


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


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's global and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        f"{k}={saved.get(k, _MODEL_KEY_DEFAULTS.get(k))!r} (now {expected[k]!r})"
        for k in _MODEL_KEYS
        if saved.get(k, _MODEL_KEY_DEFAULTS.get(k)) != expected[k]
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
