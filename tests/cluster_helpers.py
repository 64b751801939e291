"""A private ``ray start --head`` cluster for one test, torn down by killing only its processes.

Tests that need what only ``ray start`` gives (the autoscaler with fake nodes, the dashboard's job
API for ``ray job submit``) start their own head with :func:`ray_start_head`. Isolation:

- its own temp dir and free ports (nothing on 6379/8265/10001/52365), so it can run next to the
  session's ``ray.init`` cluster and next to other people's clusters on the same machine;
- ``ray start`` is launched in a new session (``start_new_session``): the GCS, raylet, dashboard
  and every worker inherit that session id, so teardown can find exactly them;
- teardown kills that session's processes *and their descendants* (``ray job`` drivers run in a
  session of their own, started by the job supervisor), never ``ray stop``, which would kill every
  Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.helpers import wait_for_condition

RAY_CLI = Path(sys.executable).with_name("ray")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env(**extra: str) -> dict[str, str]:
    """Environment for a private cluster's processes and its clients.

    No ``RAY_ADDRESS`` (it would point a client at some other cluster), usage stats off, auth off,
    and this interpreter's ``bin/`` first on ``PATH`` so ``python`` and ``ray`` inside the cluster
    (job entrypoints, workers) are the venv's.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.update(extra)
    return env


def _proc_table() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (ppid, session id, state, start time) for every process we can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[0], int(fields[19]))
    return table


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid``."""
    return [pid for pid, (_, session, state, _) in _proc_table().items() if session == sid and state != "Z"]


class _Tracker:
    """The processes of session ``sid`` and all their descendants, remembered across snapshots.

    A process whose parent was killed is re-parented (to PID 1 or a subreaper) and would drop out
    of a fresh descendant walk, so every process once seen stays tracked, identified by
    (pid, start time) so a recycled pid is never mistaken for it.
    """

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.known: dict[int, int] = {}  # pid -> start time

    def alive(self) -> list[int]:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [pid for pid, (_, session, _s, _t) in table.items() if session == self.sid]
        todo += [pid for pid, start in self.known.items() if pid in table and table[pid][3] == start]
        seen: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in seen or pid not in table:
                continue
            seen.add(pid)
            self.known[pid] = table[pid][3]
            todo.extend(children.get(pid, []))
        return sorted(pid for pid in seen if table[pid][2] != "Z")


def kill_session(sid: int, what: str = "private Ray cluster") -> None:
    """Kill the processes of session ``sid`` and their descendants: SIGTERM, then SIGKILL.

    Raises:
        AssertionError: if any of them survives SIGKILL.
    """
    tracker = _Tracker(sid)
    # SIGTERM lets raylets clean up their sockets; whatever is still there 5 s later is killed.
    for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
        for pid in tracker.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        try:
            wait_for_condition(lambda: not tracker.alive(), timeout=grace_s, what=f"{what} gone")
            return
        except TimeoutError:
            continue
    raise AssertionError(f"processes of {what} (session {sid}) survived SIGKILL: {tracker.alive()}")


@contextlib.contextmanager
def ray_start_head(
    args: Sequence[str],
    *,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 120,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``ray start --head <args>`` in a new session; on exit kill exactly that cluster.

    ``args`` must carry the isolation flags (``--temp-dir`` under ``workdir``, explicit ports);
    the ``ray start`` output goes to ``workdir/ray_start.log`` and is shown if it fails.
    """
    log_path = workdir / "ray_start.log"
    cmd = [str(RAY_CLI), "start", "--head", *args, "--disable-usage-stats"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, env=dict(env) if env is not None else ray_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=cwd,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
            assert rc == 0, f"ray start failed (rc={rc}):\n{log_path.read_text()[-4000:]}"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            kill_session(proc.pid, what=f"ray start in {workdir}")
