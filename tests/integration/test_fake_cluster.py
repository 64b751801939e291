"""The autoscaler path, end to end, with fake nodes on this machine.

``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=deploy/fake_multinode.yaml`` starts a
real head and a real autoscaler whose node provider launches "nodes" as local raylet processes.
A task that needs a GPU cannot run on the GPU-less head, so the autoscaler must launch a fake
``ray.worker.gpu`` node, and the task must run there. Likewise, a Serve deployment with the
ranker's sizes under load asks for more replicas than the one-CPU head holds, so the autoscaler
must launch a fake ``ray.worker.cpu`` node, and a replica must serve from there.

Isolation: the cluster gets its own temp dir and free ports (nothing on 6379/8265/10001/52365),
the driver is a separate Python process (this pytest process may already be connected to the
session's own cluster), and teardown kills exactly the processes of the session that
``ray start`` was launched in (``start_new_session``) and their descendants, never ``ray stop``
(``tests/cluster_helpers.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from actors.deployment_options import DEPLOYMENTS, RANKER, options
from tests.cluster_helpers import free_ports, ray_env, ray_start_head

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_MULTINODE_YAML = REPO_ROOT / "deploy" / "fake_multinode.yaml"
SERVE_LOAD_DRIVER = REPO_ROOT / "tests" / "serve_load_driver.py"
LAUNCH_DEADLINE_S = 120

# Runs in its own interpreter: connect, ask for a GPU, report where the task ran.
DRIVER = """
import json, os, sys
import ray

ray.init(address=sys.argv[1], log_to_driver=False)
head = ray.get_runtime_context().get_node_id()
gpus_before = ray.cluster_resources().get("GPU", 0)

@ray.remote(num_gpus=1, num_cpus=1)
def where():
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ray.get_gpu_ids(),
        "node_type": os.environ.get("RAY_NODE_TYPE_NAME"),
    }

ran = ray.get(where.remote(), timeout=float(sys.argv[2]))
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print("RESULT " + json.dumps({"head": head, "gpus_before": gpus_before, "ran": ran,
                              "ran_on_resources": nodes.get(ran["node_id"], {})}))
"""


@pytest.fixture
def fake_cluster() -> Iterator[str]:
    # Short path: Ray puts unix sockets under the temp dir (107-byte limit on their paths).
    workdir = Path(tempfile.mkdtemp(prefix="irfake"))
    gcs, client, dashboard, agent = free_ports(4)
    config = yaml.safe_load(FAKE_MULTINODE_YAML.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    config_path = workdir / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))

    # The proxy (one, on the head) would send every request to the head's replicas while they
    # have room (Serve prefers replicas on the proxy's own node); off, so that the replicas on a
    # launched node answer too. On a real cluster each node has its own proxy.
    env = ray_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                  RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="0")
    head_resources = config["available_node_types"][config["head_node_type"]]["resources"]
    args = [
        f"--num-cpus={head_resources['CPU']}", f"--num-gpus={head_resources['GPU']}",
        "--object-store-memory=100000000",
        f"--port={gcs}", f"--ray-client-server-port={client}",
        "--include-dashboard=false", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={workdir / 'ray'}",
        f"--autoscaling-config={config_path}",
    ]  # fmt: skip
    try:
        with ray_start_head(args, workdir=workdir, env=env, cwd=REPO_ROOT):
            yield f"127.0.0.1:{gcs}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_gpu_task_makes_the_autoscaler_launch_a_fake_gpu_node(fake_cluster: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, fake_cluster, str(LAUNCH_DEADLINE_S)],
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_DEADLINE_S + 60,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))

    assert result["gpus_before"] == 0, "the cluster must start without a GPU node"
    assert result["ran"]["node_id"] != result["head"], "the GPU task ran on the head"
    assert result["ran"]["node_type"] == "ray.worker.gpu"
    assert result["ran_on_resources"].get("GPU") == 1
    assert len(result["ran"]["gpu_ids"]) == 1


def test_serve_load_makes_the_autoscaler_launch_a_fake_cpu_worker(fake_cluster: str) -> None:
    """Serve's replica autoscaling reaches past the head: the cluster autoscaler adds a CPU node.

    The deployment is a probe that holds each request for a few seconds without using CPU, sized
    exactly as intentrec's ranker (``options("GNNRanker")`` from ``actors/deployment_options.py``:
    0.5 CPU per replica, 1 to 4 replicas, ``target_ongoing_requests: 3``, ``upscale_delay_s:
    10``), so it scales as the ranker would under the same number of calls in flight (the
    ingress's coalesced calls, each carrying up to ``ranker_batch_size`` recommendations),
    without loading a model. The head has one CPU, so it holds two replicas; 12 clients keep 12
    calls in flight, so Serve wants 12 / 3 = 4, and the two that do not fit are what the
    autoscaler must find a node for. The load is bounded (each client stops after ``max_requests``) and
    stops as soon as a replica on the new node has answered.
    """
    opts = options(RANKER)
    auto = DEPLOYMENTS[RANKER]["autoscaling_config"]
    clients = auto["max_replicas"] * auto["target_ongoing_requests"]
    (port,) = free_ports(1)
    spec = {
        "options": opts, "name": RANKER, "port": port, "clients": clients, "hold_s": 2.0,
        "max_requests": 200, "worker_type": "ray.worker.cpu", "timeout_s": 240,
    }  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(SERVE_LOAD_DRIVER), fake_cluster, json.dumps(spec)],
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=2 * spec["timeout_s"] + 120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    progress = out.stdout[-2000:]

    head_fits = result["head_fits"]
    assert result["nodes_before"] == [result["head"]], "the cluster must start with the head only"
    assert head_fits < auto["max_replicas"], "the head alone must not hold every replica"
    # (a) Serve's autoscaler wanted, and then ran, more replicas than the head holds.
    assert result["peak"]["wanted"] > head_fits, progress
    assert result["peak"]["running"] > head_fits, progress
    # (b) + (c) a replica answered from a new, alive node of the CPU worker type.
    on_worker = {r: where for r, where in result["seen"].items()
                 if where["node_type"] == "ray.worker.cpu"}  # fmt: skip
    assert on_worker, f"no replica answered from a ray.worker.cpu node: {result['seen']}\n{progress}"
    config = yaml.safe_load(FAKE_MULTINODE_YAML.read_text())
    cpu_type = config["available_node_types"]["ray.worker.cpu"]["resources"]
    for where in on_worker.values():
        assert where["node_id"] != result["head"]
        assert where["node_id"] in result["nodes"], "the worker node is not alive"
        assert result["nodes"][where["node_id"]].get("CPU") == cpu_type["CPU"]
        assert result["nodes"][where["node_id"]].get("GPU", 0) == 0, "a GPU node took CPU work"
