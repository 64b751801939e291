"""Retraining as DEPLOY.md documents it: ``ray job submit --working-dir . -- python train_job.py``.

A private ``ray start --head`` with the dashboard (the job API lives there) on free ports and its
own temp dir; the test submits the training job twice from the repository root, exactly as a user
does against a cluster, and checks that each submission publishes a complete, new model version
and moves ``LATEST`` to it. Teardown kills only this head's processes (``tests/cluster_helpers``).

The head's environment has no ``PYTHONPATH``: the job finds ``train_job.py`` only through the
uploaded working dir, as it would on a remote head.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from graph import schema as S
from tests.cluster_helpers import RAY_CLI, free_ports, ray_env, ray_start_head
from tests.helpers import wait_for_condition

REPO_ROOT = Path(__file__).resolve().parents[2]
# .gitignore already keeps the venv home (Ray honours it); listed again so the upload stays small
# even if .gitignore changes. Patterns are relative to the working dir.
EXCLUDES = [".venv", ".git", "artifacts", "checkpoints", "state", ".mypy_cache", ".pytest_cache",
            ".ruff_cache", "bench/results"]
# A small slice of the built-in data: the point is the submission path, not model quality.
# One Ray Train worker: the head has 2 CPUs, shared with the driver and the dashboard.
TRAIN_ARGS = ["--max-users", "120", "--epochs", "1", "--workers", "1",
              "--eval-max-users", "100", "--eval-max-baskets", "200"]
JOB_TIMEOUT_S = 360

pytestmark = pytest.mark.timeout(2 * JOB_TIMEOUT_S + 180)


@pytest.fixture(scope="module")
def dashboard_url() -> Iterator[str]:
    # Short path: Ray puts unix sockets under the temp dir (107-byte limit on their paths).
    workdir = Path(tempfile.mkdtemp(prefix="irjob"))
    gcs, client, dashboard, agent_http, agent_grpc, runtime_env_agent, metrics = free_ports(7)
    args = [
        "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--ray-client-server-port={client}",
        "--num-cpus=2", "--object-store-memory=300000000",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        f"--temp-dir={workdir / 'ray'}",
    ]  # fmt: skip
    env = ray_env()
    env.pop("PYTHONPATH", None)
    url = f"http://127.0.0.1:{dashboard}"

    def job_api_up() -> bool:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5) as resp:
            return resp.status == 200

    try:
        with ray_start_head(args, workdir=workdir, env=env, cwd=workdir):
            wait_for_condition(job_api_up, timeout=60, what=f"job API at {url}")
            yield url
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _submit(url: str, output: Path, storage: Path, *extra: str) -> tuple[str, str]:
    """``ray job submit`` from the repository root; returns (submission id, streamed output)."""
    job_id = f"intentrec-smoke-{uuid.uuid4().hex[:8]}"
    cmd = [
        str(RAY_CLI), "job", "submit", "--address", url, "--submission-id", job_id,
        "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", "python", "train_job.py", *TRAIN_ARGS,
        "--output", str(output), "--storage", str(storage), *extra,
    ]  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run(
        cmd, cwd=REPO_ROOT, env=ray_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    print(f"ray job submit {' '.join(extra)}: {time.monotonic() - t0:.0f}s")
    logs = out.stdout + out.stderr
    assert out.returncode == 0, f"ray job submit exited {out.returncode}:\n{logs[-6000:]}"
    return job_id, logs


def _job_info(url: str, job_id: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/jobs/{job_id}", timeout=10) as resp:
        return json.loads(resp.read())


def _assert_complete_version(root: Path, version: str) -> dict:
    vdir = root / version
    assert (vdir / "_COMPLETE").is_file(), f"{vdir} is not a complete artifact: {os.listdir(vdir)}"
    for name in ("manifest.json", "user_emb.npy", "item_emb.npy", "users.parquet", "items.parquet"):
        assert (vdir / name).is_file(), f"{vdir} lacks {name}"
    assert json.loads((vdir / "manifest.json").read_text())["version"] == version
    return json.loads((vdir / "metrics.json").read_text())


def test_ray_job_submit_trains_and_publishes_a_new_version_each_time(
    dashboard_url: str, tmp_path: Path
) -> None:
    output, storage = tmp_path / "artifacts", tmp_path / "ckpt"

    job1, logs1 = _submit(dashboard_url, output, storage)
    info = _job_info(dashboard_url, job1)
    assert info["status"] == "SUCCEEDED", info
    # The code ran from the uploaded working dir, not from this checkout.
    assert info["runtime_env"]["working_dir"].startswith("gcs://"), info["runtime_env"]
    first = (output / "LATEST").read_text().strip()
    assert f"model version {first} published" in logs1, logs1[-4000:]

    metrics = _assert_complete_version(output, first)
    assert set(S.MODEL_NAMES) <= set(metrics), sorted(metrics)
    assert set(S.TASKS) <= set(metrics["intentrec"]), sorted(metrics["intentrec"])
    for model, tasks in metrics.items():
        if model not in S.MODEL_NAMES:
            continue  # other blocks (the search task's comparisons) have their own shape
        for task, values in tasks.items():
            for metric in S.METRICS:
                v = values[metric]
                assert math.isfinite(v) and 0.0 <= v <= 1.0, f"{model}/{task}/{metric} = {v}"
    # The evaluation table was printed into the job's log.
    for name in S.MODEL_NAMES:
        assert any(line.startswith(name) for line in logs1.splitlines()), f"no table row for {name}"

    # Retraining: a second job publishes a new version; the old one stays for rollback.
    job2, logs2 = _submit(dashboard_url, output, storage, "--skip-eval")
    assert _job_info(dashboard_url, job2)["status"] == "SUCCEEDED"
    second = (output / "LATEST").read_text().strip()
    assert second != first, "the second job did not move LATEST"
    assert f"model version {second} published" in logs2, logs2[-4000:]
    _assert_complete_version(output, second)
    _assert_complete_version(output, first)
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == sorted([first, second])
