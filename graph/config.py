"""Training configuration: one typed, strict model for the GNN and its Ray Train job.

Unknown keys are errors and every message names the bad value and the fix (the pattern of
Feast's config base model). Data options (split date, event weights, ...) live with the data
code, not here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# "s3://bucket/prefix", "gs://...", "file:///abs/path", ...: anything pyarrow.fs can open.
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


def _check_range(name: str, value: float, lo: float, hi: float, fix: str) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} ({value}) must be between {lo} and {hi}; {fix}")


class TrainConfig(BaseModel):
    """Hyper-parameters and run settings of one GNN training run.

    Args:
        dim: Embedding width of users, items and item features.
        num_layers: LightGCN propagation layers (0 = no propagation: ids + features only).
        epochs: Passes over the training edges. A run resumed from a checkpoint trains the
            epochs after the checkpoint's, up to this number.
        lr: Adam learning rate.
        batch_size: Positive edges per optimisation step *per worker* (the global batch is
            ``batch_size * num_workers``). Each step propagates over the whole graph, a cost
            that does not depend on the batch, so workers speed an epoch up only by taking
            fewer, larger global steps (``num_workers=1`` with ``batch_size=16384`` keeps the
            default global batch of 16,384).
        reg: L2 weight on the embeddings of each batch (users, positives and negatives).
        id_dropout: Probability of dropping an item's id embedding in a training step, so the
            item-feature path learns to stand alone for cold-start items.
        num_negatives: Sampled negatives per positive edge.
        num_workers: Ray Train workers (one DDP process each). Every worker propagates over
            the whole graph at every step, so on one machine one worker with all its cores is
            faster than several with one core each: on the built-in data, 2 cores, 49 steps of
            16,384 edges, 12.7-13.3 s per epoch for 1 worker x 2 cores against 19.3-20.5 s for
            2 workers x 1 core, the same loss (``bench/train_bench.py``). It is not the
            default because its GNNs scored lower through the ranker on held-out validation
            shoppers: discovery recall@20 -0.0015 on average, lower in all eight comparisons
            (three GNN seeds, two to four quarters each; ``docs/EXPERIMENTS.md``).
        cpus_per_worker: CPU cores reserved per worker; on the CPU, also the worker's torch
            threads. None (the default): the cluster's free CPUs shared among the workers, as
            many as let every worker fit on a node (:func:`graph.train_loop.worker_cpus`).
        use_gpu: One GPU per worker.
        seed: Seeds model initialisation (the same on every worker), shuffling and sampling.
        storage_path: Where Ray Train writes checkpoints: an absolute local path or a URI
            (``s3://bucket/prefix``). A relative local path is made absolute.
        run_name: Name of the run folder under ``storage_path``. Running again with the same
            name resumes from the latest checkpoint in that folder.
        max_failures: Worker-group failures Ray Train recovers from (from the latest
            checkpoint) before giving up; -1 retries forever.
        text_input: Each item's layer-0 vector gains a learned projection of its sentence-model
            text vector: ``"on"``, ``"off"``, or ``"auto"``: on when at least half of the items
            have a title of their own (:func:`graph.text.own_title_share`), off when the texts
            are only category paths, which the category fields already encode (the built-in
            data; there it lowered the GNN's validation recall@20 from 0.0606 to 0.0593).
        retain_freed_memory: On the CPU, keep the memory of each step's whole-graph tensors
            in the worker for the next step instead of returning it to the kernel
            (:func:`graph.malloc.retain_freed_memory`). At 128 dimensions epochs 1.8-1.9x
            faster for twice the worker's memory (2.7 instead of 1.2-1.3 GB); at 64 glibc
            already does it by itself (no measurable difference).
    """

    model_config = ConfigDict(extra="forbid")

    dim: int = 64
    num_layers: int = 3
    # The built-in data (734k edges before the validation cut) takes 18-20 s per epoch with 2
    # workers on 2 quiet cores (11-13 s with one worker x 2 cores), plus ~20 s of start-up
    # (bench/train_bench.py). The loss is still falling at 8 epochs; more epochs trade
    # minutes for quality.
    epochs: int = 8
    lr: float = 0.01
    batch_size: int = 8192
    reg: float = 1e-4
    id_dropout: float = 0.2
    num_negatives: int = 1
    num_workers: int = 2
    cpus_per_worker: int | None = None
    use_gpu: bool = False
    seed: int = 0
    storage_path: str = Field(default="checkpoints", validate_default=True)
    run_name: str = "intentrec"
    max_failures: int = 1
    text_input: Literal["auto", "on", "off"] = "auto"
    retain_freed_memory: bool = True

    @field_validator("dim")
    @classmethod
    def _dim(cls, v: int) -> int:
        _check_range("dim", v, 1, 4096, "use e.g. 64")
        return v

    @field_validator("num_layers")
    @classmethod
    def _num_layers(cls, v: int) -> int:
        _check_range("num_layers", v, 0, 8, "LightGCN works best with 1-4 layers; use e.g. 3")
        return v

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: int) -> int:
        _check_range("epochs", v, 1, 10_000, "use e.g. 8")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"lr ({v}) must be > 0 and <= 1; use e.g. 0.01")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: int) -> int:
        _check_range("batch_size", v, 1, 10_000_000, "use e.g. 8192")
        return v

    @field_validator("reg")
    @classmethod
    def _reg(cls, v: float) -> float:
        _check_range("reg", v, 0.0, 1.0, "use e.g. 1e-4 (0 disables it)")
        return v

    @field_validator("id_dropout")
    @classmethod
    def _id_dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(
                f"id_dropout ({v}) must be >= 0 and < 1 (1 would never train item ids); "
                "use e.g. 0.2 (0 disables it)"
            )
        return v

    @field_validator("num_negatives")
    @classmethod
    def _num_negatives(cls, v: int) -> int:
        _check_range("num_negatives", v, 1, 256, "use e.g. 1")
        return v

    @field_validator("num_workers")
    @classmethod
    def _num_workers(cls, v: int) -> int:
        _check_range("num_workers", v, 1, 1024, "use at most the number of CPUs (or GPUs)")
        return v

    @field_validator("cpus_per_worker")
    @classmethod
    def _cpus_per_worker(cls, v: int | None) -> int | None:
        if v is not None:
            _check_range("cpus_per_worker", v, 1, 1024,
                         "use at most the cores of one node, or leave it unset (automatic)")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        _check_range("seed", v, 0, 2**31 - 1, "use a non-negative 32-bit integer")
        return v

    @field_validator("max_failures")
    @classmethod
    def _max_failures(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"max_failures ({v}) must be >= -1 (-1 = retry forever); use e.g. 1")
        return v

    @field_validator("storage_path")
    @classmethod
    def _storage_path(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError(
                "storage_path ('') must name a folder: an absolute local path or a URI "
                "such as s3://bucket/prefix"
            )
        if _URI_RE.match(v):
            if v.split("://", 1)[1].strip("/") == "":
                raise ValueError(
                    f"storage_path ({v!r}) names no bucket or folder; use e.g. s3://bucket/prefix"
                )
            return v
        if "://" in v or v.startswith(":"):
            raise ValueError(
                f"storage_path ({v!r}) is neither a local path nor a valid URI; use an "
                "absolute path or scheme://bucket/prefix"
            )
        # Ray Train needs an absolute path: workers do not share the driver's working dir.
        return str(Path(v).expanduser().resolve())

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not _RUN_NAME_RE.match(v):
            raise ValueError(
                f"run_name ({v!r}) must be 1-128 characters of letters, digits, '.', '_' or '-' "
                "and start with a letter or digit; use e.g. 'intentrec-2017-12'"
            )
        return v
