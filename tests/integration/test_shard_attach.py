"""Configuration drift between the app and running session shards is refused, never kept
(actors/shard_attach.py): real shard actors on the session's Ray cluster."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.session_state import SessionStateConfig, SessionStore
from actors.shard_attach import check_attached, kill_shards
from graph.errors import ConfigError

pytestmark = pytest.mark.integration
NAMESPACE = "intentrec-test"


@pytest.fixture
def config(ray_cluster: None, tmp_path: Path) -> Iterator[SessionStateConfig]:
    cfg = SessionStateConfig(num_shards=2, wal_uri=str(tmp_path / "wal"), namespace=NAMESPACE,
                             actor_prefix=f"attach-{uuid.uuid4().hex[:10]}")
    check_attached(SessionStore(cfg))  # starts the shards with these settings
    yield cfg
    kill_shards(cfg.actor_prefix, NAMESPACE)


@pytest.mark.parametrize("change", [{"wal_uri": "/elsewhere/sessions"}, {"fsync": False},
                                    {"window": 7}])
def test_other_settings_are_refused_with_the_fix(config: SessionStateConfig,
                                                 change: dict[str, object]) -> None:
    (key, value), = change.items()
    with pytest.raises(ConfigError) as err:
        check_attached(SessionStore(config.model_copy(update=change)))
    assert err.value.field == f"session.{key}"
    assert f"(the app asks for {value!r})" in err.value.message
    assert "serve shutdown" in err.value.message
    assert f"python -m actors.shard_attach kill --prefix {config.actor_prefix}" in err.value.message


def test_another_num_shards_is_refused_and_kill_lets_it_start(config: SessionStateConfig) -> None:
    wider = config.model_copy(update={"num_shards": 3})
    with pytest.raises(ConfigError) as err:
        check_attached(SessionStore(wider))
    assert err.value.field == "session.num_shards"
    assert f"{config.actor_prefix}-0-of-2" in err.value.message
    killed = kill_shards(config.actor_prefix, NAMESPACE)  # the documented fix
    assert f"{config.actor_prefix}-0-of-2" in killed and f"{config.actor_prefix}-2-of-3" in killed
    check_attached(SessionStore(wider))  # now it starts with the new count


def test_a_client_only_setting_may_differ(config: SessionStateConfig) -> None:
    check_attached(SessionStore(config.model_copy(update={"call_timeout_s": 5.0})))


def test_the_ingress_refuses_to_start_on_drifted_shards(config: SessionStateConfig,
                                                        tmp_path: Path) -> None:
    import serve_app

    args = serve_app.AppArgs(allow_anonymous=True, state_dir=str(tmp_path / "state"),
                             session=config.model_copy(update={"fsync": False}))
    # The class as written (the Serve ingress wrapper around it has an async constructor).
    user_class = serve_app.Ingress.func_or_class.__mro__[1]
    ingress = user_class.__new__(user_class)
    with pytest.raises(ConfigError, match="fsync"):
        user_class.__init__(ingress, None, None, args.model_dump())
