"""What a model version was trained on: the CPU and the numeric libraries' releases.

The job is bit-for-bit reproducible on one machine (``tests/smoke/test_train_job.py``), not across
machines: BLAS, faiss and torch pick their kernels by CPU, so another CPU can round a score in
its last bit, break a near-tie between two candidates the other way and, through LightGBM's
early stopping on a flat validation curve, end with a different number of trees. The manifest
names the machine so that two runs that differ can be told apart.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any

# The releases that decide how the job's numbers round (and Ray, which schedules the work).
PACKAGES = ("torch", "torch-geometric", "numpy", "scipy", "lightgbm", "faiss-cpu", "numba", "ray")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as the kernel reports it; else what ``platform`` knows."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The vector extensions that BLAS, faiss and torch dispatch on (a virtual machine's model name is
# often just "AMD EPYC"; these tell an AVX2 host from an AVX-512 one).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "amx_tile", "asimd", "sve")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Which of :data:`ISA_FLAGS` the CPU reports (``flags`` on x86, ``Features`` on Arm)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in have]
    except OSError:
        pass
    return []


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Each installed distribution's release; ``None`` for one that is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_facts(packages: Iterable[str] = PACKAGES) -> dict[str, Any]:
    """The CPU, its vector extensions and logical core count, the OS and the releases of
    ``packages`` (default :data:`PACKAGES`)."""
    return {"cpu": cpu_model(), "isa": cpu_flags(), "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(), "packages": package_versions(packages)}
