"""API keys and scopes (actors/auth.py): closed by default, two scopes, constant-time compares."""

from __future__ import annotations

import pytest

from actors import auth
from actors.auth import ADMIN_KEY_ENV, ANONYMOUS_ENV, CLIENT_KEY_ENV, ApiKeys, Scope
from graph.errors import ConfigError, ForbiddenError, UnauthorizedError

CLIENT = "client-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
BOTH = {CLIENT_KEY_ENV: CLIENT, ADMIN_KEY_ENV: ADMIN}


def test_no_key_and_no_anonymous_mode_refuses_to_start_and_says_how() -> None:
    with pytest.raises(ConfigError) as info:
        ApiKeys.from_env({})
    msg = info.value.message
    for fix in (CLIENT_KEY_ENV, ADMIN_KEY_ENV, "allow_anonymous: true", f"{ANONYMOUS_ENV}=1",
                "secrets.token_urlsafe"):
        assert fix in msg, (fix, msg)
    # An empty variable is no key, and a false flag is no anonymous mode.
    with pytest.raises(ConfigError):
        ApiKeys.from_env({CLIENT_KEY_ENV: "", ANONYMOUS_ENV: "0"})


@pytest.mark.parametrize("env", [
    {ANONYMOUS_ENV: "1"}, {ANONYMOUS_ENV: "true"}, {CLIENT_KEY_ENV: CLIENT}, {ADMIN_KEY_ENV: ADMIN}, BOTH,
])
def test_a_key_or_explicit_anonymous_mode_starts(env: dict[str, str]) -> None:
    keys = ApiKeys.from_env(env)
    assert keys.anonymous == (ANONYMOUS_ENV in env)
    assert ApiKeys.from_env({}, allow_anonymous=True).anonymous  # the app argument


@pytest.mark.parametrize(("env", "field"), [
    ({CLIENT_KEY_ENV: "short"}, CLIENT_KEY_ENV),
    ({ADMIN_KEY_ENV: "has spaces in the middle of it"}, ADMIN_KEY_ENV),
    ({CLIENT_KEY_ENV: "schlüssel-0123456789abcdef"}, CLIENT_KEY_ENV),
    ({CLIENT_KEY_ENV: CLIENT, ADMIN_KEY_ENV: CLIENT}, ADMIN_KEY_ENV),
    ({CLIENT_KEY_ENV: CLIENT, ANONYMOUS_ENV: "maybe"}, ANONYMOUS_ENV),
])
def test_bad_key_settings_name_the_variable(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ApiKeys.from_env(env)
    assert info.value.field == field
    for value in env.values():  # a key never appears in an error or a repr
        if len(value) >= 16:
            assert value not in info.value.message


def test_keys_stay_out_of_repr_and_logs() -> None:
    keys = ApiKeys.from_env(BOTH)
    assert CLIENT not in repr(keys) and ADMIN not in repr(keys)
    assert keys.describe() == "client key on, admin key on, anonymous events off"


def test_the_env_var_names_are_configurable() -> None:
    keys = ApiKeys.from_env({"SHOP_CLIENT": CLIENT}, client_env="SHOP_CLIENT", admin_env="SHOP_ADMIN")
    keys.require(CLIENT, Scope.CLIENT, "posting events")
    with pytest.raises(UnauthorizedError, match="set `SHOP_ADMIN`"):
        keys.require(None, Scope.ADMIN, "deleting a user")


@pytest.mark.parametrize(("presented", "scope", "error"), [
    (CLIENT, Scope.CLIENT, None),
    (ADMIN, Scope.CLIENT, None),
    (ADMIN, Scope.ADMIN, None),
    (CLIENT, Scope.ADMIN, ForbiddenError),
    (None, Scope.CLIENT, UnauthorizedError),
    (None, Scope.ADMIN, UnauthorizedError),
    ("wrong-key-0123456789abcdef", Scope.CLIENT, UnauthorizedError),
    ("wrong-key-0123456789abcdef", Scope.ADMIN, UnauthorizedError),
    (CLIENT[:-1], Scope.CLIENT, UnauthorizedError),
])
def test_scopes(presented: str | None, scope: Scope, error: type[Exception] | None) -> None:
    keys = ApiKeys.from_env(BOTH)
    if error is None:
        keys.require(presented, scope, "this")
        return
    with pytest.raises(error) as info:
        keys.require(presented, scope, "this")
    assert getattr(info.value, "field", None) == "X-API-Key"
    assert "X-API-Key" in str(info.value)
    assert (CLIENT not in str(info.value)) and (ADMIN not in str(info.value))


def test_anonymous_mode_opens_only_what_is_marked_anonymous_ok() -> None:
    keys = ApiKeys.from_env({ANONYMOUS_ENV: "1"})
    keys.require(None, Scope.CLIENT, "posting events", anonymous_ok=True)
    with pytest.raises(UnauthorizedError, match=f"none configured: set `{CLIENT_KEY_ENV}`"):
        keys.require(None, Scope.CLIENT, "a user's recommendations")
    with pytest.raises(UnauthorizedError, match=f"set `{ADMIN_KEY_ENV}`"):
        keys.require(None, Scope.ADMIN, "deleting a user")
    # Without anonymous mode, anonymous_ok changes nothing.
    with pytest.raises(UnauthorizedError):
        ApiKeys.from_env(BOTH).require(None, Scope.CLIENT, "posting events", anonymous_ok=True)


def test_a_server_without_an_admin_key_says_so() -> None:
    keys = ApiKeys.from_env({CLIENT_KEY_ENV: CLIENT})
    with pytest.raises(ForbiddenError, match=f"set `{ADMIN_KEY_ENV}`"):
        keys.require(CLIENT, Scope.ADMIN, "deleting a user")
    keys.require(CLIENT, Scope.CLIENT, "posting events")


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    ApiKeys.from_env(BOTH).require(CLIENT, Scope.CLIENT, "posting events")
    assert len(calls) == 2  # both keys, whichever matches
    assert {b for _, b in calls} == {CLIENT.encode(), ADMIN.encode()}
