"""``PUT /v1/items/{id}`` on the real Serve app with two ranker replicas: the item, embedded by the
trained GNN's item encoder, is found by a search on every replica within a bounded wait. Both
layouts: two GNNRanker replicas, and two Ingress replicas that each rank (``inline_ranker``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for_condition

PORT = 8123
APP = "intentrec-new-items"
PREFIX = "/new-items"
KEY = "client-key-for-tests-0123456789"
ADMIN_KEY = "admin-key-for-tests-0123456789"
ADMIN = {"X-API-Key": ADMIN_KEY}
KEYS_ENV = {"INTENTREC_API_KEY": KEY, "INTENTREC_ADMIN_KEY": ADMIN_KEY}
# The first module of a session to use trained_artifact_root trains it (Ray Train on a slice, the
# learned ranker with its ablations): slow on a shared 2-core machine.
pytestmark = pytest.mark.timeout(2400)
# Consecutive answers that must all hold the item: with two replicas and per-request routing,
# all of them coming from one replica has a chance of about 2 * 0.5 ** 20.
CONSECUTIVE = 20


@pytest.fixture(scope="module", params=["deployment", "inline"])
def app_url(request: pytest.FixtureRequest, ray_cluster: None, trained_artifact_root: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, httpx.Client]]:
    from ray import serve

    import serve_app
    from actors.session_state import SessionStateConfig, SessionStore

    tmp = tmp_path_factory.mktemp("new-items")
    root = str(tmp / "models")
    shutil.copytree(trained_artifact_root, root)
    session = SessionStateConfig(num_shards=1, wal_uri=str(tmp / "wal"),
                                 actor_prefix="intentrec-new-items-session")
    inline = request.param == "inline"
    args = serve_app.AppArgs(artifacts_root=root, state_dir=str(tmp / "state"), reload_poll_s=0,
                             session=session, inline_context=True, inline_ranker=inline)
    two = ({"Ingress": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}} if inline
           else {"GNNRanker": {"num_replicas": 2}})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    app = serve_app.compose(args, env_vars={**KEYS_ENV, "PYTHONPATH": os.environ["PYTHONPATH"]},
                            deployments=two)
    serve.run(app, name=APP, route_prefix=PREFIX, blocking=False)
    url = f"http://127.0.0.1:{PORT}{PREFIX}"
    client = httpx.Client(timeout=120.0)
    wait_for_condition(lambda: client.get(url + "/healthz").json()["status"] == "ok",
                       timeout=300, interval=0.5, what="the app answers /healthz")
    try:
        yield url, client
    finally:
        client.close()
        serve.delete(APP)
        SessionStore(session).kill()


def _found(url: str, client: httpx.Client, query: str) -> dict[str, dict[str, Any]]:
    r = client.post(url + "/v1/recommendations", json={"session_id": "s-new", "query": query,
                                                       "k": 20})
    assert r.status_code == 200, r.text
    return {it["item_id"]: it for it in r.json()["items"]}


def test_put_item_is_searchable_on_every_replica(app_url: tuple[str, httpx.Client]) -> None:
    url, client = app_url
    listing = client.get(url + "/v1/catalogue").json()
    before = listing["num_items"]
    known = listing["departments"][0]["categories"][0]["category"]  # "DEPT > CATEGORY"
    item = {"title": "Sparkling yuzu lemonade", "category": f"{known} > SPARKLING YUZU",
            "brand": "Fizzco", "price": 3.49}
    bad = client.put(url + "/v1/items/yuzu-1", json={**item, "price": -2}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["field"].endswith("price"), bad.text
    assert client.put(url + "/v1/items/yuzu-1", json=item,
                      headers={"X-API-Key": KEY}).status_code == 403
    r = client.put(url + "/v1/items/yuzu-1", json=item, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["created"] is True and r.json()["num_items"] == before + 1

    def everywhere() -> bool:
        return all("yuzu-1" in _found(url, client, "yuzu") for _ in range(CONSECUTIVE))

    wait_for_condition(everywhere, timeout=120, interval=0.5,
                       what="every ranker replica finds the added item")
    hit = _found(url, client, "yuzu lemonade")["yuzu-1"]
    assert hit["title"] == item["title"] and hit["price"] == 3.49


def test_put_items_adds_a_batch_on_every_replica(app_url: tuple[str, httpx.Client]) -> None:
    url, client = app_url
    listing = client.get(url + "/v1/catalogue").json()
    known = listing["departments"][0]["categories"][0]["category"]
    items = [{"item_id": f"qwix-{n}", "title": f"Qwixberry kombucha flavour {n}",
              "category": known, "price": 3.0} for n in range(5)]
    dup = client.put(url + "/v1/items", json={"items": [*items, items[0]]}, headers=ADMIN)
    assert dup.status_code == 422 and dup.json()["field"] == "items", dup.text
    assert "items[5].item_id" in dup.json()["message"]
    bad = client.put(url + "/v1/items", json={"items": [{**items[0], "price": "free"}]},
                     headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["field"] == "items[0].price", bad.text
    r = client.put(url + "/v1/items", json={"items": items}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["created"] == 5 and r.json()["updated"] == 0

    def everywhere() -> bool:
        return all({f"qwix-{n}" for n in range(5)} <= set(_found(url, client, "qwixberry"))
                   for _ in range(CONSECUTIVE))

    wait_for_condition(everywhere, timeout=120, interval=0.5,
                       what="every ranker replica finds the whole batch")
