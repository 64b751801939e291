"""actors.affinity: which core a replica takes, the node registry, and the pinning itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actors.affinity import _live_claims, choose_core, choose_cores, pin_to_core

REPO = Path(__file__).resolve().parents[2]
LINUX_TWO_CORES = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def test_the_least_loaded_core_is_chosen() -> None:
    assert choose_core([0, 1], []) == 0
    assert choose_core([0, 1], [(0, 0.5)]) == 1
    # The ranker (0.5) on 0 and the ingress (0.25) on 1: the next replica goes to 1.
    assert choose_core([0, 1], [(0, 0.5), (1, 0.25)]) == 1
    assert choose_core([0, 1], [(0, 0.5), (1, 0.25), (1, 0.5)]) == 0
    # Equal weight: the core with fewer replicas, then the lower number.
    assert choose_core([0, 1, 2], [(0, 0.5), (1, 0.25), (1, 0.25)]) == 2
    assert choose_core([0, 1], [(0, 0.5), (1, 0.25), (1, 0.25)]) == 0
    # Claims on cores this process may not use are ignored.
    assert choose_core([2, 3], [(0, 1.0), (3, 0.1)]) == 2
    with pytest.raises(ValueError):
        choose_core([], [])


def test_a_reservation_above_one_cpu_gets_as_many_cores() -> None:
    assert choose_cores([0, 1, 2, 3], [], 0.5) == [0]
    assert choose_cores([0, 1, 2, 3], [], 1.0) == [0]
    assert choose_cores([0, 1, 2, 3], [(0, 0.5)], 2.0) == [1, 2]
    assert choose_cores([0, 1, 2, 3], [(0, 0.5)], 1.5) == [1, 2]
    assert choose_cores([0, 1], [], 8.0) == [0, 1]  # never more than there are
    # Each core taken counts its share before the next is chosen: 2 CPUs on two cores, each
    # with 1.0, so a 0.25 replica then takes a free core.
    taken = choose_cores([0, 1, 2], [], 2.0)
    assert choose_core([0, 1, 2], [(c, 1.0) for c in taken]) == 2


def test_claims_of_exited_processes_are_dropped(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    (tmp_path / str(dead_pid)).write_text("0 0.5\n")
    (tmp_path / "1").write_text("1,2 0.5\n")  # pid 1 is always alive; two cores, 0.25 each
    (tmp_path / str(os.getpid())).write_text("0 1.0\n")  # this process re-pinning: replaced
    (tmp_path / ".lock").write_text("")
    assert _live_claims(tmp_path) == [(1, 0.25), (2, 0.25)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "1"]


@pytest.mark.skipif(not LINUX_TWO_CORES, reason="needs Linux and two usable cores")
def test_two_processes_get_different_cores_and_every_thread_follows(tmp_path: Path) -> None:
    """Each child starts a thread, pins itself, starts another, and reports the core it got
    and the affinity of every thread it has; the two take different cores while both live."""
    child = textwrap.dedent(f"""
        import json, os, sys, threading, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from actors.affinity import pin_to_core
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()   # started before pinning
        core = pin_to_core(float(sys.argv[1]), "test replica", Path(sys.argv[2]))
        threading.Thread(target=stop.wait, daemon=True).start()   # and after
        masks = sorted({{tuple(sorted(os.sched_getaffinity(int(t))))
                         for t in os.listdir("/proc/self/task")}})
        print(json.dumps({{"core": core, "masks": masks}}), flush=True)
        sys.stdin.readline()  # stay alive (the claim with it) until the test says
    """)
    procs: list[subprocess.Popen[str]] = []
    reports = []
    try:
        for weight in ("0.5", "0.25"):
            p = subprocess.Popen([sys.executable, "-c", child, weight, str(tmp_path)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None
            reports.append(json.loads(p.stdout.readline()))
        first, second = reports
        cores = sorted(os.sched_getaffinity(0))
        assert first["core"] == [cores[0]] and second["core"] == [cores[1]]
        assert first["masks"] == [[cores[0]]]  # every thread, the later one included
        assert second["masks"] == [[cores[1]]]
        claims = {p.name: p.read_text().split() for p in tmp_path.iterdir() if p.name != ".lock"}
        assert claims == {str(procs[0].pid): [str(cores[0]), "0.5"],
                          str(procs[1].pid): [str(cores[1]), "0.25"]}
    finally:
        for p in procs:
            p.communicate("\n", timeout=30)


def test_one_usable_core_is_left_alone(tmp_path: Path) -> None:
    if not hasattr(os, "sched_setaffinity"):
        assert pin_to_core(1.0, "test", tmp_path) is None
        return
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        os.sched_setaffinity(0, {{sorted(os.sched_getaffinity(0))[0]}})
        from actors.affinity import pin_to_core
        print(pin_to_core(1.0, "test", Path(sys.argv[1])))
    """)
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "None"
    assert not [p for p in tmp_path.iterdir() if p.name.isdigit()]  # nothing claimed


def test_an_unwritable_registry_leaves_the_process_unpinned(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # mkdir of a path below a file fails
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    assert pin_to_core(1.0, "test", blocker / "registry") is None
    if before is not None:
        assert os.sched_getaffinity(0) == before
