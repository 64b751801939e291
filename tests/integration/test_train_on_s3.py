"""Ray Train checkpoints on the object store: a run whose ``storage_path`` is an ``s3://`` URI
(moto's server on 127.0.0.1, tests/object_store.py) writes its checkpoints into the bucket, and a
second run with the same name resumes from them, as a retrain on a cluster whose node was
replaced would (``train_job.py --storage checkpoints`` under ``INTENTREC_STORAGE``)."""

from __future__ import annotations

import uuid

import pyarrow.fs as pafs
import pytest

from graph import storage
from graph.config import TrainConfig
from graph.data import load_builtin
from graph.interactions import build_interactions
from graph.train_loop import fit
from graph.training import META_FILE, STATE_FILE

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_checkpoints_go_to_the_bucket_and_a_rerun_resumes_from_it(s3_bucket: str) -> None:
    ds = load_builtin(max_users=40, seed=0)
    inter = build_interactions(ds.events, ds.items)
    root = storage.join(s3_bucket, f"checkpoints-{uuid.uuid4().hex[:8]}")
    cfg = TrainConfig(dim=8, num_layers=1, epochs=1, batch_size=4096, num_workers=1,
                      storage_path=root, run_name="s3-run")

    first = fit(inter, cfg)
    assert str(first.checkpoint_path).startswith("s3://")
    fs, base = storage.filesystem(root)
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if f.type == pafs.FileType.File]
    for name in (STATE_FILE, META_FILE):
        assert any(p.startswith(f"{base}/s3-run/") and p.endswith(f"/{name}") for p in files), (
            name, files)

    # A new driver process would see only the bucket: the same name continues with epoch 2.
    second = fit(inter, cfg.model_copy(update={"epochs": 2}))
    assert [h["epoch"] for h in second.history] == [2]
    assert second.checkpoint_path != first.checkpoint_path
