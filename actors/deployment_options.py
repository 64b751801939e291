"""Sizes and timing of the Serve deployments: the one place they are written.

The ``@serve.deployment`` decorators (``serve_app.Ingress``, ``actors.ranker.GNNRanker``,
``actors.context.ContextEnricher``) take their options from :data:`DEPLOYMENTS`, and the
``deployments`` block of ``serve_config.yaml`` is generated from it::

    python -m actors.deployment_options --write   # rewrite serve_config.yaml's deployments block
    python -m actors.deployment_options --check   # exit 1 and name each difference

``tests/unit/test_deployment_options.py`` fails when the file, the decorators and this module
disagree, so ``serve run serve_app:app``, the tests and benchmarks (decorators) and ``serve
deploy serve_config.yaml`` (a cluster) run the same sizes.

Which values are for what:

- One machine (a 2-4 core box or one 8-core worker): ``ray_actor_options.num_cpus`` is
  fractional so that one replica of each deployment, the session shards (0 CPU, I/O bound) and
  the HTTP proxy share a few cores; ``min_replicas: 1`` keeps each deployment up without a cold
  start; ``max_ongoing_requests`` and ``max_queued_requests`` bound what one replica holds (beyond
  both, a 503 with ``Retry-After``, :mod:`actors.overload`).
- A cluster: ``max_replicas`` is what Serve's autoscaler may ask for when
  ``target_ongoing_requests`` is exceeded for ``upscale_delay_s``; replicas that do not fit on
  the running nodes make the cluster autoscaler add a ``cpu_worker`` (``cluster.yaml``).
  ``downscale_delay_s`` keeps them through short lulls. On one machine the extra replicas only
  share the same cores.
- Both: ``graceful_shutdown_timeout_s`` lets a ranker replica finish its requests when a rollout
  or downscale stops it; ``max_constructor_retry_count`` bounds how long a ranker that cannot
  load its model keeps being retried (only in code, :data:`CODE_ONLY`: the Serve config file has
  no such field). ``health_check_period_s`` is 2 s for every deployment (Serve's default is 10):
  Serve learns that a replica's process died only when a health check fails, so the period is
  the longest wait before it starts a replacement (``bench/chaos.py``). A check is one empty
  actor call.

To size a deployment differently, change it here and run ``--write``; to size one deployment of
one app differently (a test, a benchmark), pass ``deployments=`` to ``serve_app.compose`` or
edit a copy of ``serve_config.yaml``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from actors.overload import RETRY_AFTER_S

# What Serve answers when a deployment's queue is full: 503 with Retry-After.
BACKPRESSURE: dict[str, Any] = {"status_code": 503, "retry_after_s": RETRY_AFTER_S}

# Queue bounds per deployment: requests waiting at each caller (the HTTP proxy for the ingress,
# each ingress replica for the others) beyond those in flight (max_ongoing_requests).
INGRESS_MAX_QUEUED = 256
RANKER_MAX_QUEUED = 128
ENRICHER_MAX_QUEUED = 128
# Seconds between Serve's health checks of a replica: a SIGKILLed replica is noticed (and a new
# one started) within this time.
HEALTH_CHECK_PERIOD_S = 2

INGRESS = "Ingress"
ENRICHER = "ContextEnricher"
RANKER = "GNNRanker"

# Keyword arguments of @serve.deployment, in the form serve_config.yaml writes them (plus
# CODE_ONLY below).
DEPLOYMENTS: dict[str, dict[str, Any]] = {
    INGRESS: {
        "max_ongoing_requests": 128,
        "max_queued_requests": INGRESS_MAX_QUEUED,
        "backpressure_config": BACKPRESSURE,
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32,
            "upscale_delay_s": 10, "downscale_delay_s": 300,
        },
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "ray_actor_options": {"num_cpus": 0.25},
    },
    ENRICHER: {
        "max_ongoing_requests": 128,
        "max_queued_requests": ENRICHER_MAX_QUEUED,
        "backpressure_config": BACKPRESSURE,
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32,
            "upscale_delay_s": 10, "downscale_delay_s": 300,
        },
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "ray_actor_options": {"num_cpus": 0.1},
    },
    RANKER: {
        "max_ongoing_requests": 64,
        "max_queued_requests": RANKER_MAX_QUEUED,
        "backpressure_config": BACKPRESSURE,
        "graceful_shutdown_timeout_s": 30,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        # Ongoing *calls*, not recommendations: each ingress keeps ranker_calls_in_flight (2)
        # calls out while they keep up and sends every further full batch of ranker_batch_size
        # (8) recommendations as one more call (serve_app.AppArgs), so calls grow with the load,
        # about one per 8 recommendations waiting. Above 3 per replica: more than the 2 calls one
        # ingress keeps out and a full batch waiting (a call carries at least one request, so
        # with several ingress replicas it scales out no later than the 8 requests before).
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3,
            "upscale_delay_s": 10, "downscale_delay_s": 300,
        },
        "ray_actor_options": {"num_cpus": 0.5},
    },
}


# Options the Serve config file cannot set (its DeploymentSchema has no such field): decorator only.
CODE_ONLY: dict[str, dict[str, Any]] = {
    RANKER: {"max_constructor_retry_count": 3},
}


def options(name: str) -> dict[str, Any]:
    """``@serve.deployment`` keyword arguments of deployment ``name`` (a fresh copy)."""
    return copy.deepcopy({**DEPLOYMENTS[name], **CODE_ONLY.get(name, {})})


def inline_ranker_options() -> dict[str, Any]:
    """``.options(...)`` of the Ingress when it ranks in its own process (``inline_ranker``):
    the ranker's CPU reservation added to its own, and the ranker's graceful shutdown and
    constructor retries (a replica that loads a model)."""
    ingress, ranker = options(INGRESS), options(RANKER)
    return {
        "ray_actor_options": {"num_cpus": ingress["ray_actor_options"]["num_cpus"]
                              + ranker["ray_actor_options"]["num_cpus"]},
        "graceful_shutdown_timeout_s": ranker["graceful_shutdown_timeout_s"],
        "max_constructor_retry_count": ranker["max_constructor_retry_count"],
    }


def config_entries() -> list[dict[str, Any]]:
    """The ``deployments`` list of ``serve_config.yaml`` (each entry: ``name`` + options)."""
    return [{"name": name, **copy.deepcopy(opts)} for name, opts in DEPLOYMENTS.items()]


SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"
_BLOCK_START = "    deployments:\n"
_BLOCK_HEADER = (
    "      # Generated from actors/deployment_options.py, which explains each value (one machine\n"
    "      # or a cluster): edit it there, then `python -m actors.deployment_options --write`.\n"
    "      # Bounded queues: beyond max_ongoing_requests + max_queued_requests a request gets a 503\n"
    "      # with Retry-After at once (never an unbounded queue or a hang).\n"
)


def deployments_block() -> str:
    """The YAML text of the generated ``deployments`` block, as it ends ``serve_config.yaml``."""
    body = yaml.safe_dump(config_entries(), sort_keys=False, default_flow_style=False)
    return _BLOCK_START + _BLOCK_HEADER + "".join(
        f"      {line}\n" for line in body.splitlines())


def with_block(text: str) -> str:
    """``serve_config.yaml``'s text with its (last) ``deployments`` block regenerated.

    Raises:
        ValueError: The text has no ``deployments:`` line at the application's indentation.
    """
    at = text.rfind(_BLOCK_START)
    if at < 0:
        raise ValueError(f"no {_BLOCK_START.strip()!r} line (4 spaces in) under the application "
                         "in serve_config.yaml: add one as the file's last key")
    return text[:at] + deployments_block()


def differences(config: dict[str, Any]) -> list[str]:
    """How the ``deployments`` of a parsed Serve config differ from :data:`DEPLOYMENTS`."""
    errors: list[str] = []
    for n, app in enumerate(config.get("applications", [])):
        given = {d.get("name"): d for d in app.get("deployments", [])}
        for entry in config_entries():
            name = entry["name"]
            have = given.get(name)
            if have is None:
                errors.append(f"applications[{n}].deployments: {name} is missing")
                continue
            for key in sorted(set(entry) | set(have)):
                if have.get(key) != entry.get(key):
                    errors.append(f"applications[{n}].deployments[{name}].{key}: "
                                  f"{have.get(key)!r} in the file, {entry.get(key)!r} in "
                                  f"actors/deployment_options.py")
    return errors


def main(argv: list[str] | None = None) -> int:
    """``--write`` regenerates the block; ``--check`` reports differences (exit status 1)."""
    p = argparse.ArgumentParser(prog="python -m actors.deployment_options",
                                description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=SERVE_CONFIG, help="the Serve config file")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite its deployments block")
    mode.add_argument("--check", action="store_true", help="exit 1 if it differs")
    args = p.parse_args(argv)
    text = args.config.read_text()
    if args.write:
        args.config.write_text(with_block(text))
        print(f"wrote the deployments block of {args.config}")
        return 0
    errors = differences(yaml.safe_load(text))
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        print(f"fix: python -m actors.deployment_options --write --config {args.config}",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
