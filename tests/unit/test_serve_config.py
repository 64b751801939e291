"""serve_config.yaml is checked with Ray's own schema, a strict unknown-keys walk and AppArgs.

Ray Serve 2.60's ``ServeDeploySchema`` silently ignores unknown keys (``max_ongoing_request: 5``
would deploy with the default), so every mapping in the file is also compared with the fields of
the Ray model it feeds.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "serve_config.yaml"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models named anywhere in a type annotation (Optional, Union, List, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out.extend(_models_in(arg))
    return out


def strict_walk(model: type[BaseModel], data: Any, path: str = "") -> list[str]:
    """Every key of ``data`` that ``model`` (recursively) does not define."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    errors: list[str] = []
    for key, value in data.items():
        if key not in known:
            errors.append(f"{path}{key}: unknown key for {model.__name__} "
                          f"(known: {', '.join(sorted(known))})")
            continue
        for sub in _models_in(fields[key].annotation):
            items = value if isinstance(value, list) else [value]
            for i, v in enumerate(items):
                where = f"{path}{key}[{i}]." if isinstance(value, list) else f"{path}{key}."
                errors.extend(strict_walk(sub, v, where))
    return errors


def check_config(cfg: dict[str, Any]) -> list[str]:
    """All problems of a Serve config: Ray's schema, unknown keys, AppArgs, deployment names."""
    from ray.serve.schema import ServeDeploySchema

    import serve_app
    from actors.context import ContextEnricher
    from actors.ranker import GNNRanker

    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as exc:
        return [f"ServeDeploySchema: {exc}"]
    errors = strict_walk(ServeDeploySchema, cfg)
    names = {serve_app.Ingress.name, ContextEnricher.name, GNNRanker.name}
    for n, app in enumerate(cfg.get("applications", [])):
        try:
            serve_app.AppArgs.model_validate(app.get("args", {}))
        except ValidationError as exc:
            errors.append(f"applications[{n}].args: {exc}")
        for d, dep in enumerate(app.get("deployments", [])):
            if dep.get("name") not in names:
                errors.append(f"applications[{n}].deployments[{d}].name: {dep.get('name')!r} is "
                              f"not a deployment of the app ({sorted(names)})")
    return errors


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def test_serve_config_is_valid(config: dict[str, Any]) -> None:
    assert check_config(config) == []
    app = config["applications"][0]
    assert app["import_path"] == "serve_app:build_app"
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "ContextEnricher", "GNNRanker"}
    for dep in app["deployments"]:
        assert "autoscaling_config" in dep, dep["name"]
        assert dep["ray_actor_options"]["num_cpus"] < 1, "replicas share a few cores"
    env = app["runtime_env"]["env_vars"]
    # One compute thread per replica, and two malloc arenas (bench/ingress_heap.py: with glibc's
    # default the ingress kept growing under steady load).
    assert env["OMP_NUM_THREADS"] == "1" and env["MALLOC_ARENA_MAX"] == "2"


@pytest.mark.parametrize(
    ("where", "typo"),
    [
        ("top", "http_option"),
        ("http", "prot"),
        ("app", "route_prefx"),
        ("deployment", "max_ongoing_request"),
        ("autoscaling", "max_replica"),
        ("actor", "num_cpu"),
        ("args", "artifact_root"),
        ("session", "num_shard"),
    ],
)
def test_a_typo_anywhere_is_rejected(config: dict[str, Any], where: str, typo: str) -> None:
    cfg = copy.deepcopy(config)
    app = cfg["applications"][0]
    dep = app["deployments"][0]
    target = {
        "top": cfg, "http": cfg["http_options"], "app": app, "deployment": dep,
        "autoscaling": dep["autoscaling_config"], "actor": dep["ray_actor_options"],
        "args": app["args"], "session": app["args"]["session"],
    }[where]
    target[typo] = 1
    errors = check_config(cfg)
    assert errors, f"typo {typo!r} in {where} was accepted"
    assert any(typo in e for e in errors), errors


def test_ray_schema_alone_ignores_typos(config: dict[str, Any]) -> None:
    """Why the strict walk exists: if Ray starts rejecting unknown keys itself, revisit it."""
    from ray.serve.schema import ServeDeploySchema

    cfg = copy.deepcopy(config)
    cfg["applications"][0]["deployments"][0]["max_ongoing_request"] = 5
    ServeDeploySchema.model_validate(cfg)
    assert strict_walk(ServeDeploySchema, cfg)


def test_wrong_deployment_name_is_rejected(config: dict[str, Any]) -> None:
    cfg = copy.deepcopy(config)
    cfg["applications"][0]["deployments"][0]["name"] = "Ranker"
    assert any("'Ranker'" in e for e in check_config(cfg))


KEY_VARS = ("INTENTREC_API_KEY", "INTENTREC_ADMIN_KEY", "INTENTREC_ALLOW_ANONYMOUS")


@pytest.fixture
def no_keys(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without any API key setting (whatever the developer's shell holds)."""
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_build_app_is_a_typed_builder(no_keys: pytest.MonkeyPatch) -> None:
    import inspect

    import serve_app

    param = next(iter(inspect.signature(serve_app.build_app).parameters.values()))
    # Serve converts `args` only when the annotation is the class itself (not a string).
    assert param.annotation is serve_app.AppArgs
    no_keys.setenv("INTENTREC_ALLOW_ANONYMOUS", "1")
    assert isinstance(serve_app.app, type(serve_app.build_app(serve_app.AppArgs())))


def test_the_app_refuses_to_start_without_a_key(no_keys: pytest.MonkeyPatch) -> None:
    """Closed by default: without a key and without anonymous mode asked for, the builder (what
    `serve run` / `serve deploy` call) and the ingress replica itself refuse, saying how to fix
    it; the shipped serve_config.yaml does not open the app."""
    import serve_app
    from graph.errors import ConfigError

    for build in (lambda: serve_app.build_app(serve_app.AppArgs()),
                  lambda: serve_app.compose(serve_app.AppArgs()),
                  lambda: _ingress(serve_app.AppArgs())):
        with pytest.raises(ConfigError) as info:
            build()
        for fix in ("INTENTREC_API_KEY", "INTENTREC_ADMIN_KEY", "allow_anonymous: true",
                    "INTENTREC_ALLOW_ANONYMOUS=1"):
            assert fix in info.value.message
    shipped = yaml.safe_load(CONFIG.read_text())["applications"][0]
    assert not serve_app.AppArgs.model_validate(shipped["args"]).allow_anonymous
    assert not set(KEY_VARS) & set(shipped["runtime_env"]["env_vars"])  # no secret in git

    # Any one of: the keys in the replicas' env_vars, in this environment, or anonymous mode.
    keys = {"INTENTREC_API_KEY": "client-key-0123456789abcdef",
            "INTENTREC_ADMIN_KEY": "admin-key-0123456789abcdef"}
    serve_app.compose(serve_app.AppArgs(), env_vars=keys)
    serve_app.build_app(serve_app.AppArgs(allow_anonymous=True))
    assert _ingress(serve_app.AppArgs(allow_anonymous=True)).keys.anonymous
    small = _ingress(serve_app.AppArgs(allow_anonymous=True, impressions_capacity=7))
    assert small.feedback.impressions.capacity == 7
    no_keys.setenv("INTENTREC_ADMIN_KEY", keys["INTENTREC_ADMIN_KEY"])
    assert _ingress(serve_app.AppArgs()).keys.admin is not None


def _ingress(args: Any) -> Any:
    """The ingress class itself (inside Serve's wrapper), constructed without Ray: a store is
    passed in, so no shard actor is started."""
    import serve_app

    wrapper: Any = serve_app.Ingress
    cls = next(c for c in wrapper.func_or_class.__mro__ if "recommend" in vars(c))
    return cls(None, None, args.model_dump(), store=object())


def test_app_args_errors_name_the_field() -> None:
    import serve_app

    with pytest.raises(ValidationError, match="reload_poll_s"):
        serve_app.AppArgs(reload_poll_s=-1)
    with pytest.raises(ValidationError, match="default_timezone"):
        serve_app.AppArgs(default_timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="extra"):
        serve_app.AppArgs.model_validate({"artifacts": "x"})
    with pytest.raises(ValidationError, match="impressions_capacity"):
        serve_app.AppArgs(impressions_capacity=0)


def test_relative_paths_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import serve_app

    monkeypatch.chdir(tmp_path)
    args = serve_app.AppArgs(artifacts_root="arts", state_dir="st").resolved()
    assert args.artifacts_root == str(tmp_path / "arts")
    assert args.tombstones_path == str(tmp_path / "st" / "forgotten_users.txt")
    assert Path(args.session.wal_uri).is_absolute()
    uri = serve_app.AppArgs(artifacts_root="s3://bucket/models").resolved()
    assert uri.artifacts_root == "s3://bucket/models"




def test_importing_serve_app_is_quiet_and_app_access_gives_the_model_hint(tmp_path: Path) -> None:
    """``import serve_app`` (tests, benchmarks, every replica) builds and prints nothing;
    ``serve run serve_app:app`` looks the attribute up, which says how to get a model."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "INTENTREC_ALLOW_ANONYMOUS": "1"}

    def run(code: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout + out.stderr

    quiet = run("import serve_app")
    assert "no trained model" not in quiet, quiet
    hinted = run("import serve_app; serve_app.app")
    assert "no trained model" in hinted and "python train_job.py" in hinted, hinted
