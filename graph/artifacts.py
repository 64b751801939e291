"""Versioned model artifacts with an atomically switched ``LATEST`` pointer.

Layout under ``root`` (a local folder or a pyarrow filesystem URI such as ``s3://bucket/models``)::

    root/
      LATEST                      one line: the version name (replaced atomically, last)
      20171201T000000-1a2b3c/     one folder per version, never modified after LATEST names it
        manifest.json             version, created, data fingerprint, config, training time, files
        metrics.json              {model: {task: {metric: value}}}
        training_curve.png        loss and validation recall@20 per epoch (graph/plots.py)
        metrics.png               the evaluation as bars
        user_emb.npy  item_emb.npy
        users.parquet             user_id (row i = user index i)
        items.parquet             item_id, title, category, department, brand, price (row = index)
        signals/                  graph.signals.RankingSignals.save()
        ranker/                   the LightGBM ranker (model.txt, meta.json) and item_features.npy
        text/                     graph.text.ItemText: item text vectors (vectors.npy, item_row.npy,
                                  meta.json)
        item_encoder/             graph.item_encoder.ItemEncoder: attributes -> GNN embedding of an
                                  item added after training (tables.npz, meta.json); optional
        _COMPLETE                 written last inside the folder

A reader resolves ``LATEST`` once and then reads only that folder, so a publish that happens while
it reads cannot hand it half a model: the folder it reads was complete before the pointer moved.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from graph import storage
from graph.errors import ArtifactError, NotFoundError

LATEST = "LATEST"
COMPLETE_MARKER = "_COMPLETE"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
SIGNALS_DIR = "signals"
RANKER_DIR = "ranker"
ITEM_FEATURES_FILE = "item_features.npy"
TEXT_DIR = "text"
ITEM_ENCODER_DIR = "item_encoder"
# 2: the learned ranker (ranker/); 3: item text embeddings (text/); 4: the item encoder
# (item_encoder/, optional: without it items cannot be added to the version)
FORMAT_VERSION = 4


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """Resolve a local path or a pyarrow URI (``s3://bucket/key``) into (filesystem, path)."""
    return storage.filesystem(root)


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def new_version_name(now: datetime | None = None) -> str:
    """Sortable, unique version name: ``YYYYmmddTHHMMSS-<6 hex>`` (UTC)."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass
class ModelArtifact:
    """One loaded model version: everything the ranker and the API need.

    Shapes:
        - **user_emb** ``[num_users, d]``, **item_emb** ``[num_items, d]`` (float32).
    """

    version: str
    path: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    user_ids: np.ndarray
    items: pd.DataFrame
    user_emb: np.ndarray
    item_emb: np.ndarray
    signals: Any  # graph.signals.RankingSignals (typed loosely to keep this module import-light)
    learned: Any  # graph.ltr.LearnedRanker
    item_static: np.ndarray  # graph.features.item_features, [num_items, len(ITEM_FEATURES)]
    text: Any  # graph.text.ItemText
    item_encoder: Any = None  # graph.item_encoder.ItemEncoder, None in versions before format 4

    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids.tolist())}

    def item_index(self) -> dict[str, int]:
        return {it: i for i, it in enumerate(self.items["item_id"].tolist())}


def write_artifact(
    root: str,
    *,
    user_ids: np.ndarray,
    items: pd.DataFrame,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    signals: Any,
    metrics: dict[str, Any],
    manifest: dict[str, Any],
    learned: Any,
    item_static: np.ndarray,
    text: Any,
    item_encoder: Any = None,
    version: str | None = None,
    set_latest: bool = True,
    extra_files: Mapping[str, bytes] | None = None,
) -> str:
    """Write a complete version folder, then (optionally) switch ``LATEST`` to it.

    ``learned`` is the :class:`graph.ltr.LearnedRanker` (anything with ``to_files() -> {name:
    bytes}``), ``item_static`` its per-item features and ``text`` the items' text embeddings
    (:class:`graph.text.ItemText`), ``item_encoder`` the
    :class:`graph.item_encoder.ItemEncoder` that embeds items added later (None: none).
    ``extra_files`` (name → bytes, e.g. the plots of
    :mod:`graph.plots`) are written into the folder before it is marked complete.

    Returns:
        The version name.
    """
    if user_emb.shape[0] != len(user_ids) or item_emb.shape[0] != len(items):
        raise ArtifactError(
            f"embedding rows ({user_emb.shape[0]} users, {item_emb.shape[0]} items) do not match "
            f"the id maps ({len(user_ids)} users, {len(items)} items)"
        )
    fs, base = filesystem(root)
    version = version or new_version_name()
    vdir = f"{base}/{version}"
    fs.create_dir(vdir, recursive=True)

    def npy(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
        return buf.getvalue()

    _write_bytes(fs, f"{vdir}/user_emb.npy", npy(user_emb))
    _write_bytes(fs, f"{vdir}/item_emb.npy", npy(item_emb))
    for name, df in (
        ("users.parquet", pd.DataFrame({"user_id": np.asarray(user_ids).astype(str)})),
        ("items.parquet", items.reset_index(drop=True)),
    ):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        _write_bytes(fs, f"{vdir}/{name}", buf.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        signals.save(tmp)
        fs.create_dir(f"{vdir}/{SIGNALS_DIR}", recursive=True)
        for f in sorted(Path(tmp).iterdir()):
            _write_bytes(fs, f"{vdir}/{SIGNALS_DIR}/{f.name}", f.read_bytes())
    if item_static.shape[0] != len(items):
        raise ArtifactError(f"item features have {item_static.shape[0]} rows for {len(items)} items")
    fs.create_dir(f"{vdir}/{RANKER_DIR}", recursive=True)
    for name, data in {**learned.to_files(), ITEM_FEATURES_FILE: npy(item_static)}.items():
        _write_bytes(fs, f"{vdir}/{RANKER_DIR}/{name}", data)
    if text.num_items != len(items):
        raise ArtifactError(f"text embeddings have {text.num_items} rows for {len(items)} items")
    fs.create_dir(f"{vdir}/{TEXT_DIR}", recursive=True)
    for name, data in text.to_files().items():
        _write_bytes(fs, f"{vdir}/{TEXT_DIR}/{name}", data)
    if item_encoder is not None:
        fs.create_dir(f"{vdir}/{ITEM_ENCODER_DIR}", recursive=True)
        for name, data in item_encoder.to_files().items():
            _write_bytes(fs, f"{vdir}/{ITEM_ENCODER_DIR}/{name}", data)
    full_manifest = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "num_users": len(user_ids),
        "num_items": len(items),
        "dim": int(item_emb.shape[1]),
        **manifest,
    }
    _write_bytes(fs, f"{vdir}/{METRICS}", json.dumps(metrics, indent=2, sort_keys=True).encode())
    for name, data in (extra_files or {}).items():
        _write_bytes(fs, f"{vdir}/{name}", data)
    _write_bytes(fs, f"{vdir}/{MANIFEST}", json.dumps(full_manifest, indent=2, default=str).encode())
    _write_bytes(fs, f"{vdir}/{COMPLETE_MARKER}", b"ok\n")
    if set_latest:
        set_latest_version(root, version)
    return version


def set_latest_version(root: str, version: str) -> None:
    """Point ``LATEST`` at ``version`` atomically (rename on local disk; one PUT on object stores).

    Raises:
        NotFoundError: if the version folder is not complete.
    """
    fs, base = filesystem(root)
    if not _exists(fs, f"{base}/{version}/{COMPLETE_MARKER}"):
        raise NotFoundError(
            f"model version {version!r} is not a complete artifact under {root}; "
            f"available: {list_versions(root)}",
            field="version",
        )
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{base}/.{LATEST}.{os.getpid()}.{time.monotonic_ns()}"
        with open(tmp, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, f"{base}/{LATEST}")
    else:
        _write_bytes(fs, f"{base}/{LATEST}", (version + "\n").encode())


def latest_version(root: str) -> str:
    """The version ``LATEST`` names.

    Raises:
        ArtifactError: when there is none yet, saying how to make one.
    """
    fs, base = filesystem(root)
    try:
        return _read_bytes(fs, f"{base}/{LATEST}").decode().strip()
    except (FileNotFoundError, OSError) as exc:
        raise ArtifactError(
            f"no trained model under {root} (no {LATEST} file): run `python train_job.py` "
            f"(or `python train_job.py --output {root}`) first"
        ) from exc


def has_latest(root: str) -> bool:
    """Whether ``root`` has a ``LATEST`` pointer yet (False before the first training run)."""
    fs, base = filesystem(root)
    return _exists(fs, f"{base}/{LATEST}")


def list_versions(root: str) -> list[str]:
    """Complete versions under ``root``, oldest first."""
    fs, base = filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return []
    out = [
        Path(i.path).name
        for i in infos
        if i.type == pafs.FileType.Directory and not Path(i.path).name.startswith(".")
        and _exists(fs, f"{i.path}/{COMPLETE_MARKER}")
    ]
    return sorted(out)


def versions_with_user(root: str, user_id: str) -> list[str]:
    """Complete versions under ``root`` whose ``users.parquet`` lists ``user_id``: the versions
    that hold the user's embedding row and purchase history. Reads one column per version."""
    import pyarrow.compute as pc

    fs, base = filesystem(root)
    out = []
    for version in list_versions(root):
        path = f"{base}/{version}/users.parquet"
        users = pq.read_table(io.BytesIO(_read_bytes(fs, path)), columns=["user_id"])["user_id"]
        if pc.any(pc.equal(users.cast("string"), user_id)).as_py():
            out.append(version)
    return out


def resolve_version(root: str, version: str = "latest") -> str:
    """``"latest"`` → the pointer's target; a named version is checked to exist."""
    if version == "latest":
        return latest_version(root)
    if version not in list_versions(root):
        raise NotFoundError(
            f"model version {version!r} not found under {root}; available: {list_versions(root)}",
            field="version",
        )
    return version


def read_manifest(root: str, version: str = "latest") -> dict[str, Any]:
    """The manifest of a complete version alone (what it was trained on, when, how), without
    loading its model."""
    version = resolve_version(root, version)
    fs, base = filesystem(root)
    if not _exists(fs, f"{base}/{version}/{COMPLETE_MARKER}"):
        raise ArtifactError(f"model version {version} under {root} is incomplete; retrain or roll back")
    manifest: dict[str, Any] = json.loads(_read_bytes(fs, f"{base}/{version}/{MANIFEST}"))
    return manifest


def read_artifact(root: str, version: str = "latest") -> ModelArtifact:
    """Load a complete model version (``"latest"`` or a name)."""
    from graph.item_encoder import ItemEncoder
    from graph.ltr import LearnedRanker  # local: keeps `import graph.artifacts` light
    from graph.signals import RankingSignals
    from graph.text import ItemText

    version = resolve_version(root, version)
    fs, base = filesystem(root)
    vdir = f"{base}/{version}"
    if not _exists(fs, f"{vdir}/{COMPLETE_MARKER}"):
        raise ArtifactError(f"model version {version} under {root} is incomplete; retrain or roll back")
    manifest = json.loads(_read_bytes(fs, f"{vdir}/{MANIFEST}"))
    metrics = json.loads(_read_bytes(fs, f"{vdir}/{METRICS}"))
    user_emb = np.load(io.BytesIO(_read_bytes(fs, f"{vdir}/user_emb.npy")))
    item_emb = np.load(io.BytesIO(_read_bytes(fs, f"{vdir}/item_emb.npy")))
    users = pq.read_table(io.BytesIO(_read_bytes(fs, f"{vdir}/users.parquet"))).to_pandas()
    items = pq.read_table(io.BytesIO(_read_bytes(fs, f"{vdir}/items.parquet"))).to_pandas()
    with tempfile.TemporaryDirectory() as tmp:
        for info in fs.get_file_info(pafs.FileSelector(f"{vdir}/{SIGNALS_DIR}")):
            Path(tmp, Path(info.path).name).write_bytes(_read_bytes(fs, info.path))
        signals = RankingSignals.load(tmp)
    if not _exists(fs, f"{vdir}/{RANKER_DIR}/{ITEM_FEATURES_FILE}"):
        raise ArtifactError(f"model version {version} under {root} has no learned ranker "
                            f"({RANKER_DIR}/): it was written by an older release; retrain with "
                            "`python train_job.py`")
    files = {Path(i.path).name: _read_bytes(fs, i.path)
             for i in fs.get_file_info(pafs.FileSelector(f"{vdir}/{RANKER_DIR}"))}
    item_static = _padded_item_static(np.load(io.BytesIO(files.pop(ITEM_FEATURES_FILE))))
    learned = LearnedRanker.from_files(files)
    if not _exists(fs, f"{vdir}/{TEXT_DIR}"):
        raise ArtifactError(f"model version {version} under {root} has no item text embeddings "
                            f"({TEXT_DIR}/): it was written by an older release; retrain with "
                            "`python train_job.py`")
    text = ItemText.from_files(
        {Path(i.path).name: _read_bytes(fs, i.path)
         for i in fs.get_file_info(pafs.FileSelector(f"{vdir}/{TEXT_DIR}"))}, len(items))
    encoder = None
    if _exists(fs, f"{vdir}/{ITEM_ENCODER_DIR}"):
        encoder = ItemEncoder.from_files(
            {Path(i.path).name: _read_bytes(fs, i.path)
             for i in fs.get_file_info(pafs.FileSelector(f"{vdir}/{ITEM_ENCODER_DIR}"))})
    return ModelArtifact(
        version=version,
        path=vdir,
        manifest=manifest,
        metrics=metrics,
        user_ids=users["user_id"].astype(str).to_numpy(),
        items=items,
        user_emb=user_emb,
        item_emb=item_emb,
        signals=signals,
        learned=learned,
        item_static=item_static,
        text=text,
        item_encoder=encoder,
    )


def _padded_item_static(static: np.ndarray) -> np.ndarray:
    """A version's per-item ranker features with the columns later releases appended
    (:data:`graph.features.ITEM_FEATURES`) as NaN: its ranker was fitted without them and never
    reads them, so this release serves the older version unchanged.

    Raises:
        ArtifactError: More columns than this release knows (a newer release wrote it).
    """
    from graph.features import ITEM_FEATURES

    have, want = static.shape[1], len(ITEM_FEATURES)
    if have > want:
        raise ArtifactError(f"item features have {have} columns, this release knows {want}: "
                            "the model version was written by a newer release; upgrade intentrec")
    if have == want:
        return static
    pad = np.full((static.shape[0], want - have), np.nan, dtype=static.dtype)
    return np.concatenate([static, pad], axis=1)
