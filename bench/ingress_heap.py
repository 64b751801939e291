"""Where the ingress replica's memory grows under steady load: Python heap or native.

It deploys the app as ``bench/soak.py`` does (``serve_app.compose``, the ``cluster.yaml`` Serve
flags, a client key), holds open-loop traffic on both endpoints, starts ``tracemalloc`` inside
the ingress replica through ``__ray_call__``, and after ``--seconds`` compares the replica's
resident memory (RSS) with the Python objects ``tracemalloc`` traced and with glibc's account of
its heap (``mallinfo2``: in use, and freed but kept). The sites whose traced memory grew most
print with their stacks; the figures go to ``bench/results/ingress_heap.json``.

The replicas get ``serve_config.yaml``'s environment, which sets ``MALLOC_ARENA_MAX=2``;
``--app-env MALLOC_ARENA_MAX=16`` gives a 2-core machine glibc's default (8 arenas per core)
back, for comparison (``docs/PERFORMANCE.md``, "Replica memory").

Usage::

    python bench/ingress_heap.py --artifacts ROOT            # 120 s at 25 + 90 requests/s
    python bench/ingress_heap.py --artifacts ROOT --seconds 180 --app-env MALLOC_ARENA_MAX=16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import bench.serve_bench as sb  # sets RAY_AUTH_MODE and the usage-stats switch
from bench.loadgen import LoadSpec

RESULTS = Path(__file__).resolve().parent / "results" / "ingress_heap.json"


def _start(_self: Any) -> bool:
    import tracemalloc

    tracemalloc.start(12)
    return True


def _malloc_mb() -> dict[str, float]:
    """glibc's own account (``mallinfo2``, all arenas): bytes handed out and bytes held free."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks",
                                                   "keepcost")]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return {}
    fn.restype = MallInfo2
    m = fn()
    return {"heap": (m.arena + m.hblkhd) / 2**20, "in_use": (m.uordblks + m.hblkhd) / 2**20,
            "free": m.fordblks / 2**20}


def _snapshot(_self: Any) -> dict[str, Any]:
    """RSS, traced Python memory, glibc's heap, and (from the second call on) the top growth
    sites."""
    import builtins
    import gc
    import tracemalloc

    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    rss_kb = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])
    prev = getattr(builtins, "_intentrec_heap_snapshot", None)
    builtins._intentrec_heap_snapshot = snap  # type: ignore[attr-defined]
    top = [] if prev is None else [
        {"kib": round(st.size_diff / 1024, 1), "blocks": st.count_diff,
         "stack": st.traceback.format()[-8:]}
        for st in snap.compare_to(prev, "traceback")[:8]]
    return {"rss_mb": rss_kb / 1024, "traced_mb": tracemalloc.get_traced_memory()[0] / 2**20,
            "malloc_mb": _malloc_mb(), "allocator": os.environ.get("MALLOC_ARENA_MAX", "default"),
            "top": top}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--artifacts", default="artifacts", help="model root (train_job.py output)")
    p.add_argument("--seconds", type=float, default=120.0, help="measured time")
    p.add_argument("--recommendations", type=float, default=25.0, help="per second")
    p.add_argument("--events", type=float, default=90.0, help="per second")
    p.add_argument("--port", type=int, default=8447, help="Serve HTTP port (127.0.0.1)")
    p.add_argument("--app-env", action="append", default=[], metavar="KEY=VALUE",
                   help="added to the replicas' env_vars, e.g. MALLOC_ARENA_MAX=2")
    p.add_argument("--output", default=str(RESULTS), help="results file")
    opts = p.parse_args(argv)

    import ray

    bench, art = sb.prepare_app(opts.artifacts, "ingress-heap", "ingress heap")
    auth, model, args = bench.auth, bench.model, bench.args
    mix = sb.traffic(art, n=20_000)
    del art
    url = f"http://127.0.0.1:{opts.port}"
    gens = [sb.LoadGen(), sb.LoadGen()]
    rates = {"recommendations": opts.recommendations, "events": opts.events}

    def hold(seconds: float, seed: int) -> None:
        def drive(ep: str, gen: sb.LoadGen) -> None:
            gen.run(LoadSpec(url=url + sb.ENDPOINTS[ep], bodies=mix[ep], mode="open",
                             rate=rates[ep], concurrency=64, duration_s=seconds, warmup_s=0,
                             headers=auth, seed=seed, max_requests=10**7))

        threads = [threading.Thread(target=drive, args=(ep, g)) for ep, g in zip(rates, gens, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    try:
        sb.start_serve(args, opts.port, bench.env(dict(kv.split("=", 1) for kv in opts.app_env)))
        sb.wait_ready(url, 300)
        sb.seed_sessions(url, mix["seed_batches"], auth)
        ingress = next(ray.get_actor(a["name"], namespace=a["namespace"])
                       for a in ray.util.list_named_actors(all_namespaces=True)
                       if f"{sb.APP}#Ingress#" in a["name"])
        hold(40, 1)  # warm-up: connections, caches
        ray.get(ingress.__ray_call__.remote(_start))
        hold(30, 2)
        before = ray.get(ingress.__ray_call__.remote(_snapshot))
        hold(opts.seconds, 3)
        after = ray.get(ingress.__ray_call__.remote(_snapshot))
    finally:
        for g in gens:
            g.close()
        sb.stop_serve(args)
    rss = after["rss_mb"] - before["rss_mb"]
    traced = after["traced_mb"] - before["traced_mb"]
    print(f"\n{'ingress replica':<16} {'before MB':>10} {'after MB':>10} {'growth MB':>10}")
    print(f"{'RSS':<16} {before['rss_mb']:10.1f} {after['rss_mb']:10.1f} {rss:10.1f}")
    print(f"{'Python (traced)':<16} {before['traced_mb']:10.1f} {after['traced_mb']:10.1f} "
          f"{traced:10.1f}")
    for k in ("heap", "in_use", "free"):
        if k in before["malloc_mb"]:
            print(f"{'malloc ' + k:<16} {before['malloc_mb'][k]:10.1f} {after['malloc_mb'][k]:10.1f} "
                  f"{after['malloc_mb'][k] - before['malloc_mb'][k]:10.1f}")
    print(f"native (RSS - traced): {rss - traced:.1f} MB in {opts.seconds:.0f} s at "
          f"{opts.recommendations:g} recommendations and {opts.events:g} events per second")
    for site in after["top"][:4]:
        print(f"\n{site['kib']:+.1f} KiB in {site['blocks']:+d} blocks")
        print("\n".join(site["stack"]))
    out = Path(opts.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "seconds": opts.seconds, "rates": rates,
                               "app_env": opts.app_env,
                               "before": before, "after": after,
                               "growth_mb": {"rss": rss, "traced": traced,
                                             "native": rss - traced}}, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
