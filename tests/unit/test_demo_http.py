"""The demo page's routes and the small read-only API it needs, over HTTP through the serving
app's own code in one process (``bench/inprocess_app.py``; no Ray): ``GET /demo`` and its files,
``GET /v1/catalogue``, ``GET /v1/catalogue/shoppers``, and the feedback loop's ``request_id`` /
``from_request`` round trip."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_events_and_forget_http import ADMIN_KEY, KEY, T0, App, Clock

AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def app(svd_artifact_root: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    from ray import serve

    from bench.inprocess_app import build

    tmp = tmp_path_factory.mktemp("demo-http")
    mp = pytest.MonkeyPatch()
    mp.setattr(serve, "get_replica_context", serve.get_replica_context)
    mp.setenv("INTENTREC_API_KEY", KEY)
    mp.setenv("INTENTREC_ADMIN_KEY", ADMIN_KEY)
    root = tmp / "models"
    shutil.copytree(svd_artifact_root, root)
    clock = Clock(T0)
    api = build({"artifacts_root": str(root), "state_dir": str(tmp / "state"),
                 "reload_poll_s": 0, "inline_context": True,
                 "session": {"num_shards": 1, "wal_uri": str(tmp / "wal")}}, clock)
    try:
        yield App(api, clock, str(root))
    finally:
        mp.undo()


def test_the_demo_page_and_its_files_are_served(app: App) -> None:
    page = app.call("GET", "/demo")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="demo/demo.js"' in page.text and 'href="demo/demo.css"' in page.text
    js = app.call("GET", "/demo/demo.js")
    assert js.status_code == 200 and "/v1/recommendations" in js.text
    assert app.call("GET", "/demo/demo.css").status_code == 200
    missing = app.call("GET", "/demo/secrets.txt")
    assert missing.status_code == 404 and missing.json()["field"] == "asset"
    assert app.call("GET", "/demo/..%2F..%2Fserve_app.py").status_code == 404


def test_the_page_files_are_packaged_with_actors() -> None:
    import tomllib

    conf = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "static/*" in conf["tool"]["setuptools"]["package-data"]["actors"]


def test_catalogue_lists_departments_and_browsable_categories(app: App) -> None:
    r = app.call("GET", "/v1/catalogue")
    assert r.status_code == 200, r.text
    cat = r.json()
    depts = cat["departments"]
    assert depts and sum(d["items"] for d in depts) == cat["num_items"]
    assert [d["items"] for d in depts] == sorted((d["items"] for d in depts), reverse=True)
    first = depts[0]["categories"][0]
    assert first["category"].startswith(depts[0]["department"] + " > ")
    # A listed category is a working browse filter: every item returned is in it.
    rec = app.call("POST", "/v1/recommendations",
                   {"session_id": "browse", "category": first["category"], "k": 10}).json()
    assert rec["items"] and all(it["category"].startswith(first["category"])
                                for it in rec["items"])


def test_shoppers_need_the_client_key_and_are_known_users(app: App) -> None:
    assert app.call("GET", "/v1/catalogue/shoppers").status_code == 401
    r = app.call("GET", "/v1/catalogue/shoppers", headers=AUTH)
    assert r.status_code == 200, r.text
    users = r.json()["users"]
    assert users
    rec = app.call("POST", "/v1/recommendations", {"user_id": users[0], "k": 3}, AUTH).json()
    assert rec["user_known"] is True


def test_events_from_a_response_are_attributed_to_its_version_and_position(app: App) -> None:
    r1 = app.call("POST", "/v1/recommendations", {"session_id": "fb", "k": 5}).json()
    r2 = app.call("POST", "/v1/recommendations", {"session_id": "fb", "k": 5}).json()
    assert len(r1["request_id"]) == 32 and r1["request_id"] != r2["request_id"]
    third = r1["items"][2]["item_id"]
    out = app.call("POST", "/v1/events", {"events": [
        {"session_id": "fb", "event": "click", "item_id": third, "from_request": r1["request_id"]},
        {"session_id": "fb", "event": "view", "item_id": third},
        {"session_id": "fb", "event": "add_to_cart", "item_id": "not-shown",
         "from_request": r1["request_id"]},
    ]}, AUTH)
    assert out.status_code == 202, out.text
    # The event without from_request sits between two with one: each answer keeps its place.
    got = [e["attributed"] for e in out.json()["events"]]
    assert got == [{"model_version": r1["model_version"], "position": 3}, None,
                   {"model_version": r1["model_version"], "position": None}]
    bad = app.call("POST", "/v1/events", {"session_id": "fb", "event": "click", "item_id": third,
                                          "from_request": "nope"}, AUTH)
    assert bad.status_code == 422 and bad.json()["field"] == "from_request"
    assert "request_id" in bad.json()["message"]
