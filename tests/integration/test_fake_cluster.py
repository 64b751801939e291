"""The autoscaler path, end to end, with fake nodes on this machine.

``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=deploy/fake_multinode.yaml`` starts a
real head and a real autoscaler whose node provider launches "nodes" as local raylet processes.
A task that needs a GPU cannot run on the GPU-less head, so the autoscaler must launch a fake
``ray.worker.gpu`` node, and the task must run there.

Isolation: the cluster gets its own temp dir and free ports (nothing on 6379/8265/10001/52365),
the driver is a separate Python process (this pytest process may already be connected to the
session's own cluster), and teardown kills exactly the processes of the session that
``ray start`` was launched in (``start_new_session``), never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import wait_for_condition

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_MULTINODE_YAML = REPO_ROOT / "deploy" / "fake_multinode.yaml"
RAY_CLI = Path(sys.executable).with_name("ray")
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


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    # SIGTERM lets raylets clean up their sockets; whatever is still there 5 s later is killed.
    for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        try:
            wait_for_condition(lambda: not _session_pids(sid), timeout=grace_s, what="fake cluster gone")
            return
        except TimeoutError:
            continue
    raise AssertionError(f"processes of session {sid} survived SIGKILL: {_session_pids(sid)}")


@pytest.fixture
def fake_cluster() -> Iterator[str]:
    # Short path: Ray puts unix sockets under the temp dir (107-byte limit on their paths).
    workdir = Path(tempfile.mkdtemp(prefix="irfake"))
    gcs, client, dashboard, agent = _free_ports(4)
    config = yaml.safe_load(FAKE_MULTINODE_YAML.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    config_path = workdir / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    head_resources = config["available_node_types"][config["head_node_type"]]["resources"]
    cmd = [
        str(RAY_CLI), "start", "--head",
        f"--num-cpus={head_resources['CPU']}", f"--num-gpus={head_resources['GPU']}",
        "--object-store-memory=100000000",
        f"--port={gcs}", f"--ray-client-server-port={client}",
        "--include-dashboard=false", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={workdir / 'ray'}",
        f"--autoscaling-config={config_path}",
        "--disable-usage-stats",
    ]  # fmt: skip
    log = (workdir / "ray_start.log").open("w")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT
    )
    try:
        rc = proc.wait(timeout=120)
        assert rc == 0, f"ray start failed:\n{(workdir / 'ray_start.log').read_text()[-4000:]}"
        yield f"127.0.0.1:{gcs}"
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_session(proc.pid)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_gpu_task_makes_the_autoscaler_launch_a_fake_gpu_node(fake_cluster: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, fake_cluster, str(LAUNCH_DEADLINE_S)],
        env=env,
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
