"""Soak: half of the measured maximum load for a long time, with the memory of every Ray process.

It deploys the Serve app as ``bench/serve_bench.py`` does (the same ``serve_app.compose``, the
``cluster.yaml`` Serve flags, a client key), measures the maximum closed-loop throughput of
``POST /v1/recommendations`` and ``POST /v1/events`` loaded together (concurrency 8 each: they
share the proxy, the ingress and the shards), then holds Poisson arrivals at ``--fraction``
(0.5) of each for ``--minutes``. Every
``--sample-s`` seconds it records the resident memory (RSS) of every process of the local Ray
cluster (proxy, replicas, session shards, controller, raylet, GCS), grouped by process title.

The verdict (the issue's bar): 0 failed requests, and every group's RSS at the end within 10% of
its RSS after the first measured window, per process where the group's number of processes
changed (Serve's autoscaler added a replica). The table prints per group; the JSON goes to
``bench/results/soak.json``.

Steady state. Before the measured windows, ``--warmup-minutes`` of the same traffic load the model,
open connections, fill caches and the session shards' state. A shard's state grows until each
bound is reached (events per session: ``window``; per user: ``user_history``; remembered event
ids: ``dedupe_capacity``) and then stays there; with the production bounds (100,000 ids per
shard) that takes about 50 minutes at this box's half load, so ``--dedupe-capacity``,
``--session-window`` and ``--user-history`` can lower them for the soak so that the measured
windows start full: growth after that is a leak, not state filling up. The GCS keeps the task
events of the last ``RAY_task_events_max_num_task_in_gcs`` tasks (20,000 in ``cluster.yaml``,
which the soak's local Ray gets too), a buffer that fills the same way. So does each ingress
replica's record of recent responses for click credit (``impressions_capacity``, 100,000: about
70 minutes at half load), which ``--impressions`` lowers.
Errors count over the warm-up too. ``bench/shard_memory.py`` measures the production bounds.

Each window also records the sizes of the session shards' state (sessions, users, the events in
their windows, remembered event ids and idempotency keys, summed over the shards) next to the
bound each has in the configuration, so that growth of the shards' memory can be told apart:
state filling up to its bound, or a leak.

Usage::

    python bench/soak.py --artifacts /tmp/full_model              # 10 minutes
    python bench/soak.py --minutes 2 --sample-s 20                # a short check

Without a model under ``--artifacts`` it builds a small one with SVD embeddings in place of the
GNN, as the serving benchmark does, and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import bench.serve_bench as sb  # sets RAY_AUTH_MODE and the usage-stats switch
from bench.loadgen import LoadSpec

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
RSS_TOLERANCE = 0.10
STATE_KEYS = ("sessions", "users", "session_events", "user_events", "dedupe_ids", "idempotency_keys")


def ray_processes(exclude: set[int]) -> dict[str, list[int]]:
    """PIDs of the local Ray cluster's processes, grouped by a readable title
    (``ray::ServeReplica:intentrec-bench:GNNRanker`` → ``ServeReplica GNNRanker``)."""
    import psutil

    groups: dict[str, list[int]] = {}
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in exclude:
            continue
        try:
            cmd = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            continue
        title = cmd.split()[0] if cmd else "?"
        m = re.match(r"ray::(\w+)(?::[\w-]+:(\w+))?", cmd)
        if m:
            title = " ".join(x for x in m.groups() if x)
        elif "raylet" in cmd:
            title = "raylet"
        elif "gcs_server" in cmd:
            title = "gcs_server"
        else:
            title = Path(title).name
        groups.setdefault(title, []).append(proc.pid)
    return groups


def rss_mb(groups: dict[str, list[int]]) -> dict[str, float]:
    """Summed RSS (MB) per group; processes that exited count 0."""
    import psutil

    out: dict[str, float] = {}
    for name, pids in groups.items():
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        out[name] = total / 2**20
    return out


def state_bounds(cfg: Any) -> dict[str, int]:
    """The most of each :data:`STATE_KEYS` size that the session configuration allows, summed
    over the shards (a user's or session's events may be counted on two shards)."""
    n = cfg.num_shards
    return {"sessions": n * cfg.max_sessions_per_shard, "users": n * cfg.max_users_per_shard,
            "session_events": n * cfg.max_sessions_per_shard * cfg.window,
            "user_events": n * cfg.max_users_per_shard * cfg.user_history,
            "dedupe_ids": n * cfg.dedupe_capacity, "idempotency_keys": n * cfg.dedupe_capacity}


def state_sizes(store: Any) -> dict[str, int]:
    """:data:`STATE_KEYS` sizes summed over the shards (``SessionStore.stats``)."""
    per_shard = asyncio.run(store.stats())
    return {k: sum(int(st.get(k, 0)) for st in per_shard) for k in STATE_KEYS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--artifacts", default="artifacts", help="model root (train_job.py output)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long to hold the load")
    p.add_argument("--sample-s", type=float, default=30.0, help="seconds per window / RSS sample")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the maximum throughput")
    p.add_argument("--port", type=int, default=8441, help="Serve HTTP port (127.0.0.1)")
    p.add_argument("--output", default=str(RESULTS), help="results file")
    p.add_argument("--warmup-minutes", type=float, default=0.0,
                   help="load before the first measured window (its RSS is the baseline)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="cap every deployment's autoscaler at this many replicas (1: fixed at "
                        "one each); the shipped bounds (4 rankers, 4 ingress replicas) are for "
                        "a cluster, more than a 2-core node holds")
    p.add_argument("--dedupe-capacity", type=int, default=None,
                   help="event ids remembered per shard (default: the deployment's)")
    p.add_argument("--session-window", type=int, default=None,
                   help="events kept per session (default: the deployment's)")
    p.add_argument("--user-history", type=int, default=None,
                   help="events kept per user (default: the deployment's)")
    p.add_argument("--impressions", type=int, default=None,
                   help="responses each ingress remembers for click credit (default: the app's)")
    p.add_argument("--inline-ranker", action="store_true",
                   help="AppArgs.inline_ranker: the ranker in the ingress (no GNNRanker hop)")
    opts = p.parse_args(argv)

    from actors.session_state import SessionStore

    bench, art = sb.prepare_app(opts.artifacts, "soak", "soak")
    auth, model = bench.auth, bench.model
    mix = sb.traffic(art, n=20_000)
    del art
    args = bench.args
    bounds_override = {k: v for k, v in (("dedupe_capacity", opts.dedupe_capacity),
                                         ("window", opts.session_window),
                                         ("user_history", opts.user_history)) if v is not None}
    if bounds_override:
        args = args.model_copy(update={"session": args.session.model_copy(update=bounds_override)})
        print(f"session state bounds for this soak: {bounds_override}", flush=True)
    if opts.impressions is not None:
        args = args.model_copy(update={"impressions_capacity": opts.impressions})
        print(f"impressions kept per ingress replica for this soak: {opts.impressions}", flush=True)
    if opts.inline_ranker:
        args = args.model_copy(update={"inline_ranker": True})
        print("the ranker in the ingress for this soak (inline_ranker)", flush=True)
    url = f"http://127.0.0.1:{opts.port}"
    gens: list[sb.LoadGen] = []
    windows: list[dict[str, Any]] = []
    try:
        deployments = None
        if opts.max_replicas is not None:
            from actors.deployment_options import DEPLOYMENTS

            deployments = {name: {"autoscaling_config": {
                **d["autoscaling_config"],
                "max_replicas": min(opts.max_replicas, d["autoscaling_config"]["max_replicas"])}}
                for name, d in DEPLOYMENTS.items()}
            print(f"autoscaling capped at {opts.max_replicas} replica(s) per deployment",
                  flush=True)
        sb.start_serve(args, opts.port, bench.env(), deployments)
        sb.wait_ready(url, 300)
        sb.seed_sessions(url, mix["seed_batches"], auth)
        store = SessionStore(args.session)  # attaches to the app's shards, to read their sizes
        gens = [sb.LoadGen(), sb.LoadGen()]
        exclude = {g.proc.pid or -1 for g in gens}
        # The maximum of the mix: both endpoints loaded together, as they are held. Both go
        # through the same proxy, ingress and shards, so half of each one's maximum measured
        # alone would add up to the whole capacity, not half of it.
        best: dict[str, float] = {}

        def saturate(ep: str, gen: sb.LoadGen) -> None:
            res = gen.run(LoadSpec(url=url + sb.ENDPOINTS[ep], bodies=mix[ep], mode="closed",
                                   concurrency=8, duration_s=10, warmup_s=2, headers=auth))
            best[ep] = res["throughput"]

        both = [threading.Thread(target=saturate, args=(ep, g))
                for ep, g in zip(sb.ENDPOINTS, gens, strict=True)]
        for t in both:
            t.start()
        for t in both:
            t.join()
        print("max of the mix (both endpoints together, concurrency 8 each): "
              + ", ".join(f"{ep} {best[ep]:.1f} req/s" for ep in sb.ENDPOINTS), flush=True)
        rates = {ep: best[ep] * opts.fraction for ep in best}
        n_warm = round(opts.warmup_minutes * 60 / opts.sample_s)
        n_windows = max(2, round(opts.minutes * 60 / opts.sample_s))
        print(f"holding {', '.join(f'{ep} {r:.1f}/s' for ep, r in rates.items())} for "
              f"{n_warm} warm-up and {n_windows} measured windows of {opts.sample_s:.0f} s",
              flush=True)
        for w in range(n_warm + n_windows):
            results: dict[str, dict[str, Any]] = {}

            def drive(ep: str, gen: sb.LoadGen, seed: int) -> None:
                results[ep] = gen.run(LoadSpec(  # noqa: B023 - joined below, inside the loop
                    url=url + sb.ENDPOINTS[ep], bodies=mix[ep], mode="open", concurrency=256,
                    rate=rates[ep], duration_s=opts.sample_s, max_requests=10**7, seed=seed,
                    headers=auth))

            threads = [threading.Thread(target=drive, args=(ep, g, w * 2 + i))
                       for i, (ep, g) in enumerate(zip(sb.ENDPOINTS, gens, strict=True))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            procs = ray_processes(exclude)
            rss = rss_mb(procs)
            row = {"window": w - n_warm, "warmup": w < n_warm,
                   "t_s": round((w + 1) * opts.sample_s), "rss_mb": rss,
                   "rss_total_mb": sum(rss.values()), "processes": {k: len(v) for k, v in procs.items()},
                   "state": state_sizes(store)}
            for ep, res in results.items():
                res.pop("latencies_ms", None)
                row[ep] = res
            windows.append(row)
            name = (f"warm-up {w + 1}/{n_warm}" if w < n_warm
                    else f"window {w - n_warm + 1}/{n_windows}")
            print(f"  {name}: "
                  + "  ".join(f"{ep} {r['throughput']:.1f}/s p99 {r['p99_ms']:.0f} ms "
                              f"err {r['errors']}" for ep, r in results.items())
                  + f"  Ray RSS {row['rss_total_mb']:.0f} MB", flush=True)
    finally:
        for g in gens:
            g.close()
        sb.stop_serve(args)

    # A group whose number of processes changed (Serve's autoscaler added or removed a replica)
    # is compared per process: more replicas is not a leak, a bigger replica is.
    measured = [w for w in windows if not w["warmup"]]
    first, last = measured[0]["rss_mb"], measured[-1]["rss_mb"]
    n_first, n_last = measured[0]["processes"], measured[-1]["processes"]
    groups = []
    for name in sorted(set(first) | set(last)):
        a, b = first.get(name, 0.0), last.get(name, 0.0)
        na, nb = n_first.get(name, 0), n_last.get(name, 0)
        per_a, per_b = (a / na if na else 0.0), (b / nb if nb else 0.0)
        change = (per_b - per_a) / per_a if per_a and nb else None
        groups.append({"process": name, "rss_start_mb": a, "rss_end_mb": b, "count_start": na,
                       "count_end": nb, "change": change})
    errors = sum(w[ep]["errors"] for w in windows for ep in sb.ENDPOINTS)
    errors_measured = sum(w[ep]["errors"] for w in measured for ep in sb.ENDPOINTS)
    requests = sum(w[ep]["requests"] for w in windows for ep in sb.ENDPOINTS)
    status: dict[str, int] = {}
    for w in windows:
        for ep in sb.ENDPOINTS:
            for k, v in w[ep]["status"].items():
                status[k] = status.get(k, 0) + v
    flat = all(g["change"] is None or abs(g["change"]) <= RSS_TOLERANCE for g in groups)
    print()
    print(f"{'process':<40} {'count':>7} {'RSS start MB':>12} {'RSS end MB':>11} {'change':>8}")
    for g in groups:
        ch = "-" if g["change"] is None else f"{g['change']:+.1%}"
        count = f"{g['count_start']}" + ("" if g["count_end"] == g["count_start"] else f"->{g['count_end']}")
        print(f"{g['process']:<40} {count:>7} {g['rss_start_mb']:12.0f} {g['rss_end_mb']:11.0f} "
              f"{ch:>8}")
    bounds = state_bounds(args.session)
    state = [{"state": k, "start": measured[0]["state"][k], "end": measured[-1]["state"][k],
              "bound": bounds[k]} for k in STATE_KEYS]
    print(f"\n{'session state (all shards)':<40} {'start':>12} {'end':>11} {'bound':>12}")
    for st in state:
        print(f"{st['state']:<40} {st['start']:12d} {st['end']:11d} {st['bound']:12d}")
    print(f"\nrequests {requests}, errors {errors} ({errors - errors_measured} in the warm-up, "
          f"{errors_measured} in the measured windows), status {status}")
    print(f"verdict: errors == 0: {errors == 0}; every process's RSS within "
          f"{RSS_TOLERANCE:.0%} of its first measured window: {flat}")
    out = Path(opts.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "meta": {"when": datetime.now().isoformat(timespec="seconds"), "model": model,
                 "minutes": opts.minutes, "sample_s": opts.sample_s, "fraction": opts.fraction,
                 "warmup_minutes": opts.warmup_minutes, "session_bounds": bounds_override,
                 "max_replicas": opts.max_replicas,
                 "max_throughput": best, "rates": rates, "versions": sb.versions(),
                 "load_average_after": os.getloadavg()},
        "windows": windows, "processes": groups, "session_state": state,
        "verdict": {"requests": requests, "errors": errors, "errors_measured": errors_measured,
                    "status": status,
                    "rss_flat_within_10pct": flat}}, indent=2, default=str))
    print(f"wrote {out}")
    return 0 if errors == 0 and flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
