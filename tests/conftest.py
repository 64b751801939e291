"""Test tiers and shared fixtures.

- ``unit``: no Ray. An autouse fixture makes ``ray.init`` raise so a unit test cannot start a cluster.
- ``integration``: one local Ray cluster for the whole session (fixed num_cpus, dashboard off).
- ``smoke``: the README's commands and the training job on real data.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Ray replicas and workers import project code through PYTHONPATH, not the driver's sys.path.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p
)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The traced query model (graph/text.py) is cached per machine; tests start from an empty cache of
# their own, shared by the session's processes (Ray replicas and the commands tests run inherit the
# variable), and removed when the run ends (about 150 MB).
if "INTENTREC_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="intentrec-test-cache-")
    os.environ["INTENTREC_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# OpenBLAS (numpy's and scipy's) picks its kernels by CPU: on an AVX-512 machine its SVDs and
# products round differently in the last bits than on an AVX2 one, and the rankers the fixtures
# fit from them (LightGBM on real data) then split differently, enough to reorder a top 10.
# Tests pin the AVX2 kernels, which every x86-64 machine since 2013 has, so that a fixture model
# is the same model on every CI machine. Set before anything imports numpy (OpenBLAS reads it
# when it loads); Ray workers inherit it. Serving and training pick their kernels as usual.
if sys.platform == "linux" and os.uname().machine == "x86_64" and _has_avx2():
    os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/<tier>/ get that tier's marker if they did not set one."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in ("unit", "integration", "smoke"):
            if tier in parts and not any(m.name == tier for m in item.iter_markers()):
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _forbid_ray_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("unit") is None:
        return
    import ray

    def _fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unit tests must not start Ray; mark the test 'integration' instead")

    monkeypatch.setattr(ray, "init", _fail)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for every integration test of the session."""
    import ray

    if not ray.is_initialized():
        # address="local" always starts a fresh cluster: never join a `ray start` cluster that
        # another test (the fake-cluster or job-submit smoke tests) may have running.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}},
            log_to_driver=False,
        )
    yield
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


# --------------------------------------------------------------------------------------------
# Model artifacts for the serving tests (added with actors/ranker.py and serve_app.py)
# --------------------------------------------------------------------------------------------
SERVING_MAX_USERS = 150


@pytest.fixture(scope="session")
def svd_artifact_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Artifact root with one complete version (SVD embeddings, no Ray): for unit tests."""
    root = tmp_path_factory.mktemp("svd_artifacts")
    from bench.svd_model import svd_artifact

    # Real data, real signals, real artifact format; SVD embeddings instead of the GNN, so that
    # unit tests need no Ray.
    svd_artifact(root, max_users=SERVING_MAX_USERS, dim=16, purpose="unit-test stand-in for the GNN",
                 metrics={"svd": {"note": {"embeddings": 1.0}}})
    return str(root)


@pytest.fixture(scope="session")
def trained_artifact_root(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Artifact root with one version trained by the real pipeline (Ray Train) on a small slice
    of the built-in data: for integration tests of the serving app."""
    from graph.config import TrainConfig
    from graph.pipeline import PipelineConfig, run_pipeline

    root = tmp_path_factory.mktemp("trained_artifacts")
    train = TrainConfig(epochs=2, num_workers=1, dim=32, run_name="serving-fixture",
                        storage_path=str(root / "_checkpoints"))
    run_pipeline(
        PipelineConfig(max_users=SERVING_MAX_USERS, output=str(root / "models"),
                       eval_max_users=100, eval_max_baskets=100, ablations=True, train=train),
        progress=lambda _line: None,
    )
    return str(root / "models")


# --------------------------------------------------------------------------------------------
# Object store (S3-compatible, on 127.0.0.1) for shared cluster state
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """Base URI of an empty bucket on a local S3-compatible server (tests/object_store.py); use
    ``graph.storage.join(s3_bucket, "<test>/...")`` for a test's own prefix."""
    from tests.object_store import s3_server

    with s3_server() as base:
        yield base
