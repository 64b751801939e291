"""A/B traffic split (actors/split.py) on RankerService: two real small versions, no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.ranker import RankerService, RankQuery
from actors.split import SplitConfig, bucket, in_split, parse_rollout
from graph.artifacts import read_artifact, write_artifact
from graph.errors import BadRequestError, NotFoundError
from tests.helpers import artifact_parts

SPLIT = {"version": "v2", "share": 0.3, "salt": "exp-1"}


@pytest.fixture(scope="module")
def two_versions(svd_artifact_root: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("split") / "models")
    art = read_artifact(svd_artifact_root)
    write_artifact(root, version="v1", **artifact_parts(art))
    write_artifact(root, version="v2", set_latest=False,
                   **artifact_parts(art, item_emb=art.item_emb * 0.5))
    return root


@pytest.fixture(scope="module")
def svc(two_versions: str) -> RankerService:
    return RankerService(two_versions, "v1")


def test_two_thousand_users_split_within_five_points_and_each_keeps_its_arm(
        svc: RankerService) -> None:
    svc.apply_rollout({"version": "v1", "split": SPLIT})
    users = [f"shopper-{n}" for n in range(2000)]
    first = {u: svc.recommend(RankQuery(user_id=u, k=1))["model_version"] for u in users}
    assert set(first.values()) == {"v1", "v2"}
    share = sum(v == "v2" for v in first.values()) / len(users)
    assert abs(share - SPLIT["share"]) <= 0.05, share
    # Stable: the same user gets the same version again, with or without a session (the user
    # decides), and the arm is the hash's, not the replica's state.
    for n, u in enumerate(users[:200]):
        again = svc.recommend(RankQuery(user_id=u, session_id=f"s-{n}", k=1))["model_version"]
        assert again == first[u] == ("v2" if in_split(SplitConfig(**SPLIT), u, None) else "v1")


def test_a_session_without_a_user_is_split_by_the_session(svc: RankerService) -> None:
    svc.apply_rollout({"version": "v1", "split": SPLIT})
    split = SplitConfig(**SPLIT)
    sessions = [f"anon-{n}" for n in range(300)]
    got = [svc.recommend(RankQuery(session_id=s, k=1))["model_version"] for s in sessions]
    assert got == ["v2" if bucket("exp-1", s) < 0.3 else "v1" for s in sessions]
    assert in_split(split, None, None) is False  # no key: the main version


def test_the_hash_is_the_same_in_another_process(tmp_path: Path) -> None:
    """Not Python's hash(), which is salted per process: another interpreter with another
    PYTHONHASHSEED puts every key in the same bucket."""
    keys = [f"user-{n}" for n in range(50)]
    code = ("import json,sys; from actors.split import bucket; "
            "print(json.dumps([bucket('exp-1', k) for k in json.loads(sys.argv[1])]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == [bucket("exp-1", k) for k in keys]
    # Another salt is another experiment: users are reshuffled.
    assert [bucket("exp-1", k) < 0.5 for k in keys] != [bucket("exp-2", k) < 0.5 for k in keys]


def test_the_buckets_are_pinned() -> None:
    """Changing the hash would move every running experiment's users to other arms: the values
    are pinned (SHA-256 of salt, a zero byte and the key; the first 8 bytes over 2**64)."""
    assert bucket("exp-1", "user-0") == 0.22683544587537144
    assert bucket("exp-1", "user-1") == 0.7847342603047024
    assert bucket("exp-1", "anon-7") == 0.5897933747988852


def test_model_info_shows_the_split_and_stopping_it_serves_one_version(
        svc: RankerService) -> None:
    svc.apply_rollout({"version": "v1", "split": SPLIT})
    info = svc.model_info()
    assert info["version"] == "v1"
    assert {k: info["split"][k] for k in ("version", "share", "salt")} == SPLIT
    assert svc.versions_served() == ["v1", "v2"]
    svc.apply_rollout({"version": "v1"})  # no split in the config: it stops
    assert svc.model_info()["split"] is None and svc.versions_served() == ["v1"]
    assert {svc.recommend(RankQuery(user_id=f"u{n}", k=1))["model_version"]
            for n in range(100)} == {"v1"}


def test_share_zero_and_one_and_the_default_salt(svc: RankerService) -> None:
    for share, expected in ((0.0, {"v1"}), (1.0, {"v2"})):
        svc.apply_rollout({"version": "v1", "split": {**SPLIT, "share": share}})
        assert {svc.recommend(RankQuery(user_id=f"u{n}", k=1))["model_version"]
                for n in range(100)} == expected
    assert SplitConfig(version="v2", share=0.1).salt == "v2"


def test_bad_split_configs_are_refused_and_the_running_split_stays(svc: RankerService) -> None:
    svc.apply_rollout({"version": "v1", "split": SPLIT})
    with pytest.raises(BadRequestError) as err:
        svc.apply_rollout({"version": "v1", "split": {**SPLIT, "share": 1.5}})
    assert err.value.field == "user_config.split.share"
    with pytest.raises(BadRequestError) as err:
        parse_rollout({"version": "v1", "split": {"version": "v2", "share": 0.1, "shar": 1}})
    assert err.value.field == "user_config.split.shar"
    with pytest.raises(NotFoundError):
        svc.apply_rollout({"version": "v1", "split": {**SPLIT, "version": "v9"}})
    assert svc.split == SplitConfig(**SPLIT)


def test_promoting_the_split_version_ends_the_split_and_reuses_its_model(
        svc: RankerService) -> None:
    svc.apply_rollout({"version": "v1", "split": SPLIT})
    b = svc.model_for(RankQuery(user_id=next(u for u in (f"u{n}" for n in range(1000))
                                             if in_split(SplitConfig(**SPLIT), u, None))))
    res = svc.apply_rollout({"version": "v2", "split": SPLIT})  # the winner for everyone
    assert res["version"] == "v2" and svc.model is b  # not loaded a second time
    assert svc.split is None and svc.versions_served() == ["v2"]


def test_an_item_added_during_a_split_reaches_both_arms(two_versions: str,
                                                         tmp_path: Path) -> None:
    from graph.new_items import NewItem

    items = str(tmp_path / "items")
    svc = RankerService(two_versions, "v1", items_path=items)
    svc.apply_rollout({"version": "v1", "split": SPLIT})
    split = SplitConfig(**SPLIT)
    users = [f"u{n}" for n in range(1000)]
    a = next(u for u in users if not in_split(split, u, None))
    b = next(u for u in users if in_split(split, u, None))
    m = svc.model
    assert m is not None
    cat = str(m.catalogue.categories[int(m.catalogue.popular[0])])
    svc.upsert_item(NewItem("new-yuzu-1", "Sparkling yuzu lemonade", cat, "Fizzco", 3.49))
    for user, version in ((a, "v1"), (b, "v2")):
        out = svc.recommend(RankQuery(user_id=user, query="yuzu lemonade", k=5))
        assert out["model_version"] == version
        assert out["items"][0]["item_id"] == "new-yuzu-1", (version, out["items"][:2])
    # Another replica picks the item up from the folder, in both arms as well.
    other = RankerService(two_versions, "v1", items_path=items)
    other.apply_rollout({"version": "v1", "split": SPLIT})
    svc.upsert_item(NewItem("new-kombucha-2", "Qwixberry ginger kombucha", cat, None, 4.0))
    assert other.maybe_pick_up_items() is True
    out = other.recommend(RankQuery(user_id=b, query="qwixberry", k=3))
    assert out["model_version"] == "v2" and out["items"][0]["item_id"] == "new-kombucha-2"
