"""Print ``cluster.yaml`` for another cloud: a provider overlay from ``deploy/overlays/`` applied.

::

    python scripts/cluster_overlay.py deploy/overlays/gcp.yaml > cluster-gcp.yaml
    ray up -y cluster-gcp.yaml

Only the provider-specific parts change: ``provider``, ``auth``, ``head_setup_commands`` (the
autoscaler's cloud SDK), each node type's ``node_config``, and the storage location
(``intentrec_storage``: the ``INTENTREC_STORAGE`` line every node writes first, docs/DEPLOY.md
"Shared storage"). Node types, resources, images, setup and start commands stay as they are.
The output has no comments; ``cluster.yaml`` explains each block.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OVERLAY_KEYS = {"intentrec_storage", "provider", "auth", "head_setup_commands",
                "available_node_types"}
# The storage line of cluster.yaml's start commands (head and workers).
STORAGE_LINE = re.compile(r'^echo "INTENTREC_STORAGE=(?P<uri>[^"]+)" > ~/intentrec-storage\.env$')


def storage_of(commands: list[str]) -> str | None:
    """The storage URI a start-command list writes (its ``INTENTREC_STORAGE`` line), or None."""
    for cmd in commands:
        m = STORAGE_LINE.match(cmd.strip())
        if m:
            return m["uri"]
    return None


def apply_overlay(cluster: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``cluster`` with ``overlay``'s provider-specific blocks in place of its own.

    Raises:
        ValueError: an unknown overlay key, a node type ``cluster`` does not have, or a
            ``cluster`` without the storage line in both start-command lists.
    """
    unknown = set(overlay) - OVERLAY_KEYS
    if unknown:
        raise ValueError(f"unknown overlay keys {sorted(unknown)}: an overlay may set only "
                         f"{sorted(OVERLAY_KEYS)}")
    out = copy.deepcopy(cluster)
    for key in ("provider", "auth", "head_setup_commands"):
        if key in overlay:
            out[key] = copy.deepcopy(overlay[key])
    for name, node_type in overlay.get("available_node_types", {}).items():
        if name not in out["available_node_types"]:
            raise ValueError(f"available_node_types.{name}: not a node type of cluster.yaml "
                             f"({sorted(out['available_node_types'])})")
        out["available_node_types"][name]["node_config"] = copy.deepcopy(node_type["node_config"])
    if "intentrec_storage" in overlay:
        line = f'echo "INTENTREC_STORAGE={overlay["intentrec_storage"]}" > ~/intentrec-storage.env'
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            if storage_of(out[key]) is None:
                raise ValueError(f"{key}: no INTENTREC_STORAGE line to replace in cluster.yaml")
            out[key] = [line if STORAGE_LINE.match(c.strip()) else c for c in out[key]]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="scripts/cluster_overlay.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("overlay", type=Path, help="e.g. deploy/overlays/gcp.yaml")
    p.add_argument("--cluster", type=Path, default=REPO / "cluster.yaml")
    args = p.parse_args(argv)
    merged = apply_overlay(yaml.safe_load(args.cluster.read_text()),
                           yaml.safe_load(args.overlay.read_text()))
    sys.stdout.write(yaml.safe_dump(merged, sort_keys=False, width=100))


if __name__ == "__main__":
    main()
