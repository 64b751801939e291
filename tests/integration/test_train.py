"""Ray Train end to end on a small slice of the built-in data: 2 DDP workers, checkpoints,
resume by run name, embeddings on the driver; and ``train_job.py`` leaving forgotten users out
of what it publishes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from graph.config import TrainConfig
from graph.data import load_builtin
from graph.errors import ConfigError
from graph.interactions import Interactions, build_interactions
from graph.train_loop import embed, fit, free_cpus_per_node, resolve_workers
from graph.training import META_FILE, STATE_FILE, load_meta
from graph.validation import VAL_METRIC, ValidationSample

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def inter() -> Interactions:
    ds = load_builtin(max_users=40, seed=0)
    return build_interactions(ds.events, ds.items)


def test_worker_cores_follow_the_live_clusters_free_cpus() -> None:
    """``free_cpus_per_node`` reads Ray's per-node *available* CPUs (a private Ray API: this
    is the test that notices when an upgrade moves it), and ``resolve_workers`` gives a lone
    worker every free core of a node, one core less once an actor holds some."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    free = free_cpus_per_node()
    assert len(free) == len(alive) == 1
    assert sum(free) == pytest.approx(ray.available_resources().get("CPU", 0.0))
    if free[0] < 0.5:
        pytest.skip(f"another test still holds the cluster's CPUs ({free[0]} of 2 free)")
    # 2 on the idle 2-CPU test cluster (fewer if an earlier test left an actor holding some).
    assert resolve_workers(TrainConfig(num_workers=1)).cpus_per_worker == max(1, int(free[0]))
    assert resolve_workers(TrainConfig(num_workers=2)).cpus_per_worker == 1
    assert resolve_workers(TrainConfig(num_workers=1, cpus_per_worker=1)).cpus_per_worker == 1

    @ray.remote(num_cpus=0.5)
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.remote()  # type: ignore[attr-defined]
    try:
        ray.get(holder.ping.remote(), timeout=60)
        held = free_cpus_per_node()
        assert held[0] == pytest.approx(free[0] - 0.5)
        # 1.5 free CPUs of 2: a whole core, not two, for the lone worker.
        assert resolve_workers(TrainConfig(num_workers=1)).cpus_per_worker == max(
            1, int(free[0] - 0.5))
    finally:
        ray.kill(holder)


def test_fit_checkpoints_each_epoch_and_resumes_by_run_name(
    inter: Interactions, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        dim=16,
        num_layers=2,
        epochs=1,
        batch_size=4096,
        num_workers=2,
        storage_path=str(tmp_path),
        run_name="resume-test",
    )
    seen: list[dict[str, Any]] = []
    first = fit(inter, cfg, progress=seen.append)

    assert [h["epoch"] for h in first.history] == [1]
    assert [m["epoch"] for m in seen] == [1]  # progress reached the driver
    h = first.history[0]
    assert h["num_workers"] == 2 and h["loss"] > 0 and h["edges_per_second"] > 0
    # cpus_per_worker was left open: two workers on the 2-CPU test cluster get one core each.
    assert h["cpus_per_worker"] == 1
    assert h["peak_rss_mb"] > 0 and h["peak_rss_mb_total"] >= h["peak_rss_mb"]
    ckpt = Path(str(first.checkpoint_path))
    assert ckpt.is_relative_to(tmp_path / "resume-test")
    assert (ckpt / STATE_FILE).is_file() and (ckpt / META_FILE).is_file()
    assert first.user_emb.shape == (inter.num_users, 16)
    assert first.item_emb.shape == (inter.num_items, 16)

    # Same storage_path + run_name: Ray Train hands the latest checkpoint back to the
    # workers, which continue with epoch 2 instead of starting over.
    # With a validation sample, rank 0 reports the embeddings' recall@20 with the epoch.
    val = ValidationSample(np.arange(10), [np.array([n, n + 1]) for n in range(10)])
    second = fit(inter, cfg.model_copy(update={"epochs": 2}), progress=seen.append,
                 validation=val)
    assert [h["epoch"] for h in second.history] == [2]
    assert VAL_METRIC not in first.history[0]
    recall = second.history[0][VAL_METRIC]
    assert 0.0 <= recall <= 1.0 and second.history[0]["val_seconds"] > 0
    assert seen[-1][VAL_METRIC] == recall  # in the progress the driver prints
    assert [m["epoch"] for m in seen] == [1, 2]
    assert [h["epoch"] for h in load_meta(str(second.checkpoint_path))["history"]] == [1, 2]
    assert second.checkpoint_path != first.checkpoint_path
    assert second.user_emb.shape == (inter.num_users, 16)
    assert second.item_emb.shape == (inter.num_items, 16)
    assert np.isfinite(second.item_emb).all()
    assert not np.allclose(second.item_emb, first.item_emb)

    # Nothing left to train: the embeddings come from the same checkpoint.
    third = fit(inter, cfg.model_copy(update={"epochs": 2}), progress=seen.append)
    assert third.history == []
    assert third.checkpoint_path == second.checkpoint_path
    np.testing.assert_allclose(third.item_emb, second.item_emb, atol=1e-6)

    # Propagating the trained model over the same graph reproduces fit's embeddings.
    user_emb, item_emb = embed(second, inter)
    np.testing.assert_allclose(user_emb, second.user_emb, atol=1e-5)
    np.testing.assert_allclose(item_emb, second.item_emb, atol=1e-5)

    # A differently shaped model must not silently resume this run.
    with pytest.raises(ConfigError, match=r"dim=16 \(now 8\)"):
        fit(inter, cfg.model_copy(update={"dim": 8, "epochs": 3}))


# --------------------------------------------------------------------------------------------
# Forget means forget: a retrain leaves a forgotten user out of every file it publishes
# --------------------------------------------------------------------------------------------

ID_SUFFIX = "-q7zxv"  # makes every user id a string that no other content holds by accident


def _files_holding(vdir: Path, needle: str) -> list[str]:
    """Files of a version folder that hold ``needle``: in their raw bytes (JSON, text, LightGBM's
    model, parquet metadata) or among their decoded string values. Parquet pages are compressed,
    so a string column is searched decoded (its raw bytes might not show an id that is there);
    ``.npy``/``.npz`` arrays are searched when they hold strings (numeric arrays cannot hold an
    id made of letters)."""
    import pyarrow.parquet as pq

    hits = []
    for f in sorted(p for p in vdir.rglob("*") if p.is_file()):
        found = needle.encode() in f.read_bytes()
        if f.suffix == ".parquet":
            table = pq.read_table(f)
            found |= any(needle in str(v) for col in table.columns for v in col.to_pylist())
        elif f.suffix in (".npy", ".npz"):
            loaded = np.load(f, allow_pickle=False)
            arrays = [loaded[k] for k in loaded.files] if f.suffix == ".npz" else [loaded]
            found |= any(a.dtype.kind in "US" and any(needle in str(v) for v in a.ravel())
                         for a in arrays)
        if found:
            hits.append(str(f.relative_to(vdir)))
    return hits


def test_a_retrain_leaves_a_forgotten_user_out_of_every_published_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train_job.py`` twice on the same slice of the built-in data (canonical files, user ids
    made unmistakable): before and after ``DELETE /v1/users/{id}`` wrote the user to the
    forgotten-users file. The search that finds the user in the first version (the control: it
    does find ids) finds nothing in the second, which has one user less and says so in its
    manifest, by count only."""
    import train_job
    from actors.tombstones import Tombstones

    ds = load_builtin(max_users=80, seed=1)
    events = ds.events.assign(user_id=ds.events["user_id"] + ID_SUFFIX)
    events.to_parquet(tmp_path / "events.parquet")
    ds.items[ds.items["item_id"].isin(events["item_id"])].to_parquet(tmp_path / "items.parquet")
    forgotten = tmp_path / "state" / "forgotten_users.txt"
    forgotten.parent.mkdir()
    forgotten.write_text("")  # nobody yet (and not whatever ./state holds)
    output = tmp_path / "models"

    def train(run: str) -> tuple[Path, dict[str, Any]]:
        rc = train_job.main([
            "--events", str(tmp_path / "events.parquet"), "--items", str(tmp_path / "items.parquet"),
            "--split-at", "2017-12-01", "--epochs", "1", "--dim", "8", "--layers", "1",
            "--workers", "1", "--skip-eval", "--storage", str(tmp_path / "ckpt"),
            "--run-name", run, "--output", str(output), "--forgotten", str(forgotten),
        ])
        assert rc == 0, capsys.readouterr()
        vdir = output / (output / "LATEST").read_text().strip()
        return vdir, json.loads((vdir / "manifest.json").read_text())

    before, m_before = train("forget-before")
    users = pq_users(before)
    user, other = users[0], users[1]
    assert user.endswith(ID_SUFFIX)
    assert _files_holding(before, user), "the control: the search finds a user the model holds"

    Tombstones(str(forgotten)).add(user)  # what DELETE /v1/users/{id} does to this file
    capsys.readouterr()
    after, m_after = train("forget-after")
    out = capsys.readouterr().out
    assert "[forget] excluded 1 forgotten user(s)" in out, out

    assert _files_holding(after, user) == []
    assert _files_holding(after, other), "a user not forgotten is still found"
    assert pq_users(after) == [u for u in users if u != user]
    assert m_after["num_users"] == m_before["num_users"] - 1
    assert m_before["data"]["forgotten_users_excluded"] == 0
    assert m_after["data"]["forgotten_users_excluded"] == 1
    assert m_after["data"]["forgotten_events_excluded"] == int((events["user_id"] == user).sum())


def pq_users(vdir: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [str(u) for u in pq.read_table(vdir / "users.parquet")["user_id"].to_pylist()]
