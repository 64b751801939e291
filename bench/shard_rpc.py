"""What one session-shard call costs over gRPC and over a Ray actor call.

Starts a local Ray cluster (2 CPUs, 127.0.0.1), one session shard and a caller actor (a stand-in
for the Serve ingress, which is an actor too) holding two clients of that shard: one with
``session.transport: grpc`` (the default, :mod:`actors.shard_channel`) and one with ``ray``.
The caller sends one read (``SessionStore.get`` of a session with 10 events) or one append (one
event, the shard's fsync on) at a time, alternating the two transports over ``--repeats`` rounds,
and the bench reads both processes' CPU time around each batch of calls.

Prints a table and writes ``bench/results/shard_rpc.json``:

    python bench/shard_rpc.py
    python bench/shard_rpc.py --calls 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import ray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.session_events import SessionEvent  # noqa: E402
from actors.session_state import SessionStateConfig, SessionStore  # noqa: E402


@ray.remote(num_cpus=0)
class Caller:
    """Holds one client per transport over the same shard and times calls on its event loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        base = SessionStateConfig.model_validate(config)
        self.stores = {t: SessionStore(base.model_copy(update={"transport": t}))
                       for t in ("grpc", "ray")}
        self.n = 0

    async def ready(self) -> int:
        for st in self.stores.values():
            await st.ready()
        now = time.time()
        await self.stores["ray"].append([
            SessionEvent.create("view", session_id="bench", user_id="bu", item_id=f"i{k}",
                                ts=now + k * 1e-3) for k in range(10)])
        return os.getpid()

    async def run(self, transport: str, kind: str, calls: int) -> float:
        st = self.stores[transport]
        t0 = time.perf_counter()
        for _ in range(calls):
            if kind == "read":
                await st.get(session_id="bench")
            else:
                self.n += 1
                await st.append([SessionEvent.create("view", session_id=f"w{self.n % 64}",
                                                     item_id=f"j{self.n}", ts=time.time())])
        return (time.perf_counter() - t0) / calls * 1000.0

    def stats(self) -> dict[str, dict[str, int]]:
        return {t: st.transport_stats() for t, st in self.stores.items()}


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="calls per transport, kind and round")
    p.add_argument("--repeats", type=int, default=3, help="alternated rounds")
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "shard_rpc.json"))
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    wal = tempfile.mkdtemp(prefix="shard_rpc_")
    config = SessionStateConfig(num_shards=1, wal_uri=wal, namespace="shard-rpc-bench",
                                actor_prefix=f"bench-{os.getpid()}")
    caller = Caller.remote(config.model_dump())
    caller_pid = ray.get(caller.ready.remote(), timeout=120)
    shard = SessionStore(config)
    shard_pid = ray.get(shard.handles[0].pid.remote(), timeout=60)
    procs = {"caller": psutil.Process(caller_pid), "shard": psutil.Process(shard_pid)}

    rows: list[dict[str, Any]] = []
    try:
        for kind in ("read", "append"):
            for t in ("grpc", "ray"):  # warm both
                ray.get(caller.run.remote(t, kind, 200))
            for r in range(args.repeats):
                order = ("grpc", "ray") if r % 2 == 0 else ("ray", "grpc")
                for t in order:
                    before = {k: cpu_s(pr) for k, pr in procs.items()}
                    ms = ray.get(caller.run.remote(t, kind, args.calls))
                    cpu = {k: (cpu_s(pr) - before[k]) / args.calls * 1000.0 for k, pr in procs.items()}
                    rows.append({"kind": kind, "transport": t, "round": r, "latency_ms": round(ms, 3),
                                 "caller_cpu_ms": round(cpu["caller"], 3),
                                 "shard_cpu_ms": round(cpu["shard"], 3),
                                 "total_cpu_ms": round(cpu["caller"] + cpu["shard"], 3)})
                    print(f"{kind:6s} {t:4s} round {r}: {ms:.3f} ms per call, CPU caller "
                          f"{cpu['caller']:.3f} + shard {cpu['shard']:.3f} ms", flush=True)
        stats = ray.get(caller.stats.remote())
    finally:
        shard.kill()
        ray.shutdown()

    print(f"\n{'kind':6s} {'transport':9s} {'latency ms':>12s} {'caller CPU':>12s} {'shard CPU':>12s} "
          f"{'total CPU':>12s}")
    summary = []
    for kind in ("read", "append"):
        for t in ("grpc", "ray"):
            rs = [r for r in rows if r["kind"] == kind and r["transport"] == t]

            def span(key: str, rs: list[dict[str, Any]] = rs) -> str:
                lo, hi = min(r[key] for r in rs), max(r[key] for r in rs)
                return f"{lo:.2f}-{hi:.2f}"

            print(f"{kind:6s} {t:9s} {span('latency_ms'):>12s} {span('caller_cpu_ms'):>12s} "
                  f"{span('shard_cpu_ms'):>12s} {span('total_cpu_ms'):>12s}")
            summary.append({"kind": kind, "transport": t,
                            **{k: [min(r[k] for r in rs), max(r[k] for r in rs)]
                               for k in ("latency_ms", "caller_cpu_ms", "shard_cpu_ms", "total_cpu_ms")}})
    print(f"calls each client sent, by way: {stats}")
    out = {"command": "python bench/shard_rpc.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
           "machine": platform.machine(), "cpus": os.cpu_count(), "calls": args.calls,
           "repeats": args.repeats, "rows": rows, "summary": summary, "transport_stats": stats}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
