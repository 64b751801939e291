"""Provider overlays (deploy/overlays/*.yaml, applied by scripts/cluster_overlay.py): each gives a
cluster.yaml that Ray's own validator accepts, for that provider, with the storage location on
that cloud's object store (through pyarrow's filesystems, as graph/storage.py reads it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from graph import storage
from tests.unit.test_cluster_config import _ray_up_validation, launcher_unknown_keys

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "cluster_overlay.py"
OVERLAYS = REPO / "deploy" / "overlays"

# provider -> (URI scheme, pyarrow filesystem, the SDK the head's autoscaler needs)
EXPECTED = {
    "gcp": ("gs", "GcsFileSystem", "google-api-python-client"),
    "azure": ("abfs", "AzureFileSystem", "azure-mgmt-compute"),
}


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("cluster_overlay", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_every_overlay_file_is_tested() -> None:
    assert sorted(p.stem for p in OVERLAYS.glob("*.yaml")) == sorted(EXPECTED)


def test_cluster_yaml_itself_stores_on_s3(cluster: dict[str, Any]) -> None:
    mod = _script()
    uri = mod.storage_of(cluster["head_start_ray_commands"])
    assert uri and urlsplit(uri).scheme == "s3"
    assert mod.storage_of(cluster["worker_start_ray_commands"]) == uri


@pytest.mark.parametrize("provider", sorted(EXPECTED))
def test_overlay_gives_a_valid_cluster_yaml_on_that_clouds_storage(
        cluster: dict[str, Any], provider: str) -> None:
    mod = _script()
    scheme, fs_name, sdk = EXPECTED[provider]
    overlay = yaml.safe_load((OVERLAYS / f"{provider}.yaml").read_text())
    merged = mod.apply_overlay(cluster, overlay)

    prepared = _ray_up_validation(merged)
    assert prepared["provider"]["type"] == provider
    assert launcher_unknown_keys(merged) == []
    assert set(merged["available_node_types"]) == set(cluster["available_node_types"])
    for name, node_type in merged["available_node_types"].items():
        assert node_type["node_config"] == overlay["available_node_types"][name]["node_config"]
        assert node_type["resources"] == cluster["available_node_types"][name]["resources"]
    assert any(sdk in cmd for cmd in merged["head_setup_commands"])
    assert not any("boto3" in cmd for cmd in merged["head_setup_commands"])

    # Both node kinds write the same storage line, on this cloud's object store.
    uri = overlay["intentrec_storage"]
    assert mod.storage_of(merged["head_start_ray_commands"]) == uri
    assert mod.storage_of(merged["worker_start_ray_commands"]) == uri
    assert urlsplit(uri).scheme == scheme
    # What the app and train_job.py do with it: relative locations under it, through pyarrow.
    artifacts = storage.place("artifacts", uri)
    assert artifacts == uri + "/artifacts"
    fs, path = storage.filesystem(artifacts)
    assert type(fs).__name__ == fs_name
    assert path.endswith("intentrec/artifacts")
    # Everything else is cluster.yaml's own.
    for key in ("setup_commands", "file_mounts", "docker", "max_workers"):
        assert merged[key] == cluster[key], key
    assert merged["head_start_ray_commands"][1:] == cluster["head_start_ray_commands"][1:]


def test_an_unknown_overlay_key_or_node_type_is_named(cluster: dict[str, Any]) -> None:
    mod = _script()
    with pytest.raises(ValueError, match="storage_uri"):
        mod.apply_overlay(cluster, {"storage_uri": "gs://b/x"})
    with pytest.raises(ValueError, match=r"available_node_types\.tpu_worker"):
        mod.apply_overlay(cluster, {"available_node_types": {"tpu_worker": {"node_config": {}}}})


def test_the_command_prints_the_merged_yaml() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), str(OVERLAYS / "gcp.yaml")],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    merged = yaml.safe_load(out)
    assert merged["provider"]["type"] == "gcp"
    assert merged["head_start_ray_commands"][0].startswith('echo "INTENTREC_STORAGE=gs://')
