"""``python -m graph.batch``: top-k for every known user through Ray Data, the same answers the
serving ranker gives those users with no session, at the same time."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from actors.ranker import RankerService, RankQuery
from graph.artifacts import read_artifact

REPO_ROOT = Path(__file__).resolve().parents[2]
AT = datetime(2017, 12, 2, 10, 0, tzinfo=UTC)


@pytest.mark.timeout(1800)  # starts its own Ray and Ray Data actors
def test_batch_writes_top_k_per_user_equal_to_serving(svd_artifact_root: str,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "recs.parquet"
    forgotten = tmp_path / "forgotten.txt"
    art = read_artifact(svd_artifact_root)
    users = art.user_ids.astype(str).tolist()
    from graph.forgotten import encode_record

    forgotten.write_bytes(encode_record(users[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "graph.batch", "--artifacts", svd_artifact_root, "--output",
         str(out), "--k", "10", "--at", AT.isoformat(), "--max-users", "40", "--workers", "1",
         "--forgotten", str(forgotten), "--address", "local"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[batch] top-10 for 40 users" in proc.stdout, proc.stdout

    recs = pd.read_parquet(out)
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score", "title", "category",
                                  "model_version"]
    expected_users = [u for u in users if u != users[1]][:40]
    assert sorted(recs["user_id"].unique()) == sorted(expected_users)
    assert (recs.groupby("user_id")["rank"].apply(list) == [list(range(1, 11))] * 40).all()
    assert (recs["model_version"] == art.version).all()

    svc = RankerService(svd_artifact_root)
    for user in expected_users[:8]:
        served = svc.recommend(RankQuery(user_id=user, k=10, now=AT.timestamp()))
        batch = recs[recs["user_id"] == user].sort_values("rank")["item_id"].tolist()
        assert batch == [it["item_id"] for it in served["items"]], user
