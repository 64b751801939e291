"""Test tiers and shared fixtures.

- ``unit``: no Ray. An autouse fixture makes ``ray.init`` raise so a unit test cannot start a cluster.
- ``integration``: one local Ray cluster for the whole session (fixed num_cpus, dashboard off).
- ``smoke``: the README's commands and the training job on real data.
"""

from __future__ import annotations

import os
import sys
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
