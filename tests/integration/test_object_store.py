"""Shared state on a real S3-compatible object store (moto's server on 127.0.0.1, through
pyarrow's S3 filesystem): model artifacts and loading, the session write-ahead log and snapshots,
and forgotten users. The node-loss test replaces every shard and the local disk, as losing the
node they ran on would, and gets everything back from the bucket."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import ray

from actors.ranker import RankerService, RankQuery
from actors.session_events import SessionEvent
from actors.session_state import SessionStateConfig, SessionStore
from actors.tombstones import Tombstones
from graph import storage
from graph.artifacts import latest_version, list_versions, read_artifact, write_artifact
from graph.errors import BadRequestError
from graph.forgotten import FORGOTTEN_FILE, read_forgotten
from tests.helpers import wait_for_condition

pytestmark = pytest.mark.integration


def _prefix(s3_bucket: str, name: str) -> str:
    return storage.join(s3_bucket, f"{name}-{uuid.uuid4().hex[:8]}")


def _copy_versions(src: str, dst: str, names: list[str]) -> None:
    art = read_artifact(src)
    for name in names:
        write_artifact(dst, user_ids=art.user_ids, items=art.items, user_emb=art.user_emb,
                       item_emb=art.item_emb, signals=art.signals, metrics=art.metrics,
                       manifest={"copied_from": art.version}, learned=art.learned,
                       item_static=art.item_static, text=art.text, version=name)


def test_artifacts_latest_and_model_loading_on_s3(s3_bucket: str, svd_artifact_root: str) -> None:
    root = storage.join(_prefix(s3_bucket, "artifacts"), "models")
    _copy_versions(svd_artifact_root, root, ["v1", "v2"])
    fs, path = storage.filesystem(root)
    assert fs.type_name == "s3" and fs.get_file_info(f"{path}/v2/_COMPLETE").is_file
    assert list_versions(root) == ["v1", "v2"] and latest_version(root) == "v2"
    svc = RankerService(root)
    assert svc.model.version == "v2"
    assert svc.recommend(RankQuery(k=5))["items"]
    assert svc.reload("v1")["version"] == "v1" and latest_version(root) == "v1"  # rollback
    with fs.open_output_stream(f"{path}/v2/item_emb.npy") as f:
        f.write(b"broken")
    with pytest.raises(BadRequestError):
        svc.reload("v2")
    assert latest_version(root) == "v1" and svc.model.version == "v1"


def test_forgotten_users_are_shared_through_the_bucket(s3_bucket: str) -> None:
    path = storage.join(_prefix(s3_bucket, "state"), FORGOTTEN_FILE)
    now = [1000.0]
    a = Tombstones(path, clock=lambda: now[0], refresh_s=1.0)
    b = Tombstones(path, clock=lambda: now[0], refresh_s=1.0)  # a replica on another node
    assert "u-1" not in b
    a.add("u-1")
    a.add("odd\nid/with slash")
    assert "u-1" in a  # the replica that answered the DELETE: at once
    assert "u-1" not in b  # the other one lists the bucket at most every refresh_s
    now[0] += 1.0
    assert "u-1" in b and "odd\nid/with slash" in b
    assert read_forgotten(path) == {"u-1", "odd\nid/with slash"}  # what train_job reads


def _ev(n: int, user: str | None) -> SessionEvent:
    # Two sessions per shopper (a forgotten user's sessions go as a whole).
    return SessionEvent.create("view", session_id=f"{user or 'anon'}-{n % 2}", user_id=user,
                               item_id=f"i{n}", ts=time.time())


def test_node_loss_loses_no_acknowledged_event_and_no_forget(
        ray_cluster: None, s3_bucket: str) -> None:
    """Kill every shard and start the shards again as a new node would (the session log and
    the forgotten users live in the object store only, nothing on a node's disk): every
    acknowledged event and every forget comes back from the object store."""
    shared = _prefix(s3_bucket, "node-loss")
    config = SessionStateConfig(num_shards=2, wal_uri=storage.join(shared, "sessions"),
                                snapshot_every=7, namespace="intentrec-test",
                                actor_prefix=f"node-loss-{uuid.uuid4().hex[:8]}")
    forgotten = storage.join(shared, FORGOTTEN_FILE)
    store = SessionStore(config)
    acked: list[SessionEvent] = []
    for n in range(40):  # past snapshot_every several times: snapshots and log records
        ev = _ev(n, ["u-keep", "u-gone", None][n % 3])
        asyncio.run(store.append([ev]))
        acked.append(ev)
    removed = asyncio.run(store.forget_user("u-gone"))
    Tombstones(forgotten).add("u-gone")  # what the ranker does for the same DELETE
    assert removed.events > 0

    for h in store.handles:  # the node is gone with its actors
        ray.kill(h, no_restart=True)

    def names_released() -> bool:  # ray.kill returns before the GCS has freed the names
        try:
            for i in range(config.num_shards):
                ray.get_actor(config.shard_name(i), namespace=config.namespace)
        except ValueError:
            return True
        return False

    wait_for_condition(names_released, timeout=60, what="the killed shards' names are free")

    fresh = SessionStore(config)  # the same names, started again elsewhere
    expected: dict[str, set[str | None]] = {}
    for ev in acked:
        if ev.user_id != "u-gone":
            expected.setdefault(ev.session_id, set()).add(ev.item_id)
    for sid, items in expected.items():
        got = asyncio.run(fresh.get(session_id=sid))
        assert {e.item_id for e in got.events} == items, sid
        assert all(e.user_id != "u-gone" for e in got.events)
    assert not asyncio.run(fresh.get(user_id="u-gone")).user_events
    assert len(asyncio.run(fresh.get(user_id="u-keep")).user_events) > 0
    assert "u-gone" in Tombstones(forgotten) and read_forgotten(forgotten) == {"u-gone"}
    fresh.kill()
