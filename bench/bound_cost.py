"""CPU per request of the in-process bound alone: ``bench/serve_bench.py``'s bound, without a
Ray cluster running beside it.

``serve_bench.py`` measures the bound between Serve cells, with the whole Serve app (controller,
replicas, shards, HAProxy, GCS, raylet) resident on the same cores; this measures the same
server (``bench/inprocess_app.py``: the app's FastAPI routes, ``Ingress`` methods,
``RankerService`` and session shards in one process) with nothing else running, and for two
kinds of traffic: the benchmark's mixed recommendations, and requests with nothing personal
(a user the model does not know, no session, no context: the answer a replica keeps per model
version, ``actors.loaded_model.AnswerCache``). Closed loop, ``--repeats`` cells of each,
alternated; the process's idle CPU is measured before each round. Prints a table and writes
JSON.

    python bench/bound_cost.py --artifacts artifacts
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(artifacts: str, concurrency: int, duration_s: float, repeats: int,
            port: int) -> dict[str, Any]:
    import psutil

    from bench import loadgen
    from bench.loadgen import LoadSpec
    from bench.serve_bench import (
        ENDPOINTS,
        app_args,
        config_env_vars,
        model_or_stand_in,
        seed_sessions,
        start_bound,
        traffic,
        versions,
        wait_ready,
    )

    work = Path(tempfile.mkdtemp(prefix="bound-cost-"))
    key = secrets.token_urlsafe(32)
    auth = {"X-API-Key": key}
    model_root, art, model = model_or_stand_in(artifacts, work, "bound cost")
    mix = traffic(art)
    del art
    cells = {
        "mixed": mix["recommendations"],
        "nothing personal": [json.dumps({"user_id": f"nobody-{i}", "k": 20}).encode()
                             for i in range(500)],
    }
    url = f"http://127.0.0.1:{port}"
    # Ray's worker niceness, as serve_bench gives the bound (15).
    bound = start_bound(app_args(model_root, work, "bound"), port, work / "bound.log",
                        {**config_env_vars(), "INTENTREC_API_KEY": key}, 15)
    proc = psutil.Process(bound.pid)

    def cpu_s() -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    rows: list[dict[str, Any]] = []
    try:
        wait_ready(url, 300, bound)
        seed_sessions(url, mix["seed_batches"], auth)
        for bodies in cells.values():  # warm: caches, allocator, numba
            loadgen.run(LoadSpec(url=url + ENDPOINTS["recommendations"], bodies=bodies,
                                 concurrency=concurrency, duration_s=3, warmup_s=1, headers=auth))
        for rep in range(repeats):
            c0 = cpu_s()
            time.sleep(3)
            idle_ms_per_s = (cpu_s() - c0) / 3 * 1000
            for name, bodies in cells.items():
                c0 = cpu_s()
                res = loadgen.run(LoadSpec(
                    url=url + ENDPOINTS["recommendations"], bodies=bodies,
                    concurrency=concurrency, duration_s=duration_s, warmup_s=0, headers=auth))
                used = cpu_s() - c0
                rows.append({"repeat": rep, "traffic": name, "requests": res.requests,
                             "errors": res.errors, "throughput": round(res.throughput, 1),
                             "p50_ms": round(res.p50_ms, 2), "p99_ms": round(res.p99_ms, 2),
                             "cpu_ms_per_req": round(used * 1000 / max(res.requests, 1), 3),
                             "idle_cpu_ms_per_s": round(idle_ms_per_s, 1)})
                print(f"  round {rep + 1}/{repeats}  {name:<17} {res.throughput:7.1f} req/s  "
                      f"{rows[-1]['cpu_ms_per_req']:6.2f} ms CPU per request", flush=True)
    finally:
        bound.terminate()
        bound.wait()
    load = [round(x, 2) for x in psutil.getloadavg()]
    return {"model": model, "concurrency": concurrency, "duration_s": duration_s,
            "mix": mix["mix"], "rows": rows, "versions": versions(), "load_average_after": load}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per cell")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8453)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "bound_cost.json"))
    opts = p.parse_args(argv)
    res = measure(opts.artifacts, opts.concurrency, opts.duration, opts.repeats, opts.port)
    res["command"] = "python bench/bound_cost.py " + " ".join(argv or sys.argv[1:])
    print(f"\nin-process bound alone, c={opts.concurrency}, {opts.duration:g} s cells")
    print(f"{'traffic':<18}{'req/s':>16}{'CPU ms/req':>18}{'errors':>8}")
    for name in dict.fromkeys(r["traffic"] for r in res["rows"]):
        rs = [r for r in res["rows"] if r["traffic"] == name]
        tp = [r["throughput"] for r in rs]
        cpu = [r["cpu_ms_per_req"] for r in rs]
        print(f"{name:<18}{min(tp):>8.0f}–{max(tp):<7.0f}{min(cpu):>10.2f}–{max(cpu):<7.2f}"
              f"{sum(r['errors'] for r in rs):>8}")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
