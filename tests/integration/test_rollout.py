"""Model rollouts reach every ranker replica (actors/rollout.py): real Serve, two ranker replicas.

The app is deployed from a config, as ``serve deploy serve_config.yaml`` does, with its version
pinned and polling off: the only way a replica can change version here is Serve's
``user_config`` / ``reconfigure``. Each test runs twice: with the ranker as its own deployment
(two GNNRanker replicas), and with the ranker inside the ingress (``inline_ranker``: two Ingress
replicas, each with its own ranker, reconfigured through the Ingress's ``user_config``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.feedback import book_name
from graph.artifacts import filesystem, latest_version, read_artifact, write_artifact
from tests.helpers import wait_for_condition

PORT = 8123
APP = "intentrec-rollout"
PREFIX = "/rollout"
ADMIN_KEY = "admin-key-for-rollout-0123456789"
ADMIN = {"X-API-Key": ADMIN_KEY}
SHARD_PREFIX = "intentrec-rollout"


@dataclass
class Rollout:
    url: str
    root: str
    first: str
    ranker: Any  # DeploymentHandle of the deployment whose replicas rank
    client: httpx.Client
    tag: str  # which layout: "deployment" or "inline"

    def reload(self, version: str) -> httpx.Response:
        return self.client.post(self.url + "/v1/admin/reload", json={"version": version},
                                headers=ADMIN)

    def replicas(self, calls: int = 24, rounds: int = 5) -> dict[str, str]:
        """Replica id -> version it serves. Serve's router may send a whole round of calls to one
        replica (a busy or just-started one gets none), so up to ``rounds`` rounds of ``calls``
        are made until one round reaches both replicas; else the last round is returned."""
        seen: dict[str, str] = {}
        for _ in range(rounds):
            outs = [self.ranker.serving.remote() for _ in range(calls)]
            seen = {o["replica"]: o["version"] for o in (r.result() for r in outs)}
            if len(seen) == 2:
                break
        return seen

    def all_serve(self, version: str) -> bool:
        seen = self.replicas()
        return len(seen) == 2 and set(seen.values()) == {version}


@pytest.fixture(scope="module", params=["deployment", "inline"])
def rollout(request: pytest.FixtureRequest, ray_cluster: None, svd_artifact_root: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rollout]:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from actors.session_state import SessionStateConfig, SessionStore

    tmp = tmp_path_factory.mktemp("rollout")
    root = str(tmp / "models")
    shutil.copytree(svd_artifact_root, root)
    first = latest_version(root)
    session = {"num_shards": 1, "wal_uri": str(tmp / "wal"), "actor_prefix": SHARD_PREFIX}
    inline = request.param == "inline"
    two = {"min_replicas": 2, "max_replicas": 2}
    deployments = ([{"name": "Ingress", "ray_actor_options": {"num_cpus": 0.25},
                     "autoscaling_config": two}] if inline else
                   [{"name": "GNNRanker", "ray_actor_options": {"num_cpus": 0.25},
                     "autoscaling_config": two},
                    {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}}])
    config = ServeDeploySchema.model_validate({"applications": [{
        "name": APP, "route_prefix": PREFIX, "import_path": "serve_app:build_app",
        "runtime_env": {"env_vars": {"INTENTREC_ADMIN_KEY": ADMIN_KEY,
                                     "PYTHONPATH": os.environ["PYTHONPATH"]}},
        "args": {"artifacts_root": root, "model_version": first, "reload_poll_s": 0,
                 "state_dir": str(tmp / "state"), "inline_context": True, "session": session,
                 "inline_ranker": inline},
        "deployments": deployments,
    }]})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    _get_global_client().deploy_apps(config)  # what `serve deploy` posts to the dashboard
    url = f"http://127.0.0.1:{PORT}{PREFIX}"
    client = httpx.Client(timeout=60.0)
    wait_for_condition(lambda: client.get(url + "/healthz").status_code == 200, timeout=240,
                       interval=0.5, what="the rollout app answers /healthz")
    ranks = "Ingress" if inline else "GNNRanker"
    r = Rollout(url, root, first, serve.get_deployment_handle(ranks, APP), client, request.param)
    wait_for_condition(lambda: r.all_serve(first), timeout=120, what="both rankers serve")
    try:
        yield r
    finally:
        client.close()
        serve.delete(APP)
        import ray

        ray.get_actor(book_name(SHARD_PREFIX), namespace="intentrec")  # the ingress made one
        SessionStore(SessionStateConfig(**session)).kill()  # the shards and the book


def _copy_version(root: str, name: str) -> str:
    art = read_artifact(root)
    return write_artifact(root, user_ids=art.user_ids, items=art.items, user_emb=art.user_emb,
                          item_emb=art.item_emb * 0.5, signals=art.signals, metrics=art.metrics,
                          manifest={"note": name}, learned=art.learned,
                          item_static=art.item_static, text=art.text, version=name, set_latest=False)


def test_a_reload_moves_every_replica_without_a_failed_request(rollout: Rollout) -> None:
    v2 = _copy_version(rollout.root, f"v2-rollout-{rollout.tag}")
    stop, codes = threading.Event(), []

    def hammer() -> None:
        with httpx.Client(timeout=60.0) as c:
            while not stop.is_set():
                codes.append(c.post(rollout.url + "/v1/recommendations",
                                    json={"session_id": "rollout", "k": 5}).status_code)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        r = rollout.reload(v2)
        assert r.status_code == 200, r.text
        assert r.json() == {"previous_version": rollout.first, "version": v2, "swapped": True}
        wait_for_condition(lambda: rollout.all_serve(v2), timeout=120,
                           what="both ranker replicas serve the new version")
        # Pinned app: LATEST is not this app's pointer, so it stays where it was.
        assert latest_version(rollout.root) == rollout.first
        r = rollout.reload(rollout.first)  # rollback, also to both
        assert r.status_code == 200, r.text
        wait_for_condition(lambda: rollout.all_serve(rollout.first), timeout=120,
                           what="both ranker replicas are rolled back")
    finally:
        stop.set()
        t.join()
    assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}


def test_a_broken_version_is_refused_and_the_previous_keeps_serving(rollout: Rollout) -> None:
    broken = _copy_version(rollout.root, f"broken-rollout-{rollout.tag}")
    fs, base = filesystem(rollout.root)
    with fs.open_output_stream(f"{base}/{broken}/user_emb.npy") as f:
        f.write(b"truncated")
    (serving,) = set(rollout.replicas().values())
    r = rollout.reload(broken)
    assert r.status_code == 422 and r.json()["field"] == "version", r.text
    assert "cannot be served" in r.json()["message"]
    # Every replica (also one Serve may have replaced meanwhile) still serves the same version.
    # Serve's router can send every call of several rounds to one replica while the other is
    # busy or starting, so the rounds go on until both have answered; every answer is kept.
    versions: set[str] = set()

    def both_answer() -> bool:
        seen = rollout.replicas()
        versions.update(seen.values())
        return len(seen) == 2

    wait_for_condition(both_answer, timeout=60, what="both ranker replicas answer after the refusal")
    assert versions == {serving}, versions
    assert rollout.reload("no-such-version").status_code == 404


def test_first_boot_answers_at_once_and_serves_the_first_model_without_a_failure(
        ray_cluster: None, svd_artifact_root: str, tmp_path: Path) -> None:
    """An empty artifact root (a new bucket): 200s at once with the cold-start answer; the first
    published version is picked up by polling while requests keep flowing, none failing."""
    from ray import serve

    import serve_app
    from actors.ranker import NO_MODEL
    from actors.session_state import SessionStateConfig, SessionStore

    root = str(tmp_path / "models")
    session = SessionStateConfig(num_shards=1, wal_uri=str(tmp_path / "wal"),
                                 actor_prefix="intentrec-first-boot")
    args = serve_app.AppArgs(artifacts_root=root, state_dir=str(tmp_path / "state"),
                             reload_poll_s=0.5, inline_context=True, allow_anonymous=True,
                             session=session)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(serve_app.compose(args, env_vars={"PYTHONPATH": os.environ["PYTHONPATH"]}),
              name="intentrec-first-boot", route_prefix="/first-boot", blocking=False)
    url = f"http://127.0.0.1:{PORT}/first-boot"
    stop, codes, versions = threading.Event(), [], set()
    try:
        with httpx.Client(timeout=60.0) as c:
            wait_for_condition(lambda: c.get(url + "/healthz").status_code == 200, timeout=240,
                               interval=0.5, what="the app answers before any model exists")
            first = c.post(url + "/v1/recommendations", json={"session_id": "boot", "k": 5})
            assert first.status_code == 200, first.text
            assert first.json()["model_version"] == NO_MODEL and first.json()["items"] == []

            def hammer() -> None:
                with httpx.Client(timeout=60.0) as h:
                    while not stop.is_set():
                        r = h.post(url + "/v1/recommendations", json={"session_id": "boot", "k": 5})
                        codes.append(r.status_code)
                        if r.status_code == 200:
                            versions.add(r.json()["model_version"])

            t = threading.Thread(target=hammer)
            t.start()
            # The first training job publishes: the version folder, then LATEST.
            shutil.copytree(svd_artifact_root, root, ignore=shutil.ignore_patterns("LATEST"))
            shutil.copy(Path(svd_artifact_root) / "LATEST", Path(root) / "LATEST")
            published = latest_version(root)
            wait_for_condition(
                lambda: c.post(url + "/v1/recommendations",
                               json={"session_id": "boot", "k": 5}).json()["model_version"]
                == published, timeout=120, what="the first model is picked up")
            stop.set()
            t.join()
    finally:
        stop.set()
        serve.delete("intentrec-first-boot")
        SessionStore(session).kill()
    assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert versions == {NO_MODEL, published}


def test_an_ab_split_reaches_every_replica_and_answers_name_their_arm(rollout: Rollout) -> None:
    """POST /v1/admin/split: both replicas serve two versions, every answer names its arm (a
    stable hash of the session), and clicks are credited to it (the per-version counters the
    A/B report reads)."""
    from actors.split import bucket

    # A name of its own per layout: the metrics of the cluster count it from zero.
    v2 = _copy_version(rollout.root, f"v2-split-{rollout.tag}")
    split_url = rollout.url + "/v1/admin/split"
    body = {"version": v2, "share": 0.5, "salt": "exp-it"}
    assert rollout.client.post(split_url, json=body).status_code == 401  # admin only
    bad = rollout.client.post(split_url, json={**body, "share": 1.5}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["field"] == "share", bad.text
    r = rollout.client.post(split_url, json={**body, "version": "no-such"}, headers=ADMIN)
    assert r.status_code == 404 and r.json()["field"] == "version", r.text
    r = rollout.client.post(split_url, json={**body, "version": rollout.first}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["field"] == "version", r.text

    r = rollout.client.post(split_url, json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == rollout.first and r.json()["split"]["version"] == v2
    try:
        wait_for_condition(lambda: _splits(rollout) == {v2}, timeout=180,
                           what="both replicas run the split")
        model = rollout.client.get(rollout.url + "/v1/model").json()
        assert model["version"] == rollout.first
        assert {k: model["split"][k] for k in body} == body

        sessions = [f"ab-{n}" for n in range(60)]
        served = {}
        credited = {rollout.first: 0, v2: 0}
        for s in sessions:
            out = rollout.client.post(rollout.url + "/v1/recommendations",
                                      json={"session_id": s, "k": 3}).json()
            assert out["model_version"] == (v2 if bucket("exp-it", s) < 0.5 else rollout.first)
            served[s] = out
        # The shoppers click once every answer has reached the shared impression book (an
        # ingress replica hands its answers over every 0.2 s): then every click is credited to
        # the version and position that showed the item, whichever ingress replica Serve's
        # proxy sends it to. The inline layout has two ingress replicas, each answering some
        # of the recommendations; without the book the other's clicks would be "unknown".
        wait_for_condition(lambda: _in_book(served.values()), timeout=30,
                           what="every answer is in the shared impression book")
        for s in sessions:
            out = served[s]
            click = {"session_id": s, "event": "click", "item_id": out["items"][0]["item_id"],
                     "from_request": out["request_id"]}
            ev = rollout.client.post(rollout.url + "/v1/events", json=click, headers=ADMIN)
            assert ev.status_code == 202, ev.text
            attributed = ev.json()["events"][0]["attributed"]
            assert attributed == {"model_version": out["model_version"], "position": 1}
            credited[out["model_version"]] += 1
        assert {o["model_version"] for o in served.values()} == {rollout.first, v2}
        shown = {rollout.first: 0, v2: 0}
        for out in served.values():
            shown[out["model_version"]] += len(out["items"])
        for s in sessions[:10]:  # stable
            again = rollout.client.post(rollout.url + "/v1/recommendations",
                                        json={"session_id": s, "k": 3}).json()
            assert again["model_version"] == served[s]["model_version"]
            shown[again["model_version"]] += len(again["items"])
        assert credited == {v: sum(o["model_version"] == v for o in served.values())
                            for v in shown}
        _ab_report_reads_the_live_counters(rollout, v2, shown, credited)
    finally:
        r = rollout.client.delete(split_url, headers=ADMIN)
    assert r.status_code == 200 and r.json()["split"] is None, r.text
    assert r.json()["previous_split"]["version"] == v2
    wait_for_condition(lambda: _splits(rollout) == {None}, timeout=180,
                       what="both replicas stopped the split")
    assert rollout.client.get(rollout.url + "/v1/model").json()["split"] is None


def _ab_report_reads_the_live_counters(rollout: Rollout, v2: str, shown: dict[str, int],
                                       clicked: dict[str, int]) -> None:
    """``python -m actors.ab_report --metrics`` on the node's live Prometheus endpoint (Ray's
    metrics agent, not a fixture text) counts what this test showed and clicked per arm. The
    split's version is new here, so its counts are exact; the main version's include what
    earlier tests of the module were shown."""
    import ray

    from actors.ab_report import counts_from_exposition

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{port}/metrics"

    def v2_counted() -> bool:
        per = counts_from_exposition([rollout.client.get(url).text]).get(v2, {})
        return per.get("impressions") == shown[v2] and per.get("clicks") == clicked[v2]

    # The ingress hands its counts to Ray at most once a second, Ray's agent exports every ~10 s.
    wait_for_condition(v2_counted, timeout=120, interval=1.0,
                       what=f"the metrics endpoint counts {shown[v2]} impressions and "
                            f"{clicked[v2]} clicks for {v2}")
    out = subprocess.run(
        [sys.executable, "-m", "actors.ab_report", "--metrics", url, "--json",
         "--control", rollout.first, "--treatment", v2],
        capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout)
    arms = {a["version"]: a for a in report["arms"]}
    assert (arms[v2]["impressions"], arms[v2]["clicks"]) == (shown[v2], clicked[v2])
    assert arms[rollout.first]["impressions"] >= shown[rollout.first]
    assert arms[rollout.first]["clicks"] >= clicked[rollout.first]
    assert (report["control"], report["treatment"]) == (rollout.first, v2)
    assert [d["metric"] for d in report["differences"]] == ["click-through", "add-to-cart"]


def test_a_crashed_impression_book_loses_no_event_and_fills_again(rollout: Rollout) -> None:
    """The shared impression book killed (Ray restarts it, empty): clicks on earlier answers are
    still accepted (202), credited by the replica that answered or counted unknown, never to a
    wrong version; answers given after the restart reach the new book and are credited again."""
    import ray

    def answer(session: str) -> dict[str, Any]:
        r = rollout.client.post(rollout.url + "/v1/recommendations",
                                json={"session_id": session, "k": 3})
        assert r.status_code == 200, r.text
        return {"session": session, **r.json()}

    def click(out: dict[str, Any]) -> dict[str, Any] | None:
        ev = rollout.client.post(rollout.url + "/v1/events", headers=ADMIN, json={
            "session_id": out["session"], "event": "click",
            "item_id": out["items"][0]["item_id"], "from_request": out["request_id"]})
        assert ev.status_code == 202, ev.text
        attributed: dict[str, Any] | None = ev.json()["events"][0]["attributed"]
        return attributed

    before = [answer(f"book-crash-{n}") for n in range(12)]
    wait_for_condition(lambda: _in_book(before), timeout=30,
                       what="the answers are in the shared impression book")
    book = ray.get_actor(book_name(SHARD_PREFIX), namespace="intentrec")
    ray.kill(book, no_restart=False)
    for out in before:
        attributed = click(out)
        assert attributed in (None, {"model_version": out["model_version"], "position": 1})
    # Answers given while the book restarts are not handed over (README, "Feedback loop"):
    # the next ones are, once it runs again.
    wait_for_condition(
        lambda: ray.get(book.attribute.remote(before[0]["request_id"], None), timeout=5) is None,
        timeout=60, what="the book runs again, empty")
    after = [answer(f"book-again-{n}") for n in range(12)]
    wait_for_condition(lambda: _in_book(after), timeout=60,
                       what="the restarted book holds the new answers")
    for out in after:
        assert click(out) == {"model_version": out["model_version"], "position": 1}


def _in_book(answers: Any) -> bool:
    import ray

    book = ray.get_actor(book_name(SHARD_PREFIX), namespace="intentrec")
    return all(ray.get([book.attribute.remote(a["request_id"], None) for a in answers]))


def _splits(rollout: Rollout, calls: int = 24) -> set[str | None]:
    """The split version each replica runs (None: none); empty unless both replicas answered."""
    outs = [rollout.ranker.serving.remote() for _ in range(calls)]
    seen = {o["replica"]: o["split"] and o["split"]["version"] for o in (r.result() for r in outs)}
    return set(seen.values()) if len(seen) == 2 else set()
