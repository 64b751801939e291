"""Driver for the fake-cluster autoscaling test: deploy, load over HTTP until a worker node serves.

Run as a script in its own interpreter (``python tests/serve_load_driver.py ADDRESS SPEC``), so
that the pytest process, which may be connected to the session's own cluster, stays out of it,
and so that :class:`Probe` is pickled by value (the replicas need no project code).

``SPEC`` is a JSON object:

- ``options``: ``@serve.deployment`` keyword arguments (the test passes the ranker's,
  ``actors.deployment_options.options("GNNRanker")``);
- ``name``: the deployment's name;
- ``port``: the HTTP port of Serve's one proxy, on the head, at 127.0.0.1;
- ``clients``: how many HTTP clients keep one request each in flight;
- ``hold_s``: how long a replica holds each request (an ``asyncio.sleep``: ongoing requests that
  cost no CPU);
- ``max_requests``: per client, the bound on the load: it stops there even if nothing happened;
- ``worker_type``: the node type that must end up serving;
- ``timeout_s``: how long each wait may take before the driver gives up and reports.

It prints progress lines and one ``RESULT {json}`` line: the head's node id, how many replicas the
head holds, the largest number of replicas Serve wanted (all states) and ran, every replica that
answered with its node, and the alive nodes with their resources.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

APP = "autoscale"


class Probe:
    """Holds each request for ``hold_s`` and says which replica and node answered."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s

    async def __call__(self, request: Any) -> dict[str, Any]:
        await asyncio.sleep(self.hold_s)
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            # Set by the fake node provider on the raylets it launches; the head has none.
            "node_type": os.environ.get("RAY_NODE_TYPE_NAME", "head"),
        }


def log(msg: str) -> None:
    print(msg, flush=True)


def wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            log(f"reached: {what}")
            return True
        time.sleep(0.5)
    log(f"gave up waiting for: {what}")
    return False


def main() -> None:
    address, spec = sys.argv[1], json.loads(sys.argv[2])
    opts, name, worker_type = spec["options"], spec["name"], spec["worker_type"]
    ray.init(address=address, log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    nodes_before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    head_fits = math.floor(ray.cluster_resources()["CPU"] / opts["ray_actor_options"]["num_cpus"])

    # One proxy, on the head: fake nodes share this machine's ports, so a proxy per node would
    # fight over the HTTP port.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": spec["port"]})
    serve.run(serve.deployment(name=name, **opts)(Probe).bind(spec["hold_s"]), name=APP,
              route_prefix="/")
    log(f"deployed {name} on the head; the head holds {head_fits} replicas")

    seen: dict[str, dict[str, str]] = {}
    peak = {"wanted": 0, "running": 0}
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        for _ in range(spec["max_requests"]):
            if stop.is_set():
                return
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{spec['port']}/", timeout=60) as r:
                    answer = json.loads(r.read())
            except Exception as exc:  # a 503 under backpressure is load too; keep going
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                seen[answer["replica"]] = {"node_id": answer["node_id"],
                                           "node_type": answer["node_type"]}

    def replicas() -> dict[str, int]:
        states = serve.status().applications[APP].deployments[name].replica_states
        counts = {str(getattr(k, "value", k)): int(v) for k, v in states.items()}
        live = {k: v for k, v in counts.items() if k not in ("STOPPING", "STOPPED")}
        peak["wanted"] = max(peak["wanted"], sum(live.values()))
        peak["running"] = max(peak["running"], counts.get("RUNNING", 0))
        return counts

    def worker_serves() -> bool:
        replicas()
        with lock:
            return any(r["node_type"] == worker_type for r in seen.values())

    pool = ThreadPoolExecutor(spec["clients"])
    futures = [pool.submit(client) for _ in range(spec["clients"])]
    try:
        wait(lambda: bool(replicas()) and peak["wanted"] > head_fits, spec["timeout_s"],
             f"Serve wants more than {head_fits} replicas")
        log(f"replica states: {replicas()}")
        wait(worker_serves, spec["timeout_s"], f"a replica on a {worker_type} node answers")
        log(f"replica states: {replicas()}")
    finally:
        stop.set()
        for f in futures:
            f.result()
        pool.shutdown()

    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    print("RESULT " + json.dumps({
        "head": head, "nodes_before": nodes_before, "head_fits": head_fits, "peak": peak,
        "seen": seen, "nodes": nodes, "errors": errors[:10], "num_errors": len(errors),
    }), flush=True)


if __name__ == "__main__":
    main()
