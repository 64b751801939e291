"""``PUT /v1/items/{id}`` over HTTP through the serving app's own code in one process
(``bench/inprocess_app.py``; no Ray): admin key, validation naming the field, and the added item
found by a search and listed by ``GET /v1/catalogue``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

KEY = "client-key-for-unit-tests-0123"
ADMIN_KEY = "admin-key-for-unit-tests-01234"


@pytest.fixture(scope="module")
def api(svd_artifact_root: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from ray import serve

    from bench.inprocess_app import build

    mp = pytest.MonkeyPatch()
    mp.setattr(serve, "get_replica_context", serve.get_replica_context)
    mp.setenv("INTENTREC_API_KEY", KEY)
    mp.setenv("INTENTREC_ADMIN_KEY", ADMIN_KEY)
    tmp = Path(tmp_path_factory.mktemp("items_http"))
    yield build({"artifacts_root": svd_artifact_root, "state_dir": str(tmp / "state"),
                 "reload_poll_s": 0, "inline_context": True,
                 "session": {"num_shards": 1, "wal_uri": str(tmp / "wal")}})
    mp.undo()


def call(api: Any, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api),
                                     base_url="http://app") as c:
            return await c.request(method, path, json=body, headers=headers)

    return asyncio.run(go())


ITEM = {"title": "Sparkling yuzu lemonade", "category": "BEVERAGES > SOFT DRINKS > SPARKLING",
        "brand": "Fizzco", "price": 3.49}


def test_put_item_needs_the_admin_key(api: Any) -> None:
    assert call(api, "PUT", "/v1/items/yuzu-1", ITEM).status_code == 401
    r = call(api, "PUT", "/v1/items/yuzu-1", ITEM, {"X-API-Key": KEY})
    assert r.status_code == 403, r.text


@pytest.mark.parametrize(("change", "field"), [
    ({"price": -1}, "price"), ({"price": "cheap"}, "price"), ({"title": ""}, "title"),
    ({"category": "GROCERY >  > SODA"}, "category"), ({"colour": "red"}, "colour"),
])
def test_a_bad_item_is_a_422_naming_the_field(api: Any, change: dict[str, Any], field: str
                                              ) -> None:
    before = call(api, "GET", "/v1/catalogue").json()["num_items"]
    r = call(api, "PUT", "/v1/items/yuzu-bad", {**ITEM, **change}, {"X-API-Key": ADMIN_KEY})
    assert r.status_code == 422, r.text
    assert field in r.json()["field"]
    assert call(api, "GET", "/v1/catalogue").json()["num_items"] == before  # nothing stored


def test_added_item_is_found_by_search_and_listed(api: Any) -> None:
    before = call(api, "GET", "/v1/catalogue").json()
    known = before["departments"][0]["categories"][0]["category"]  # "DEPT > CATEGORY"
    item = {**ITEM, "category": f"{known} > SPARKLING YUZU"}
    r = call(api, "PUT", "/v1/items/yuzu-1", item, {"X-API-Key": ADMIN_KEY})
    assert r.status_code == 200, r.text
    assert r.json()["created"] is True and r.json()["num_items"] == before["num_items"] + 1
    listing = call(api, "GET", "/v1/catalogue").json()
    assert listing["num_items"] == before["num_items"] + 1
    counts = {c["category"]: c["items"] for d in listing["departments"] for c in d["categories"]}
    was = {c["category"]: c["items"] for d in before["departments"] for c in d["categories"]}
    assert counts[known] == was[known] + 1
    rec = call(api, "POST", "/v1/recommendations", {"session_id": "s-yuzu", "query": "yuzu",
                                                     "k": 20})
    assert rec.status_code == 200, rec.text
    found = {it["item_id"]: it for it in rec.json()["items"]}
    assert "yuzu-1" in found, list(found)
    assert found["yuzu-1"]["title"] == ITEM["title"] and found["yuzu-1"]["price"] == 3.49


def _batch(n: int, category: str = ITEM["category"]) -> list[dict[str, Any]]:
    return [{**ITEM, "item_id": f"fizz-{i}", "title": f"Glorpfizz soda flavour {i}",
             "category": category} for i in range(n)]


@pytest.mark.parametrize(("items", "field", "says"), [
    ([], "items", "at least 1"),
    (_batch(2) + _batch(1), "items", "items[2].item_id 'fizz-0' repeats items[0]"),
    ([{**_batch(1)[0], "price": "cheap"}], "items[0].price", ""),
    ([{k: v for k, v in _batch(1)[0].items() if k != "item_id"}], "items[0].item_id", ""),
    ([{**_batch(1)[0], "item_id": "a\nb"}], "items[0].item_id", ""),
    (_batch(1001), "items", "at most 1000"),
])
def test_a_bad_batch_is_a_422_naming_the_field_and_stores_nothing(
        api: Any, items: list[dict[str, Any]], field: str, says: str) -> None:
    before = call(api, "GET", "/v1/catalogue").json()["num_items"]
    r = call(api, "PUT", "/v1/items", {"items": items}, {"X-API-Key": ADMIN_KEY})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and says in r.json()["message"], r.json()
    assert call(api, "GET", "/v1/catalogue").json()["num_items"] == before


def test_a_batch_needs_the_admin_key_and_adds_every_item(api: Any) -> None:
    known = call(api, "GET", "/v1/catalogue").json()["departments"][0]["categories"][0]["category"]
    items = _batch(3, f"{known} > GLORPFIZZ")
    assert call(api, "PUT", "/v1/items", {"items": items}).status_code == 401
    assert call(api, "PUT", "/v1/items", {"items": items},
                {"X-API-Key": KEY}).status_code == 403
    before = call(api, "GET", "/v1/catalogue").json()["num_items"]
    r = call(api, "PUT", "/v1/items", {"items": items}, {"X-API-Key": ADMIN_KEY})
    assert r.status_code == 200, r.text
    assert r.json()["created"] == 3 and r.json()["updated"] == 0
    assert r.json()["num_items"] == before + 3
    again = call(api, "PUT", "/v1/items", {"items": items[:1]}, {"X-API-Key": ADMIN_KEY})
    assert again.json()["created"] == 0 and again.json()["updated"] == 1
    rec = call(api, "POST", "/v1/recommendations", {"session_id": "s-fizz", "query": "glorpfizz",
                                                     "k": 20})
    assert {f"fizz-{i}" for i in range(3)} <= {it["item_id"] for it in rec.json()["items"]}
