"""The README's two commands exist as written, and the demo behind ``make demo`` works.

The README opens with ``make demo`` and ``make test``; both targets exist in the Makefile and run
what the README says they run; CI (``.ci/run``) runs ``make test`` itself. The demo script is then
run end to end on a small slice: it trains, serves, posts a session and must show the
recommendations change.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.cluster_helpers import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
DEMO = REPO_ROOT / "scripts" / "demo.py"
DEMO_TIMEOUT_S = 600


def _first_code_block(text: str) -> list[str]:
    """Command lines (comments stripped) of the README's first fenced code block."""
    match = re.search(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)
    assert match, "README.md has no code block"
    lines = [ln.split("#", 1)[0].strip() for ln in match.group(1).splitlines()]
    return [ln for ln in lines if ln]


def _recipe(target: str) -> str:
    """What ``make <target>`` would run (``make -n``), without running it."""
    out = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"make -n {target} failed: {out.stderr}"
    return out.stdout


def test_readme_opens_with_make_demo_and_make_test() -> None:
    text = README.read_text()
    before_first_block = text[: text.index("```")]
    assert not re.search(r"^#{2,} ", before_first_block, flags=re.M), (
        "the two commands must come before any section"
    )
    assert _first_code_block(text) == ["make demo", "make test"]


@pytest.mark.skipif(not any((Path(p) / "make").exists() for p in os.get_exec_path()), reason="no make")
def test_makefile_targets_run_what_the_readme_says() -> None:
    demo = _recipe("demo")
    assert "scripts/setup.sh" in demo and "python scripts/demo.py" in demo, demo
    test = _recipe("test")
    assert "scripts/setup.sh" in test and "python -m pytest" in test, test
    assert (REPO_ROOT / "scripts" / "setup.sh").is_file()
    assert DEMO.is_file()


@pytest.mark.parametrize("doc", ["README.md", "docs/PERFORMANCE.md", "docs/DEPLOY.md", "docs/EXPERIMENTS.md"])
def test_docs_have_no_unfilled_placeholders(doc: str) -> None:
    """A number still to be measured must not ship as a placeholder: an ALL_CAPS_NAME outside
    code (names of real settings are written as code), or TODO/TBD."""
    text = (REPO_ROOT / doc).read_text()
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
    bad = re.findall(r"\b[A-Z]{2,}(?:_[A-Z0-9]+)+\b|\bTODO\b|\bTBD\b", prose)
    assert not bad, bad


def test_ci_runs_make_test() -> None:
    ci = REPO_ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), f"{ci} is not executable"
    lines = [ln.strip() for ln in ci.read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    assert "make test" in commands, commands


def _rows(block: str) -> list[tuple[bool, str]]:
    """(marked new, title) per row of one printed list: ``  <rank>  [*]  <score>  <title>  <reason>``."""
    rows = re.findall(r"^\s+(\d+)\s+(\*?)\s+(-?\d+\.\d+)\s+(.+?)(?:\s{2,}|$)", block, flags=re.M)
    return [(new == "*", title) for _rank, new, _score, title in rows]


def test_demo_shows_recommendations_change_after_session_events(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [
        sys.executable, str(DEMO), "--max-users", "300", "--epochs", "2",
        "--port", str(port), "--output", str(tmp_path / "artifacts"),
    ]  # fmt: skip
    scratch_before = set(Path(tempfile.gettempdir()).glob("intentrec-demo-*"))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    out = proc.stdout
    log = f"--- stdout\n{out[-6000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log

    assert "\nBEFORE" in out and "\nAFTER" in out, log
    before_part, after_part = out.split("\nBEFORE", 1)[1].split("\nAFTER", 1)
    before, after = _rows(before_part.split("\n==>", 1)[0]), _rows(after_part.split("\n\n", 1)[0])
    assert before and after, log
    assert not any(new for new, _title in before), "BEFORE has nothing to compare with"
    new_after = sum(new for new, _title in after)
    assert new_after > 0 and before != after, f"the recommendations did not change:\n{log}"
    changed = re.search(r"(\d+) of (\d+) recommendations changed", out)
    assert changed and int(changed.group(1)) == new_after, log
    # The demo trained and published into the folder it was given, not into the checkout.
    assert (tmp_path / "artifacts" / "LATEST").is_file()
    # ...and removed its scratch (Ray Train's checkpoints, the WAL: 150 MB a run) when it ended.
    left = set(Path(tempfile.gettempdir()).glob("intentrec-demo-*")) - scratch_before
    assert not left, f"the demo left its scratch folder behind: {sorted(left)}"
