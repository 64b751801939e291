"""The feedback loop end to end: events posted over HTTP to the serving app's code, exported from
its session log by ``python train_job.py --online-events``, trained on with a small slice of the
built-in data; the new version knows the new shopper and what they carted, the old one did not,
and has learned the department lift of the device the events were posted from.

The app is the serving code in one process under uvicorn on 127.0.0.1
(``bench/inprocess_app.py``: the same routes, ingress, ranker and session shards with their
write-ahead log; no Ray), so the only Ray here is the training job's own private cluster.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from graph import schema as S
from graph.artifacts import read_artifact
from tests.helpers import wait_for_condition

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = "client-key-for-online-events-01"
NEW_USER = "online-shopper-1"


@pytest.mark.timeout(2400)  # a Ray Train run on a slice; slow on a shared 2-core machine
def test_posted_events_are_exported_and_trained_on(svd_artifact_root: str, tmp_path: Path) -> None:
    import uvicorn
    from ray import serve

    from bench.inprocess_app import build

    mp = pytest.MonkeyPatch()
    mp.setattr(serve, "get_replica_context", serve.get_replica_context)
    mp.setenv("INTENTREC_API_KEY", KEY)
    root = tmp_path / "models"
    shutil.copytree(svd_artifact_root, root)
    wal = tmp_path / "wal"
    api = build({"artifacts_root": str(root), "state_dir": str(tmp_path / "state"),
                 "reload_poll_s": 0, "inline_context": True,
                 "session": {"num_shards": 2, "wal_uri": str(wal)}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_condition(lambda: server.started, timeout=60, what="uvicorn serves the app")
        url, auth = f"http://127.0.0.1:{port}", {"X-API-Key": KEY}
        shown = httpx.post(url + "/v1/recommendations", json={"session_id": "online-1", "k": 10},
                           timeout=30).json()
        carted = [it["item_id"] for it in shown["items"][3:6]]
        r = httpx.post(url + "/v1/events", headers=auth, timeout=30, json={"events": [
            {"session_id": "online-1", "user_id": NEW_USER, "event": "add_to_cart",
             "item_id": item, "from_request": shown["request_id"], "device": "app"}
            for item in carted]})
        assert r.status_code == 202, r.text
        assert [e["attributed"]["position"] for e in r.json()["events"]] == [4, 5, 6]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        mp.undo()

    old = read_artifact(str(root))
    assert NEW_USER not in set(old.user_ids.tolist())

    out = tmp_path / "retrained"
    export = tmp_path / "online.parquet"
    proc = subprocess.run(
        [sys.executable, "train_job.py", "--address", "local", "--online-events", str(wal),
         "--online-export", str(export), "--max-users", "150", "--epochs", "1", "--dim", "16",
         "--skip-eval", "--output", str(out), "--storage", str(tmp_path / "ckpt")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[online] exported 3 online events of 1 users" in proc.stdout, proc.stdout
    assert "[online] 3 online events of 1 users (1 new) joined the training data" in proc.stdout

    exported = pd.read_parquet(export)
    assert exported[S.USER_COL].tolist() == [NEW_USER] * 3
    assert sorted(exported[S.ITEM_COL]) == sorted(carted)
    assert exported[S.DEVICE_COL].tolist() == ["app"] * 3  # posted with the events

    new = read_artifact(str(out))
    users = new.user_ids.tolist()
    assert NEW_USER in users
    u = users.index(NEW_USER)
    sig = new.signals
    history = set(new.items[S.ITEM_COL].to_numpy()[
        sig.hist_indices[sig.hist_indptr[u]: sig.hist_indptr[u + 1]]].tolist())
    assert history == set(carted)
    assert np.isfinite(new.user_emb[u]).all() and np.abs(new.user_emb[u]).sum() > 0
    # The base data has no device column: the app's department lift comes from these events.
    assert not old.signals.attribute_lift
    assert list(sig.attribute_lift) == [S.DEVICE_COL] and list(sig.attribute_lift[S.DEVICE_COL]) == ["app"]
