"""The in-process bound of ``bench/serve_bench.py``: the serving app's own code in one process.

Not a second implementation and not a deployment mode: the same FastAPI ``api`` of
``serve_app.py``, the same ``Ingress`` methods, the same :class:`actors.ranker.RankerService` and
the same session-shard logic (:class:`actors.session_state.SessionShard` over ``ShardState``, WAL
and group commit included), with every Ray hop replaced by a direct call in the same event loop,
served by one uvicorn process. What Serve costs on top of that (proxy, handle calls, actor RPCs,
pickling, more processes on the same cores) is the difference the benchmark reports.

Run by the benchmark as ``python bench/inprocess_app.py --port 8432 --args '<AppArgs JSON>'``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as the Serve replicas (serve_config.yaml env_vars)
# No Ray here: a Ray call that would start a local cluster (ray.get_runtime_context() and the
# like initialise Ray when it is not) fails instead. Such a cluster would run beside the bound
# and, as a child of this process, be counted as part of the Serve app by serve_bench.py.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"


def build(app_args: dict[str, Any], clock: Any = None) -> Any:
    """The FastAPI app of ``serve_app`` bound to an in-process Ingress (returns ``serve_app.api``).

    Args:
        app_args: ``serve_app.AppArgs`` as a dict.
        clock: The server clock of the ingress and the shards (:mod:`actors.clock`; tests pass a
            settable one); default the system clock.
    """
    import serve_app
    from actors.clock import system_clock
    from actors.local_handle import LocalHandle
    from actors.ranker import RankerService
    from actors.session_state import SessionShard, SessionStore

    clock = clock or system_clock

    # One direct ranker call per request: nothing to coalesce without a hop.
    args = serve_app.AppArgs.model_validate(
        {**app_args, "ranker_calls_in_flight": 0}).resolved()
    ranker = RankerService(args.artifacts_root, args.model_version, args.tombstones_path,
                           items_path=args.items_path)
    # SessionStore's routing and validation, with its shard handles pointing at shards in this
    # process instead of actors (its constructor would start the actors). Direct calls: the
    # "ray" transport, since the handle would also answer `endpoint` and send the shard's calls
    # over gRPC to this same process.
    shards = [LocalHandle(SessionShard(args.session.model_dump(), i, clock))
              for i in range(args.session.num_shards)]
    store = SessionStore.over(args.session.model_copy(update={"transport": "ray"}), shards, clock)
    # The user class under Serve's ingress wrapper (the one that defines the routes).
    wrapper: Any = serve_app.Ingress  # a Deployment at run time
    ingress_cls = next(c for c in wrapper.func_or_class.__mro__ if "recommend" in vars(c))
    ingress = ingress_cls(LocalHandle(ranker), None, args.model_dump(), store=store,
                          clock=clock)
    # @serve.ingress gave every route method a `self` dependency that returns
    # `serve.get_replica_context().servable_object`; in this process that is this one instance.
    from ray import serve

    serve.get_replica_context = lambda: SimpleNamespace(servable_object=ingress, app_name="inprocess")  # type: ignore
    gc.collect()
    gc.freeze()  # as GNNRanker does after loading a model
    return serve_app.api


def main(argv: list[str] | None = None) -> int:
    """Serve the in-process app on 127.0.0.1 until killed."""
    import json

    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--args", required=True, help="serve_app.AppArgs as JSON")
    opts = p.parse_args(argv)
    app = build(json.loads(opts.args))
    uvicorn.run(app, host="127.0.0.1", port=opts.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
