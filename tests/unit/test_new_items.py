"""Items added after training (PUT /v1/items): embedded by the artifact's item encoder, searchable,
listed, recommendable, stored under the state root, and kept across restarts and reloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actors.loaded_model import LoadedModel
from actors.ranker import RankerService, RankQuery
from graph.artifacts import ModelArtifact, read_artifact, write_artifact
from graph.errors import ArtifactError
from graph.new_items import NewItem, with_items
from tests.helpers import artifact_parts

T0 = 1_512_000_000.0  # 2017-11-30


@pytest.fixture(scope="module")
def items_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("added_items") / "items")


@pytest.fixture(scope="module")
def svc(svd_artifact_root: str, items_dir: str) -> RankerService:
    return RankerService(svd_artifact_root, items_path=items_dir)


def _known_category(svc: RankerService) -> str:
    m = svc.model
    assert m is not None
    return str(m.catalogue.categories[int(m.catalogue.popular[0])])


def _ids(out: dict[str, object]) -> list[str]:
    return [it["item_id"] for it in out["items"]]  # type: ignore[attr-defined, index]


def test_with_items_extends_every_per_item_table(svd_artifact_root: str) -> None:
    art = read_artifact(svd_artifact_root)
    cat = str(art.items["category"].iloc[0])
    first = str(art.items["item_id"].iloc[0])
    items = [NewItem("n1", "Yuzu soda", cat, "Fizzco", 2.5),
             NewItem("n2", "Moon cheese", "LUNAR > CHEESE > AGED", None, None),
             NewItem(first, "Renamed", cat, "Fizzco", 99.0)]
    vec = np.eye(3, art.text.vectors.shape[1], dtype=np.float32)
    out = with_items(art, items, vec)
    n = len(art.items) + 2
    assert len(out.items) == n and out.item_emb.shape[0] == n and out.item_static.shape[0] == n
    assert out.signals.num_items == n and out.text.num_items == n
    assert out.signals.item_sim.shape == (n, n)
    assert len(art.items) == n - 2  # the input is unchanged
    idx = out.item_index()
    # A known category keeps its index; an unknown one gets a new one.
    assert out.signals.item_category[idx["n1"]] == art.signals.item_category[0]
    assert out.signals.item_category[idx["n2"]] == art.signals.item_category.max() + 1
    assert out.signals.popularity[idx["n1"]] == 0.0
    np.testing.assert_array_equal(out.text.item_vectors(np.array([idx["n2"]]))[0], vec[1])
    assert out.items.loc[idx[first], "title"] == "Renamed"
    assert np.isfinite(out.item_emb).all() and np.abs(out.item_emb[idx["n1"]]).sum() > 0
    assert np.isfinite(out.item_static[idx["n1"], 2]) and out.item_static[idx["n1"], 2] == 2.5


def test_putting_a_known_item_unchanged_keeps_its_per_item_features(
        svd_artifact_root: str) -> None:
    """A known item's re-put (an availability flip, a catalogue sync) must not reset what was
    learned from its purchases: its trend, price band and brand popularity stay as trained."""
    art = read_artifact(svd_artifact_root)
    # The most-trending priced item: a reset of its trend to "new item" would show.
    trend = np.where(np.isfinite(art.item_static[:, 2]), art.item_static[:, 0], -np.inf)
    r = int(np.argmax(trend))
    assert art.item_static[r, 0] > 0
    row = art.items.iloc[r]
    item = NewItem(str(row["item_id"]), str(row["title"]), str(row["category"]),
                   str(row["brand"]), float(row["price"]))
    out = with_items(art, [item], art.text.item_vectors(np.array([r])))
    np.testing.assert_allclose(out.item_static[r], art.item_static[r], rtol=1e-6)
    np.testing.assert_array_equal(out.item_static[:r], art.item_static[:r])


def test_a_version_without_item_encoder_says_retrain(svd_artifact_root: str) -> None:
    art = read_artifact(svd_artifact_root)
    old = type(art)(**{**art.__dict__, "item_encoder": None})
    with pytest.raises(ArtifactError, match="no item encoder"):
        with_items(old, [NewItem("n1", "x", "A > B", None, 1.0)], np.zeros((1, 384), np.float32))


def test_added_item_is_searchable_listed_and_embedded(svc: RankerService) -> None:
    before = svc.catalogue()["num_items"]
    cat = _known_category(svc)
    out = svc.upsert_item(NewItem("new-yuzu-1", "Sparkling yuzu lemonade", cat, "Fizzco", 3.49))
    assert out["created"] is True and out["num_items"] == before + 1 and out["added_items"] == 1
    m = svc.model
    assert m is not None
    i = m.item_index["new-yuzu-1"]
    assert np.isfinite(m.ranker.item_emb[i]).all() and np.abs(m.ranker.item_emb[i]).sum() > 0
    listing = svc.catalogue()
    assert listing["num_items"] == before + 1
    ans = svc.recommend(RankQuery(query="yuzu lemonade", k=5, now=T0))
    assert _ids(ans)[0] == "new-yuzu-1"
    hit = ans["items"][0]
    assert hit["title"] == "Sparkling yuzu lemonade" and hit["price"] == 3.49
    # An update replaces the attributes; the item keeps its row.
    out = svc.upsert_item(NewItem("new-yuzu-1", "Sparkling yuzu lemonade", cat, "Fizzco", 2.99))
    assert out["created"] is False and out["num_items"] == before + 1
    ans = svc.recommend(RankQuery(query="yuzu lemonade", k=5, now=T0))
    assert ans["items"][0]["price"] == 2.99


def test_added_items_reach_other_replicas_and_survive_restart_and_reload(
        svc: RankerService, svd_artifact_root: str, items_dir: str, tmp_path: Path) -> None:
    cat = _known_category(svc)
    svc.upsert_item(NewItem("new-yuzu-1", "Sparkling yuzu lemonade", cat, "Fizzco", 2.99))
    # A restarted (or another) replica reads the stored items at start.
    other = RankerService(svd_artifact_root, items_path=items_dir)
    assert other.model is not None and "new-yuzu-1" in other.model.item_index
    assert other.maybe_pick_up_items() is False  # nothing changed since
    svc.upsert_item(NewItem("new-kombucha-2", "Qwixberry ginger kombucha", cat, None, 4.0))
    assert other.maybe_pick_up_items() is True
    assert _ids(other.recommend(RankQuery(query="qwixberry", k=3, now=T0)))[0] == "new-kombucha-2"
    # A new model version keeps them (re-embedded with its encoder).
    art = read_artifact(svd_artifact_root)
    root = str(tmp_path / "models")
    write_artifact(root, **artifact_parts(art), version="20990101T000000-aaaaaa")
    fresh = RankerService(root, items_path=items_dir)
    write_artifact(root, **artifact_parts(art, item_emb=art.item_emb * 2.0),
                   version="20990102T000000-bbbbbb")
    assert fresh.reload()["swapped"] is True
    m = fresh.model
    assert m is not None and m.version == "20990102T000000-bbbbbb"
    assert {"new-yuzu-1", "new-kombucha-2"} <= set(m.item_index)
    assert _ids(fresh.recommend(RankQuery(query="yuzu", k=3, now=T0)))[0] == "new-yuzu-1"


def test_a_batch_of_items_is_one_rebuild_and_every_item_is_served(
        svd_artifact_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = RankerService(svd_artifact_root, items_path=str(tmp_path / "items"))
    before = svc.catalogue()["num_items"]
    cat = _known_category(svc)
    first = svc.model
    assert first is not None
    known = str(first.artifact.items["item_id"].iloc[0])
    # Cheap, close prices (2.00-4.90), so that the query, not the ranker's price features,
    # decides whether each tea reaches the top 40: priced 2-31, the dearest fell to place 53 on
    # an AVX2-only machine, whose rounding moves the learned ranker's near-ties.
    batch = [NewItem(f"tea-{n}", f"Zorbleberry herbal tea no {n}", cat, "Leafco", 2.0 + n / 10)
             for n in range(30)] + [NewItem(known, "Renamed known item", cat, None, 1.0)]
    builds: list[str] = []
    build = RankerService.build

    def counted(art: ModelArtifact) -> LoadedModel:
        builds.append(art.version)
        return build(art)

    monkeypatch.setattr(RankerService, "build", staticmethod(counted))
    out = svc.upsert_items(batch)
    assert len(builds) == 1  # one catalogue rebuild for 31 items
    assert out["created"] == 30 and out["updated"] == 1
    assert out["num_items"] == before + 30 and out["added_items"] == 31
    found = _ids(svc.recommend(RankQuery(query="zorbleberry tea", k=40, now=T0)))
    assert {f"tea-{n}" for n in range(30)} <= set(found)
    # Stored: another replica serves all of them from the folder.
    other = RankerService(svd_artifact_root, items_path=str(tmp_path / "items"))
    assert other.model is not None and {f"tea-{n}" for n in range(30)} <= set(other.model.item_index)


def test_an_unavailable_item_is_never_recommended_found_or_similar_until_back(
        svd_artifact_root: str, tmp_path: Path) -> None:
    svc = RankerService(svd_artifact_root, items_path=str(tmp_path / "items"))
    m = svc.model
    assert m is not None
    ask = RankQuery(session_id="s", k=20, now=T0)
    top = _ids(svc.recommend(ask))[0]
    row = m.artifact.items.iloc[m.item_index[top]]
    # An item that lists it as similar now.
    neighbour = next(n for n in _ids(svc.similar(top, k=50)) if top in _ids(svc.similar(n, k=50)))
    # Its own attributes, so that only its availability changes.
    title, cat, brand = str(row["title"]), str(row["category"]), str(row["brand"])
    price = None if pd.isna(row["price"]) else float(row["price"])
    gone = NewItem(top, title, cat, brand, price, available=False)
    svc.upsert_item(gone)
    query = RankQuery(session_id="s", query=title, k=50, now=T0)
    assert top not in _ids(svc.recommend(ask))
    assert top not in _ids(svc.recommend(query))
    assert top not in _ids(svc.recommend(RankQuery(user_id=str(m.artifact.user_ids[0]), k=50,
                                                   now=T0)))
    assert top not in _ids(svc.similar(neighbour, k=50))
    # Still in the catalogue: events that name it are understood, and it can be asked about.
    assert top in m.item_index and svc.similar(top, k=5)["items"]
    # Another replica (or a restart) reads the record: unavailable there too.
    other = RankerService(svd_artifact_root, items_path=str(tmp_path / "items"))
    assert top not in _ids(other.recommend(ask))
    svc.upsert_item(NewItem(top, title, cat, brand, price, available=True))
    assert _ids(svc.recommend(ask))[0] == top
