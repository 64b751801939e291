"""Model rollouts that reach every ranker replica: validate, move ``LATEST``, then reconfigure.

A reload or rollback (``POST /v1/admin/reload``) runs three steps, in this order:

1. **Validate.** One ranker replica loads the version and answers a warm-up request with it
   (:meth:`actors.ranker.RankerService.prepare`). A version that cannot be served is refused here
   (422, field ``version``) and nothing has moved: ``LATEST`` and every replica stay as they were.
2. **Move** ``LATEST`` (only when the app follows ``latest`` and a version was named), so a
   replica that starts later, or the automatic pickup, lands on the same version.
3. **Reconfigure every replica** through Serve: the ranker deployment's ``user_config`` in the
   application's declarative config becomes ``{"version": v}`` and the config is applied again,
   as ``serve deploy`` with an edited file would. The code version is unchanged, so Serve does
   not restart replicas: it calls ``GNNRanker.reconfigure`` on each one, and on every replica it
   starts afterwards. With ``inline_ranker`` (the ranker inside each ingress replica, no GNNRanker
   deployment) the same ``user_config`` goes to the ``Ingress`` deployment, whose
   ``reconfigure`` hands it to its ranker.

Step 3 needs an application deployed from a config (``serve deploy serve_config.yaml``, the
REST API, or a RayService). An app started with ``serve run``/``serve.run`` has no config to
update; there the replica that validated swaps at once and the others follow ``LATEST`` within
``reload_poll_s``, and a rollout that could not reach them (a pinned version, or polling off) is
refused with a 409 before anything moves.

An A/B split (:mod:`actors.split`) travels the same way, as ``user_config.split``: it is validated
on one replica, then pushed to every replica (:func:`start_split`, :func:`stop_split`); it needs
an application deployed from a config. A reload keeps a running split, unless the reload moves
everyone to the split's version (the winner is promoted: the split is over).
"""

from __future__ import annotations

import asyncio
from typing import Any

from actors.deployment_options import INGRESS, RANKER
from actors.split import SplitConfig
from graph.artifacts import set_latest_version
from graph.errors import BadRequestError, ConflictError


def ranker_deployment(inline_ranker: bool) -> str:
    """The deployment whose replicas hold the ranker: ``GNNRanker``, or ``Ingress`` when the app
    ranks in the ingress (``AppArgs.inline_ranker``)."""
    return INGRESS if inline_ranker else RANKER


def _controller() -> Any:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


async def declared_state() -> dict[str, Any]:
    """The declarative part of Serve's state, as ``GET /api/serve/applications/`` shows it:
    ``{"target_capacity", "applications": {name: {"deployed_app_config", ...}}}`` for the
    applications deployed from a config only."""
    from ray.serve.schema import APIType

    details: dict[str, Any] = await _controller().get_serve_instance_details.remote(
        source=APIType.DECLARATIVE)
    return details


def _ranker_entry(state: dict[str, Any], app_name: str,
                  deployment: str = RANKER) -> dict[str, Any] | None:
    app = (state.get("applications") or {}).get(app_name) or {}
    doc = app.get("deployed_app_config") or {}
    return next((d for d in doc.get("deployments", []) if d.get("name") == deployment), None)


async def declared_split(app_name: str, deployment: str = RANKER
                         ) -> dict[str, Any] | None:
    """The split in the ranker's declared ``user_config`` of ``app_name`` (None: none)."""
    entry = _ranker_entry(await declared_state(), app_name, deployment) or {}
    split: dict[str, Any] | None = (entry.get("user_config") or {}).get("split")
    return split


async def push_ranker_config(app_name: str, user_config: dict[str, Any],
                             deployment: str = RANKER) -> bool:
    """Set the ranker deployment's ``user_config`` in ``app_name``'s config and apply it again
    (``deployment``: the one whose replicas hold the ranker, :func:`ranker_deployment`).

    Like ``serve deploy`` with an edited file: every other application deployed from a config,
    and the target capacity, are applied unchanged (the declarative state is the whole set;
    leaving an application out would delete it).

    Returns:
        False when ``app_name`` was not deployed from a config (nothing was changed).
    """
    from ray.serve.schema import ServeDeploySchema

    state = await declared_state()
    apps = {name: app.get("deployed_app_config")
            for name, app in (state.get("applications") or {}).items()}
    doc = apps.get(app_name)
    if doc is None:
        return False
    # Only what the operator wrote is kept (exclude_unset upstream): options not written stay
    # unset, so the values in code keep applying.
    others = [d for d in doc.get("deployments", []) if d.get("name") != deployment]
    ranker = next((d for d in doc.get("deployments", []) if d.get("name") == deployment),
                  {"name": deployment})
    apps[app_name] = {**doc, "deployments": [*others, {**ranker, "user_config": dict(user_config)}]}
    config = {"applications": [a for a in apps.values() if a is not None]}
    if state.get("target_capacity") is not None:
        config["target_capacity"] = state["target_capacity"]
    await _controller().apply_config.remote(ServeDeploySchema.model_validate(config))
    return True


async def roll_out(ranker: Any, *, app_name: str, artifacts_root: str, follow_latest: bool,
                   reload_poll_s: float, version: str | None,
                   deployment: str = RANKER) -> dict[str, Any]:
    """Validate a version, move ``LATEST`` to it, and move every ranker replica to it.

    Args:
        ranker: Handle to the ranker deployment (or the ingress's own ranker).
        app_name: The Serve application the ranker belongs to.
        artifacts_root: Where the versions and ``LATEST`` live.
        follow_latest: The app follows ``LATEST`` (``model_version: latest``), else it is pinned.
        reload_poll_s: The ranker's ``LATEST`` polling period (0: off).
        version: The version to roll to; None: what ``LATEST`` (or the pin) names now.
        deployment: The deployment whose replicas hold the ranker (:func:`ranker_deployment`).

    Returns:
        ``{"previous_version", "version", "swapped"}`` (``previous_version``: what the
        validating replica served).

    Raises:
        NotFoundError: No such version (404).
        BadRequestError: The version cannot be served (422); nothing moved.
        ConflictError: The app was not deployed from a config and the others replicas could not
            follow (pinned, or polling off); nothing moved (409).
    """
    previous = (await ranker.serving.remote())["version"]
    declared = app_name in ((await declared_state()).get("applications") or {})
    if not declared and (not follow_latest or reload_poll_s <= 0):
        raise ConflictError(
            f"application {app_name!r} was started with `serve run` (no deployed config), so a "
            "new version could reach one ranker replica only"
            + ("" if follow_latest else " (its version is pinned)")
            + "; deploy it with `serve deploy serve_config.yaml` (or a RayService) to roll out "
            "to every replica, or follow `latest` with reload_poll_s > 0",
            field="version",
        )
    target: str = await ranker.prepare.remote(version)
    if follow_latest and version is not None:
        await asyncio.to_thread(set_latest_version, artifacts_root, target)
    if declared:
        split = await declared_split(app_name, deployment)
        keep = split is not None and split.get("version") != target
        await push_ranker_config(app_name, {"version": target, **({"split": split} if keep else {})},
                                 deployment)
    else:  # the others follow LATEST within reload_poll_s
        await ranker.reload.remote(target)
    return {"previous_version": previous, "version": target, "swapped": target != previous}


def _declared_only(app_name: str, declared: bool) -> None:
    if not declared:
        raise ConflictError(
            f"application {app_name!r} was started with `serve run` (no deployed config), so a "
            "traffic split could reach one ranker replica only; deploy it with `serve deploy "
            "serve_config.yaml` (or a RayService) to split traffic",
            field="split",
        )


async def start_split(ranker: Any, *, app_name: str, split: SplitConfig,
                      deployment: str = RANKER) -> dict[str, Any]:
    """Validate both versions, then serve ``split.version`` to ``split.share`` of the users on
    every ranker replica (the ranker's ``user_config`` gets ``split``).

    Returns:
        ``{"version", "split", "previous_split"}`` (``actors.split.SplitResponse``).

    Raises:
        ConflictError: The app was not deployed from a config (409); nothing moved.
        BadRequestError: ``split.version`` is the version everyone gets already, or cannot be
            served (422, field ``version``); nothing moved.
        NotFoundError: No such version (404).
    """
    state = await declared_state()
    _declared_only(app_name, app_name in (state.get("applications") or {}))
    serving = await ranker.serving.remote()
    main = serving["version"]
    if split.version == main:
        raise BadRequestError(
            f"version {split.version!r} already answers every request; a split needs another "
            "version (see the versions under the artifacts root)", field="version")
    # Both arms answer a warm-up request on one replica before any replica moves.
    for v in (main, split.version):
        await ranker.prepare.remote(v)
    previous = await declared_split(app_name, deployment)
    await push_ranker_config(app_name, {"version": main, "split": split.model_dump()}, deployment)
    return {"version": main, "split": split.model_dump(), "previous_split": previous}


async def stop_split(ranker: Any, *, app_name: str,
                     deployment: str = RANKER) -> dict[str, Any]:
    """Stop the split on every replica: the main version answers every request again.

    Returns:
        ``{"version", "split": None, "previous_split"}``.

    Raises:
        ConflictError: The app was not deployed from a config (409).
    """
    state = await declared_state()
    _declared_only(app_name, app_name in (state.get("applications") or {}))
    main = (await ranker.serving.remote())["version"]
    previous = await declared_split(app_name, deployment)
    if previous is not None:
        await push_ranker_config(app_name, {"version": main}, deployment)
    return {"version": main, "split": None, "previous_split": previous}
