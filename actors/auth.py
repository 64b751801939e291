"""Who may call what: the two API keys, their scopes, and why the app does not start open.

Two keys, sent in the ``X-API-Key`` header:

- the **client** key (``INTENTREC_API_KEY``): posting events and asking for a user's
  recommendations (anything that reads a user's history: buy-again, "you buy this every week",
  the user's recent events across sessions);
- the **admin** key (``INTENTREC_ADMIN_KEY``): deleting users, reloading or rolling back the model,
  anything under ``/v1/admin``. It also works wherever the client key does.

A session's recommendations (``session_id`` without ``user_id``), similar items, the model
description, health and the OpenAPI page need no key: they hold nothing personal.

With neither key configured the app refuses to start (:meth:`ApiKeys.from_env` raises), unless
anonymous access is asked for explicitly (``allow_anonymous: true`` in the app's args or
``INTENTREC_ALLOW_ANONYMOUS=1``): then requests without a key may post events, while a user's
recommendations and the admin endpoints still need a configured key. Keys are compared with
:func:`hmac.compare_digest` and never logged.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from graph.errors import ConfigError, ForbiddenError, UnauthorizedError

API_KEY_HEADER = "X-API-Key"
CLIENT_KEY_ENV = "INTENTREC_API_KEY"
ADMIN_KEY_ENV = "INTENTREC_ADMIN_KEY"
ANONYMOUS_ENV = "INTENTREC_ALLOW_ANONYMOUS"
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 256
# Printable ASCII without spaces: a header value survives any proxy unchanged.
_KEY_RE = re.compile(rf"[\x21-\x7e]{{{MIN_KEY_CHARS},{MAX_KEY_CHARS}}}")
GENERATE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class Scope(StrEnum):
    """What a key allows: ``admin`` includes ``client``."""

    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True)
class ApiKeys:
    """The keys one ingress accepts (see the module docstring).

    Args:
        client: The client key, or None.
        admin: The admin key, or None.
        anonymous: Requests without a key may do what ``anonymous_ok`` endpoints allow.
        client_env: Where the client key came from (named in error messages).
        admin_env: Where the admin key came from.
    """

    client: bytes | None = field(default=None, repr=False)
    admin: bytes | None = field(default=None, repr=False)
    anonymous: bool = False
    client_env: str = CLIENT_KEY_ENV
    admin_env: str = ADMIN_KEY_ENV

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, client_env: str = CLIENT_KEY_ENV,
                 admin_env: str = ADMIN_KEY_ENV, allow_anonymous: bool = False) -> ApiKeys:
        """Read the keys from an environment (the replica's, or the builder's plus the
        replicas' ``env_vars``).

        Raises:
            ConfigError: No key and no explicit anonymous mode; a key that is too short or holds
                spaces or non-ASCII characters; the same key for both scopes; an unreadable
                ``INTENTREC_ALLOW_ANONYMOUS``.
        """
        client, admin = _key(environ, client_env), _key(environ, admin_env)
        if client is not None and client == admin:
            raise ConfigError(f"`{client_env}` and `{admin_env}` hold the same key: give the admin "
                              f"key its own value (generate one with {GENERATE_KEY})", admin_env)
        flag = environ.get(ANONYMOUS_ENV, "").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ConfigError(f"`{ANONYMOUS_ENV}` ({flag!r}) must be 1 or 0 (true/false)",
                              ANONYMOUS_ENV)
        anonymous = allow_anonymous or flag in _TRUE
        if client is None and admin is None and not anonymous:
            raise ConfigError(
                f"no API key is configured, and intentrec does not start open to anyone: set "
                f"`{client_env}` (the client key: events and a user's recommendations) and "
                f"`{admin_env}` (the admin key: deleting users, model reloads) in the environment "
                f"of the Serve replicas (generate a key with {GENERATE_KEY}), or allow anonymous "
                f"access explicitly with `allow_anonymous: true` in the app's args or "
                f"`{ANONYMOUS_ENV}=1` (local development: anyone may then post events; a user's "
                f"recommendations and the admin endpoints stay closed)",
                client_env,
            )
        return cls(client, admin, anonymous, client_env, admin_env)

    def describe(self) -> str:
        """For the start-up log line; never the keys themselves."""

        def on(b: object) -> str:
            return "on" if b else "off"

        return (f"client key {on(self.client)}, admin key {on(self.admin)}, "
                f"anonymous events {on(self.anonymous)}")

    def require(self, presented: str | None, scope: Scope, what: str, *,
                anonymous_ok: bool = False, hint: str = "") -> None:
        """Let the request through, or raise.

        Args:
            presented: The ``X-API-Key`` header (None when absent or empty).
            scope: The scope the endpoint needs.
            what: What the request asks for, for the message ("posting events").
            anonymous_ok: In anonymous mode, a request without a key is let through.
            hint: Appended to the 401 message: what the caller can do without a key.

        Raises:
            UnauthorizedError: (401) no key, or a key this server does not know.
            ForbiddenError: (403) a valid key without the scope (the client key on an admin
                endpoint).
        """
        if presented is None:
            if anonymous_ok and self.anonymous:
                return
            raise UnauthorizedError(f"{what} needs {self._accepted(scope)} in the {API_KEY_HEADER} "
                                    f"header{self._unset(scope)}{hint}", API_KEY_HEADER)
        got = presented.encode("utf-8", "replace")
        # Both comparisons always run: the time taken does not say which key was close.
        is_admin = self.admin is not None and hmac.compare_digest(got, self.admin)
        is_client = self.client is not None and hmac.compare_digest(got, self.client)
        if is_admin or (is_client and scope is Scope.CLIENT):
            return
        if is_client:
            raise ForbiddenError(f"{what} needs the admin key; the {API_KEY_HEADER} header holds "
                                 f"the client key{self._unset(scope)}", API_KEY_HEADER)
        raise UnauthorizedError(f"the {API_KEY_HEADER} header holds no key this server accepts; "
                                f"{what} needs {self._accepted(scope)}{self._unset(scope)}",
                                API_KEY_HEADER)

    def _accepted(self, scope: Scope) -> str:
        return "the admin key" if scope is Scope.ADMIN else "the client key (or the admin key)"

    def _unset(self, scope: Scope) -> str:
        """Why no key can work, when none that grants ``scope`` is configured."""
        if self.admin is None and (scope is Scope.ADMIN or self.client is None):
            env = self.admin_env if scope is Scope.ADMIN else self.client_env
            return f" (this server has none configured: set `{env}` in its environment)"
        return ""


def _key(environ: Mapping[str, str], name: str) -> bytes | None:
    value = environ.get(name, "")
    if not value:
        return None
    if not _KEY_RE.fullmatch(value):
        raise ConfigError(
            f"`{name}` must be {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable ASCII characters "
            f"without spaces (it has {len(value)} characters); generate a key with {GENERATE_KEY}",
            name,
        )
    return value.encode()
