"""constraints.txt, which `make setup` installs with, agrees with pyproject.toml.

A pin outside a dependency's range in pyproject.toml would make `pip install -e .[dev] -c
constraints.txt` fail on every fresh machine; a torch pin would fight the CUDA or CPU build that
scripts/install_torch.sh puts in first.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for n, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert m, f"constraints.txt line {n}: {line!r} is not 'name==version'"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(m.group(2))
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_direct_dependency_is_pinned_inside_its_range() -> None:
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} (pyproject.toml) has no pin in constraints.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}: "
            "run `make lock` or widen the range")


def test_torch_and_cuda_packages_are_left_to_install_torch() -> None:
    pins = _pins()
    assert "torch" not in pins, "torch must not be pinned here: scripts/install_torch.sh installs it"
    assert not [p for p in pins if p.startswith("nvidia-") or p == "triton"], (
        "CUDA packages in constraints.txt would pull GPU wheels into a CPU install")


def test_setup_installs_with_the_constraints() -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup
    assert "scripts/install_torch.sh" in setup
