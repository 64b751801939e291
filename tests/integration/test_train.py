"""Ray Train end to end on a small slice of the built-in data: 2 DDP workers, checkpoints,
resume by run name, embeddings on the driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from graph.config import TrainConfig
from graph.data import load_builtin
from graph.errors import ConfigError
from graph.interactions import Interactions, build_interactions
from graph.train_loop import embed, fit
from graph.training import META_FILE, STATE_FILE, load_meta

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def inter() -> Interactions:
    ds = load_builtin(max_users=40, seed=0)
    return build_interactions(ds.events, ds.items)


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
    assert h["peak_rss_mb"] > 0 and h["peak_rss_mb_total"] >= h["peak_rss_mb"]
    ckpt = Path(str(first.checkpoint_path))
    assert ckpt.is_relative_to(tmp_path / "resume-test")
    assert (ckpt / STATE_FILE).is_file() and (ckpt / META_FILE).is_file()
    assert first.user_emb.shape == (inter.num_users, 16)
    assert first.item_emb.shape == (inter.num_items, 16)

    # Same storage_path + run_name: Ray Train hands the latest checkpoint back to the
    # workers, which continue with epoch 2 instead of starting over.
    second = fit(inter, cfg.model_copy(update={"epochs": 2}), progress=seen.append)
    assert [h["epoch"] for h in second.history] == [2]
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
