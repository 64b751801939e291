"""Where a Serve replica's CPU goes under load: the ranker's own code, or Serve, gRPC and Ray.

Runs ``bench/serve_bench.py`` (recommendations, closed loop at concurrency 8 or
``--concurrency``, the shipped cluster flags, no bound; ``--inline-ranker`` for the ranker in the
ingress) in the background and attaches ``py-spy record --native`` to one
replica of each deployment in turn. Every sample of a thread that is not waiting (futex,
epoll, ``Condition.wait``...) is put in the class of the innermost frame that has one (numpy
under the ranking counts as the ranking, Ray's actor-call submission under the ingress's code as
Ray):

- **user code**: this project's ``graph/``, ``actors/`` and ``serve_app.py``;
- **Serve / HTTP (Python)**: Serve's replica and router code, uvicorn, Starlette, FastAPI;
- **gRPC (native)**: grpc's Cython core (Serve's replica-to-replica calls when
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``);
- **Ray core worker**: ``_raylet`` (actor-call submission, the core worker's event loops) and
  ``ray._private``;
- **other**.

Prints a table and writes ``bench/results/replica_profile.json``; ``--svg DIR`` also records a
flame graph of each replica (a second pass of the same length, so the bench runs longer)::

    python bench/replica_profile.py --artifacts /path/to/artifacts --svg docs

Native sampling stops the process at every sample: at 50 Hz it lags and slows the replica a
little, so read the shares, not the absolute rates. Needs ``py-spy`` (in the dev extras) and
permission to ptrace the replicas (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
APP = "intentrec-bench"  # bench/serve_bench.py's app name
DEPLOYMENTS = ("GNNRanker", "Ingress", "ContextEnricher")
WAITS = ("epoll_wait", "epoll_pwait", "pthread_cond_wait", "pthread_cond_timedwait",
         "Condition.wait", "Event.wait", "sem_timedwait", "clock_nanosleep", "nanosleep",
         "futex", "PyThread_acquire_lock_timed", "poll (libc", "select (libc", "time.sleep")
CLASSES = ("user code", "Serve / HTTP (Python)", "gRPC (native)", "Ray core worker", "other")


MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("user code", ("graph/", "actors/", "serve_app.py")),
    ("Serve / HTTP (Python)", ("serve/_private", "fastapi", "starlette", "uvicorn")),
    ("gRPC (native)", ("grpc",)),
    ("Ray core worker", ("_raylet", "ray/_private", "ray/actor", "ray/util")),
)


def classify(frames: list[str]) -> str:
    """The class of one active stack: that of its innermost frame that has one (numpy under
    the ranking is the ranking; Ray's actor-call submission under the ingress code is Ray)."""
    for frame in reversed(frames):
        for name, marks in MARKERS:
            if any(m in frame for m in marks):
                return name
    return "other"


def _waiting(leaf: str, frames: list[str]) -> bool:
    # glibc's futex wait has no symbol in a stripped libc: an address right under a Python
    # lock acquire or a condition wait is that wait.
    if any(w in leaf for w in WAITS):
        return True
    return leaf.startswith("0x") and any(w in f for f in frames[-4:] for w in WAITS)


def summarize(raw: str) -> dict[str, object]:
    """Shares of the active samples of a ``py-spy -f raw`` profile by class."""
    total = waiting = 0
    by_class: Counter[str] = Counter()
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        if _waiting(frames[-1], frames):
            waiting += n
            continue
        by_class[classify(frames)] += n
    active = max(total - waiting, 1)
    return {"samples": total, "waiting": waiting, "active": total - waiting,
            "share": {c: by_class[c] / active for c in CLASSES}}


def replica_pid(bench_pid: int, name: str) -> int | None:
    """The pid of a ``name`` replica started by the bench process ``bench_pid`` (its Ray
    cluster's processes descend from it, so another cluster's replicas are never picked)."""
    import psutil

    for child in psutil.Process(bench_pid).children(recursive=True):
        try:
            if f"ServeReplica:{APP}:{name}" in " ".join(child.cmdline()):
                return int(child.pid)
        except psutil.Error:  # exited meanwhile
            continue
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    p.add_argument("--deployments", default="GNNRanker,Ingress",
                   help=f"comma-separated, of {', '.join(DEPLOYMENTS)}")
    p.add_argument("--seconds", type=int, default=20, help="sampled seconds per replica")
    p.add_argument("--rate", type=int, default=50, help="samples per second")
    p.add_argument("--svg", help="also write <DIR>/serve_<deployment>_flamegraph.svg")
    p.add_argument("--concurrency", type=int, default=8, help="the closed loop's concurrency")
    p.add_argument("--inline-ranker", action="store_true",
                   help="AppArgs.inline_ranker: the ranker in the ingress (profile Ingress)")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "replica_profile.json"))
    args = p.parse_args()
    names = [n.strip() for n in args.deployments.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DEPLOYMENTS))
    if unknown:
        p.error(f"--deployments: unknown {unknown}; choose from {list(DEPLOYMENTS)}")
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        p.error("py-spy is not installed: pip install py-spy (it is in the dev extras)")
    passes = len(names) * (2 if args.svg else 1)
    tmp = Path(tempfile.mkdtemp(prefix="replica-profile-"))
    log = tmp / "serve_bench.log"
    bench = ["--artifacts", args.artifacts, "--endpoints", "recommendations",
             "--concurrency", str(args.concurrency), "--warmup", "3",
             "--duration", str(passes * (args.seconds + 5) + 20), "--no-bound",
             "--open-fractions", "", "--output", str(tmp / "serve_bench.json"),
             *(["--inline-ranker"] if args.inline_ranker else [])]
    results: dict[str, object] = {}
    from bench.serve_bench import in_background, wait_for_log

    with in_background(bench, log) as proc:
        wait_for_log(log, "seeding sessions", proc, 600)
        time.sleep(10)  # warm-up, and the load generator reaching its concurrency
        for name in names:
            pid = replica_pid(proc.pid, name)
            if pid is None:
                raise SystemExit(f"no {name} replica of the app {APP} is running; see {log}")
            raw = tmp / f"{name}.txt"
            print(f"profiling {name} (pid {pid}) for {args.seconds} s", flush=True)
            subprocess.run([spy, "record", "--native", "-r", str(args.rate), "-d",
                            str(args.seconds), "-p", str(pid), "-f", "raw", "-o", str(raw)],
                           check=True, capture_output=True)
            results[name] = summarize(raw.read_text())
            if args.svg:
                svg = Path(args.svg) / f"serve_{name.lower()}_flamegraph.svg"
                subprocess.run([spy, "record", "--native", "-r", str(args.rate), "-d",
                                str(args.seconds), "-p", str(pid), "-o", str(svg)],
                               check=True, capture_output=True)
                print(f"wrote {svg}", flush=True)
        print("waiting for the bench's measured cell to end (its CPU per request by process)",
              flush=True)
        proc.wait(timeout=600)
    cpu = re.search(r"cpu ms/req by process: (.*)", log.read_text())
    print(f"\n{'share of active samples':<24}" + "".join(f"{n:>12}" for n in names))
    for c in CLASSES:
        print(f"{c:<24}" + "".join(
            f"{100 * results[n]['share'][c]:>11.1f}%" for n in names))  # type: ignore[index]
    print(f"{'active / all samples':<24}" + "".join(
        f"{results[n]['active']:>6}/{results[n]['samples']:<5}" for n in names))  # type: ignore[index]
    if cpu:
        print(f"server CPU ms per recommendation by process (the bench's own count): {cpu[1]}")
    out = {"artifacts": args.artifacts, "rate_hz": args.rate, "seconds": args.seconds,
           "replicas": results, "cpu_ms_per_req_by_process": cpu[1] if cpu else None}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
