"""One source of truth for deployment sizes: actors/deployment_options.py.

The decorators, ``serve_app.compose`` and ``serve_config.yaml`` must all carry its values; each
test here fails when one of them drifts (a literal in a decorator, a hand edit of the file, a
hard-coded ``num_cpus`` in ``compose``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import serve_app
from actors import deployment_options as D
from actors.context import ContextEnricher
from actors.overload import RETRY_AFTER_S
from actors.ranker import GNNRanker

CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"
DECORATED = {d.name: d for d in (serve_app.Ingress, ContextEnricher, GNNRanker)}


def _file_entries() -> dict[str, dict[str, Any]]:
    app = yaml.safe_load(CONFIG.read_text())["applications"][0]
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}


def test_serve_config_is_exactly_the_generated_block() -> None:
    text = CONFIG.read_text()
    assert D.differences(yaml.safe_load(text)) == []
    assert D.with_block(text) == text, (
        "serve_config.yaml's deployments block was edited by hand: "
        "python -m actors.deployment_options --write")


@pytest.mark.parametrize("name", sorted(DECORATED))
def test_the_file_changes_nothing_over_the_decorator(name: str) -> None:
    """What `serve deploy serve_config.yaml` applies over a decorator equals the decorator: the
    file and `serve run serve_app:app` (and every test that deploys with compose) agree."""
    dep = DECORATED[name]
    entry = _file_entries()[name]
    applied = dep.options(**entry)
    assert applied._deployment_config == dep._deployment_config, name
    assert applied.ray_actor_options == dep.ray_actor_options, name
    assert dep.ray_actor_options == D.options(name)["ray_actor_options"]


def test_a_drifted_value_is_seen_by_the_options_comparison() -> None:
    """Why the comparison above can fail: Ray's default graceful shutdown (20 s) or another
    max_replicas is a different deployment config."""
    ranker = D.options(D.RANKER)
    ranker.pop("graceful_shutdown_timeout_s")
    assert GNNRanker.options(**ranker)._deployment_config == GNNRanker._deployment_config
    assert GNNRanker.options(graceful_shutdown_timeout_s=20)._deployment_config \
        != GNNRanker._deployment_config
    scaled = {**D.options(D.RANKER)["autoscaling_config"], "max_replicas": 2}
    assert GNNRanker.options(autoscaling_config=scaled)._deployment_config \
        != GNNRanker._deployment_config


def test_compose_with_an_environment_keeps_the_sizes() -> None:
    app = serve_app.compose(serve_app.AppArgs(allow_anonymous=True), env_vars={"X": "1"})
    ingress = app._bound_deployment
    bound = [ingress] + [a._bound_deployment for a in ingress.init_args
                         if hasattr(a, "_bound_deployment")]
    assert sorted(d.name for d in bound) == sorted(DECORATED)
    for dep in bound:
        assert dep.ray_actor_options == {**D.options(dep.name)["ray_actor_options"],
                                         "runtime_env": {"env_vars": {"X": "1"}}}, dep.name
        assert _values(dep) == _values(DECORATED[dep.name]), dep.name


def test_an_inline_ranker_app_has_no_ranker_deployment_and_an_ingress_sized_for_both() -> None:
    args = serve_app.AppArgs(allow_anonymous=True, inline_ranker=True, inline_context=True)
    app = serve_app.compose(args, env_vars={"X": "1"})
    ingress = app._bound_deployment
    assert ingress.name == D.INGRESS
    assert ingress.init_args[:2] == (None, None)  # no ranker handle, no enricher handle
    assert ingress.init_args[2]["inline_ranker"] is True
    cpus = (D.options(D.INGRESS)["ray_actor_options"]["num_cpus"]
            + D.options(D.RANKER)["ray_actor_options"]["num_cpus"])
    assert ingress.ray_actor_options == {"num_cpus": cpus, "runtime_env": {"env_vars": {"X": "1"}}}
    config = ingress._deployment_config
    assert config.graceful_shutdown_timeout_s == D.options(D.RANKER)["graceful_shutdown_timeout_s"]
    assert config.max_constructor_retry_count == D.options(D.RANKER)["max_constructor_retry_count"]
    # The ingress's own settings otherwise: its queue and autoscaling.
    assert config.max_ongoing_requests == D.options(D.INGRESS)["max_ongoing_requests"]
    assert config.autoscaling_config.target_ongoing_requests == \
        D.options(D.INGRESS)["autoscaling_config"]["target_ongoing_requests"]


def test_rollouts_reach_the_deployment_that_ranks() -> None:
    from actors.rollout import ranker_deployment

    assert ranker_deployment(False) == D.RANKER
    assert ranker_deployment(True) == D.INGRESS


def _values(dep: Any) -> dict[str, Any]:
    """The deployment config's values (not which options were given by name)."""
    return dep._deployment_config.model_dump(exclude={"user_configured_option_names"})


def test_check_names_each_difference_and_write_fixes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    drifted = copy.deepcopy(cfg)
    deps = {d["name"]: d for d in drifted["applications"][0]["deployments"]}
    deps["GNNRanker"]["autoscaling_config"]["max_replicas"] = 2
    deps["ContextEnricher"]["max_ongoing_requests"] = 64
    errors = D.differences(drifted)
    assert len(errors) == 2, errors
    assert any("GNNRanker].autoscaling_config" in e for e in errors)
    assert any("ContextEnricher].max_ongoing_requests: 64 in the file, 128" in e for e in errors)

    path = tmp_path / "serve_config.yaml"
    path.write_text(CONFIG.read_text().replace("max_ongoing_requests: 64",
                                               "max_ongoing_requests: 32"))
    assert D.main(["--check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "GNNRanker].max_ongoing_requests: 32 in the file, 64" in err
    assert "--write" in err
    assert D.main(["--write", "--config", str(path)]) == 0
    assert path.read_text() == CONFIG.read_text()
    assert D.main(["--check", "--config", str(path)]) == 0


def test_every_deployment_bounds_its_queue_with_the_overload_retry_hint() -> None:
    """The overload tests' assumptions (actors/overload.py) hold for every deployment."""
    for name in D.DEPLOYMENTS:
        opts = D.options(name)
        assert opts["max_queued_requests"] > 0, name
        assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": RETRY_AFTER_S}
        assert opts["autoscaling_config"]["min_replicas"] >= 1, name
        assert opts["ray_actor_options"]["num_cpus"] < 1, "replicas share a few cores"
