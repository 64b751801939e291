"""A/B traffic split: two model versions serve side by side, each request's arm from a stable hash.

The split is part of the ranker's rollout config, the deployment's ``user_config``, so Serve hands
it to every ranker replica (and to every replica it starts later)::

    {"version": "A", "split": {"version": "B", "share": 0.1, "salt": "exp-1"}}

A request goes to ``B`` when ``bucket(salt, key) < share``, where ``key`` is the ``user_id``, or
the ``session_id`` when there is no user, and :func:`bucket` is a SHA-256 of the salt and the key
mapped to [0, 1). The same key always lands in the same arm, on every replica and after restarts;
a new salt reshuffles everyone (a new experiment). Each replica holds both models while a split
runs, so it needs memory for two versions.

``POST /v1/admin/split`` starts one and ``DELETE /v1/admin/split`` stops it
(:func:`actors.rollout.start_split`); ``GET /v1/model`` shows it. The answers name the version
that served them (``model_version``), and the feedback counters are tagged with it, so the A/B
comparison is per version (:mod:`actors.ab_report`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from graph.errors import BadRequestError

_BUCKETS = float(1 << 64)


class SplitConfig(BaseModel):
    """The second arm of a split: ``POST /v1/admin/split``'s body, and ``user_config.split``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    version: str = Field(min_length=1, max_length=128,
                         description="the version that answers the split's share of the traffic")
    share: float = Field(ge=0.0, le=1.0, description="fraction of users (sessions without a "
                         "user) that get `version`, between 0 and 1")
    salt: str = Field(default="", max_length=128, description="the experiment's name: the same "
                      "salt keeps every user in the same arm; a new one reshuffles. Default: "
                      "the split's version")

    @model_validator(mode="after")
    def _default_salt(self) -> SplitConfig:
        if not self.salt:
            self.salt = self.version
        return self


class SplitOut(BaseModel):
    """A running split, as ``GET /v1/model`` and the admin endpoints show it."""

    model_config = ConfigDict(extra="forbid")

    version: str
    share: float
    salt: str
    created: str | None = Field(default=None, description="when the split's version was trained")
    loaded_at: str | None = Field(default=None, description="when this replica loaded it")
    metrics: dict[str, Any] = Field(default_factory=dict,
                                    description="the split version's offline metrics")
    feature_skew: dict[str, Any] | None = Field(
        default=None, description="the split version's live features against its training "
        "profile on this replica (as `feature_skew` of GET /v1/model)")


class SplitResponse(BaseModel):
    """What ``POST``/``DELETE /v1/admin/split`` did."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="the version every request outside the split gets")
    split: SplitOut | None = Field(description="the split running now (null: none)")
    previous_split: SplitOut | None = Field(description="the split that ran before (null: none)")


class RolloutConfig(BaseModel):
    """The ranker deployment's ``user_config``: the version to serve, and an optional split."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=128)
    split: SplitConfig | None = None


def parse_rollout(config: Any) -> RolloutConfig:
    """Validate a ranker ``user_config``.

    Raises:
        BadRequestError: Not ``{"version": v}`` plus an optional valid ``split``; the field is
            ``user_config.<path>``.
    """
    try:
        return RolloutConfig.model_validate(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(str(p) for p in err["loc"])
        raise BadRequestError(
            f"user_config ({config!r}) is not a ranker rollout config: {path or 'body'}: "
            f"{err['msg']}; write {{'version': '<name>'}} or {{'version': '<name>', 'split': "
            "{'version': '<other>', 'share': 0.1, 'salt': '<experiment>'}}",
            field=f"user_config.{path}" if path else "user_config",
        ) from exc


def bucket(salt: str, key: str) -> float:
    """A key's place in [0, 1) for one salt: the first 8 bytes of SHA-256(salt, key).

    Deterministic across processes and restarts (unlike Python's ``hash``, which is salted per
    process), and uniform, so a share ``s`` of the keys falls below ``s``.
    """
    digest = hashlib.sha256(salt.encode() + b"\x00" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / _BUCKETS


def in_split(split: SplitConfig, user_id: str | None, session_id: str | None) -> bool:
    """Whether a request goes to the split's version: by the user, else by the session; a
    request with neither (never from the API) stays outside."""
    key = user_id if user_id is not None else session_id
    return key is not None and bucket(split.salt, key) < split.share
