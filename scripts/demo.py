"""The README's demo: train on the built-in data, serve, shop a session, watch recommendations move.

    python scripts/demo.py                     # full built-in data (what `make demo` runs)
    python scripts/demo.py --max-users 300 --epochs 2   # a quick slice

Steps: start a local Ray (127.0.0.1, no dashboard) → train and evaluate with Ray Train
(``graph.pipeline.run_pipeline``, the same code as ``train_job.py``) → deploy the Serve app on
127.0.0.1 → ask for recommendations for a real shopper → post a short session (views and an
add-to-cart in a category the shopper never bought) → ask again → shut everything down.
Views and carts are posted by this script: the built-in data has purchases only.

The app is closed by default, and the demo does not open it: it generates a random client key
and admin key for its run (``secrets.token_urlsafe``), gives them to the replicas, and sends the
client key in ``X-API-Key`` (events and a shopper's recommendations need it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def show(title: str, rec: dict[str, Any], highlight: set[str] | None = None) -> None:
    print(f"\n{title}  (model {rec['model_version']}, session events: {rec['session_events']})")
    if rec.get("intent"):
        intent = ", ".join(f"{i['category']} {i['weight']:.0%}" for i in rec["intent"][:3])
        print(f"  session intent: {intent}")
    print(f"  {'#':>2}  {'new':3}  {'score':>6}  {'item':<62}  reason")
    for n, it in enumerate(rec["items"], 1):
        new = "*" if highlight is not None and it["item_id"] not in highlight else ""
        reason = it["reasons"][0] if it["reasons"] else ""
        print(f"  {n:>2}  {new:3}  {it['score']:>6.2f}  {it['title'][:62]:<62}  {reason}")


def pick_session(art: Any, user: str) -> tuple[str, list[str]]:
    """A category the shopper never bought, and three of its popular items."""
    import numpy as np

    items = art.items
    uidx = art.user_index()[user]
    bought = set(art.signals.user_history[uidx].indices.tolist())
    bought_cats = {items["category"].iat[i].split(" > ")[1] if " > " in items["category"].iat[i] else ""
                   for i in bought}
    pop = art.signals.popularity
    order = np.argsort(-pop)
    for i in order[:5000]:
        parts = str(items["category"].iat[i]).split(" > ")
        if len(parts) < 2 or parts[1] in bought_cats or parts[0] not in {"GROCERY", "MEAT", "PRODUCE"}:
            continue
        same = [j for j in order[:20000] if str(items["category"].iat[j]).split(" > ")[:2] == parts[:2]]
        if len(same) >= 3:
            return " > ".join(parts[:2]), [str(items["item_id"].iat[j]) for j in same[:3]]
    raise RuntimeError("no category to shop found")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-users", type=int, default=None, help="train on a sample of users")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: TrainConfig's)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    p.add_argument("--output", default=str(ROOT / "artifacts"), help="artifact root")
    p.add_argument("--keep", action="store_true",
                   help="keep serving after the demo, for the live shop page at /demo (Ctrl-C stops)")
    args = p.parse_args()

    import httpx
    import numpy as np
    import ray
    from ray import serve

    import serve_app
    from actors.session_state import SessionStateConfig, SessionStore
    from graph.artifacts import read_artifact
    from graph.config import TrainConfig
    from graph.pipeline import PipelineConfig, run_pipeline

    t0 = time.perf_counter()
    step("starting a local Ray cluster (127.0.0.1, dashboard off)")
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}},
             log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="intentrec-demo-"))
    session_cfg = SessionStateConfig(num_shards=2, wal_uri=str(work / "sessions"),
                                     actor_prefix="intentrec-demo-session")
    try:
        step("training the GNN with Ray Train and evaluating it against the baselines")
        train = TrainConfig(storage_path=str(work / "checkpoints"), run_name="demo",
                            **({"epochs": args.epochs} if args.epochs else {}))
        result = run_pipeline(PipelineConfig(max_users=args.max_users, output=args.output,
                                             train=train))
        print("\n" + result.table)

        step(f"deploying the Serve app on http://127.0.0.1:{args.port}")
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app_args = serve_app.AppArgs(artifacts_root=args.output, state_dir=str(work / "state"),
                                     reload_poll_s=0, session=session_cfg)
        # Keys for this run only: the app refuses to start without one.
        client_key, admin_key = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        keys = {app_args.api_key_env: client_key, app_args.admin_key_env: admin_key}
        serve.run(serve_app.compose(app_args, env_vars={"PYTHONPATH": os.environ["PYTHONPATH"], **keys}),
                  name="intentrec", route_prefix="/", blocking=False)
        print("  generated a client key and an admin key for this run (sent as X-API-Key)")
        url = f"http://127.0.0.1:{args.port}"
        client = httpx.Client(timeout=30.0, headers={"X-API-Key": client_key})
        deadline = time.monotonic() + 300
        while True:
            try:
                if client.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Serve app did not become healthy within 300 s")
            time.sleep(1.0)
        print("  endpoint ready:", client.get(url + "/healthz").json())

        art = read_artifact(args.output)
        # A typical shopper: the median number of distinct items bought among regulars.
        sizes = art.signals.user_history.getnnz(axis=1)
        regulars = np.flatnonzero(sizes >= 20)
        median = regulars[np.argsort(sizes[regulars])[len(regulars) // 2]]
        user = str(art.user_ids[int(median)])
        category, basket = pick_session(art, user)
        sid = f"demo-{int(time.time())}"
        context = {"ts": "2017-12-09T10:30:00-06:00", "device": "mobile", "country": "US"}

        step(f"recommendations for shopper {user} before the session")
        before = client.post(url + "/v1/recommendations",
                             json={"user_id": user, "session_id": sid, "k": 10, "context": context})
        before.raise_for_status()
        show("BEFORE", before.json())

        step(f"the shopper browses {category!r}: view, view, add_to_cart")
        events = [
            {"session_id": sid, "user_id": user, "event": "view", "item_id": basket[0]},
            {"session_id": sid, "user_id": user, "event": "view", "item_id": basket[1]},
            {"session_id": sid, "user_id": user, "event": "add_to_cart", "item_id": basket[2]},
        ]
        for ev in events:
            title = art.items.loc[art.items["item_id"] == ev["item_id"], "title"].iat[0]
            print(f"  POST /v1/events  {ev['event']:<12} {title[:70]}")
        r = client.post(url + "/v1/events", json={"events": events})
        print(f"  -> {r.status_code} accepted={r.json().get('accepted')}")
        r.raise_for_status()

        after = client.post(url + "/v1/recommendations",
                            json={"user_id": user, "session_id": sid, "k": 10, "context": context})
        after.raise_for_status()
        b_ids = {it["item_id"] for it in before.json()["items"]}
        show("AFTER (* = new in the list)", after.json(), highlight=b_ids)
        a_ids = [it["item_id"] for it in after.json()["items"]]
        changed = sum(1 for i in a_ids if i not in b_ids)
        print(f"\n{changed} of {len(a_ids)} recommendations changed after {len(events)} session events.")
        if changed == 0:
            print("error: the session did not change the recommendations", file=sys.stderr)
            return 1
        client.close()
        if args.keep:
            step(f"the live shop page: {url}/demo  (paste the client key {client_key} into its key "
                 "field); Ctrl-C stops")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        print(f"demo finished in {time.perf_counter() - t0:.0f}s; shutting down")
        return 0
    finally:
        # Delete the app (replicas drain), remove the detached shard actors, then end the private
        # cluster, Serve's controller and proxy with it (serve.shutdown() would add nothing but a
        # retry warning from the controller it kills).
        with contextlib.suppress(Exception):
            serve.delete("intentrec")
        with contextlib.suppress(Exception):
            SessionStore(session_cfg).kill()  # detached shard actors
        ray.shutdown()
        # The run's scratch (Ray Train's checkpoints, the session WAL, the app's state: 150 MB);
        # the model itself is in --output.
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
