"""Where the Serve app's CPU goes by thread, idle and under a closed-loop load.

Runs ``bench/serve_bench.py`` (recommendations, no bound, the shipped cluster flags) in the
background and reads ``/proc/<pid>/task/<tid>/`` of every replica, session shard and HAProxy
process of its Ray cluster twice per window: once while the cluster is idle (after seeding,
during the bench's ``--idle`` measurement) and once in the middle of the measured cell. For each
process and thread name it reports CPU (user + system) and context switches (voluntary and
involuntary), per second when idle and per request under load; the request rate is the
bench's own throughput for the cell. Threads of one name are summed (``event_engine`` is gRPC's
pool, ``ray::IDLE`` the replica's event loop that runs the app's code, ``ray::ServeReplica`` the
core worker's main thread).

    python bench/serve_threads.py --artifacts /path/to/artifacts --concurrency 1

``--pin`` first sets the CPU affinity of every thread of the ingress replica to the first core
and of the ranker replica to the second (``sched_setaffinity``), so that the two never share or
swap cores; the A/B of ``docs/PERFORMANCE.md`` alternates runs with and without it. Linux only;
the bench needs its usual two free cores.

Prints a table and writes ``bench/results/serve_threads.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
APP = "intentrec-bench"  # bench/serve_bench.py's app name
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _role(cmdline: list[str]) -> str | None:
    """The process's role in the app (``Ingress``, ``GNNRanker``, ``ContextEnricher``,
    ``SessionShard``, ``haproxy``), or None for the cluster's own processes."""
    title = " ".join(cmdline)
    m = re.search(rf"ServeReplica:{APP}:(\w+)", title)
    if m:
        return m.group(1)
    if title.startswith("ray::SessionShard"):
        return "SessionShard"
    if cmdline and Path(cmdline[0]).name == "haproxy":
        return "haproxy"
    return None


def app_processes(bench_pid: int) -> dict[int, str]:
    """pid -> role of the app's processes started by the bench process ``bench_pid``."""
    import psutil

    out = {}
    for child in psutil.Process(bench_pid).children(recursive=True):
        try:
            role = _role(child.cmdline())
        except psutil.Error:
            continue
        if role is not None:
            out[child.pid] = role
    return out


def thread_counters(pid: int) -> dict[int, tuple[str, float, int]]:
    """tid -> (thread name, CPU seconds, context switches) of one process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            name = Path(f"{base}/comm").read_text().strip()
            fields = Path(f"{base}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) * TICK_S  # utime + stime
            status = Path(f"{base}/status").read_text().splitlines()
            switches = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
        except (OSError, IndexError, ValueError):  # the thread exited meanwhile
            continue
        out[int(tid)] = (name, cpu, switches)
    return out


def window(procs: dict[int, str], seconds: float) -> dict[str, dict[str, list[float]]]:
    """CPU seconds and context switches per (process role, thread name) over ``seconds``.
    Returns role -> thread name -> [cpu_s, switches] (several processes of a role summed)."""
    before = {pid: thread_counters(pid) for pid in procs}
    time.sleep(seconds)
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for pid, role in procs.items():
        try:
            after = thread_counters(pid)
        except OSError:
            continue
        for tid, (name, cpu, sw) in after.items():
            if tid in before[pid]:
                acc = out[role][name]
                acc[0] += cpu - before[pid][tid][1]
                acc[1] += sw - before[pid][tid][2]
    return {r: dict(t) for r, t in out.items()}


def pin(procs: dict[int, str]) -> dict[str, int]:
    """Every thread of the ingress on the first allowed core, of the ranker on the second."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--pin needs two cores")
    where = {"Ingress": cores[0], "GNNRanker": cores[1]}
    for pid, role in procs.items():
        if role in where:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), {where[role]})
                except OSError:  # exited meanwhile
                    continue
    return where


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    p.add_argument("--concurrency", type=int, default=1, help="closed-loop concurrency")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each window")
    p.add_argument("--pin", action="store_true",
                   help="pin the ingress replica to one core and the ranker replica to another")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "serve_threads.json"))
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="serve-threads-"))
    log, result = tmp / "serve_bench.log", tmp / "serve_bench.json"
    warmup, idle = 5.0, args.seconds + 8.0
    duration = args.seconds + 10.0
    bench = ["--artifacts", args.artifacts, "--endpoints", "recommendations",
             "--concurrency", str(args.concurrency), "--warmup", str(warmup),
             "--duration", str(duration), "--idle", str(idle), "--no-bound",
             "--open-fractions", "", "--output", str(result)]
    from bench.serve_bench import in_background, wait_for_log

    with in_background(bench, log) as proc:
        wait_for_log(log, "seeding sessions", proc, 600)
        procs = app_processes(proc.pid)
        pinned = pin(procs) if args.pin else {}
        time.sleep(4.0)  # seeding done; the bench measures its idle cluster next
        print(f"idle window: {args.seconds:.0f} s over {len(procs)} processes", flush=True)
        idle_w = window(procs, args.seconds)
        wait_for_log(log, "idle Serve cluster", proc, 120)
        time.sleep(warmup + 3.0)
        print(f"load window: {args.seconds:.0f} s at concurrency {args.concurrency}", flush=True)
        load_w = window(procs, args.seconds)
        proc.wait(timeout=600)
    row = json.loads(result.read_text())["rows"][0]
    rate = float(row["throughput"])
    requests = rate * args.seconds
    rows: list[dict[str, Any]] = []
    for role in sorted(set(idle_w) | set(load_w)):
        names = set(idle_w.get(role, {})) | set(load_w.get(role, {}))
        for name in sorted(names, key=lambda n: -load_w.get(role, {}).get(n, [0.0, 0.0])[0]):
            i = idle_w.get(role, {}).get(name, [0.0, 0.0])
            ld = load_w.get(role, {}).get(name, [0.0, 0.0])
            rows.append({"process": role, "thread": name,
                         "idle_cpu_ms_per_s": 1e3 * i[0] / args.seconds,
                         "idle_switches_per_s": i[1] / args.seconds,
                         "load_cpu_ms_per_req": 1e3 * ld[0] / requests,
                         "load_switches_per_req": ld[1] / requests})
    print(f"\nconcurrency {args.concurrency}: {rate:.1f} req/s; the bench's CPU per recommendation "
          f"{row['server_cpu_ms_per_req']:.2f} ms" + (f"; pinned {pinned}" if pinned else ""))
    print(f"{'process':<16}{'thread':<22}{'idle ms/s':>10}{'idle sw/s':>10}"
          f"{'load ms/req':>12}{'load sw/req':>12}")
    for r in rows:
        if r["idle_cpu_ms_per_s"] + r["load_cpu_ms_per_req"] < 0.005 and r["load_switches_per_req"] < 0.5:
            continue
        print(f"{r['process']:<16}{r['thread']:<22}{r['idle_cpu_ms_per_s']:>10.2f}"
              f"{r['idle_switches_per_s']:>10.0f}{r['load_cpu_ms_per_req']:>12.3f}"
              f"{r['load_switches_per_req']:>12.1f}")
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for r in rows:
        t = totals[r["process"]]
        t[0] += r["idle_cpu_ms_per_s"]
        t[1] += r["idle_switches_per_s"]
        t[2] += r["load_cpu_ms_per_req"]
        t[3] += r["load_switches_per_req"]
    print("\nby process")
    for role, t in sorted(totals.items(), key=lambda kv: -kv[1][2]):
        print(f"{role:<16}{'(all threads)':<22}{t[0]:>10.2f}{t[1]:>10.0f}{t[2]:>12.3f}{t[3]:>12.1f}")
    out = {"command": "python bench/serve_threads.py " + " ".join(argv or sys.argv[1:]),
           "concurrency": args.concurrency, "window_s": args.seconds, "pinned": pinned,
           "throughput": rate, "server_cpu_ms_per_req": row["server_cpu_ms_per_req"],
           "cpu_ms_per_req_by_process": row.get("cpu_ms_per_req_by_process"),
           "threads": rows,
           "by_process": {k: dict(zip(("idle_cpu_ms_per_s", "idle_switches_per_s",
                                       "load_cpu_ms_per_req", "load_switches_per_req"), v, strict=True))
                          for k, v in totals.items()}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
