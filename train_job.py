"""Train, evaluate and publish an intentrec model.

    python train_job.py                       # built-in Complete Journey data, local Ray
    python train_job.py --events e.parquet --items i.parquet --workers 4 --gpus
    python train_job.py --online-events state/sessions   # also train on the app's online events
    ray job submit --working-dir . -- python train_job.py --output s3://bucket/models

Uses the Ray cluster named by ``--address`` or ``RAY_ADDRESS`` (``ray job submit`` sets it), else
starts a private local Ray (127.0.0.1, no dashboard); trains the GNN with Ray Train,
prints the evaluation table and switches ``<output>/LATEST`` to the new version. Users forgotten
through ``DELETE /v1/users/{id}`` (``--forgotten``, default ``state/forgotten_users.txt``) are
left out of everything it fits and writes. With ``--require-lead [MARGIN]`` the new version
becomes ``LATEST`` only if it beats every baseline in every task; otherwise it is written, not
published, and the job exits 3 (:data:`GATE_EXIT`); ``--require-no-regression [TOLERANCE]``
likewise keeps ``LATEST`` on the version it names unless the new model is at most ``TOLERANCE``
below that version's recall@20 on this run's requests, in every task.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:  # imported lazily at run time: `--help` stays fast
    from graph.pipeline import PipelineConfig

GATE_EXIT = 3  # the exit status of a run whose version the publish gate kept from LATEST


def build_parser() -> argparse.ArgumentParser:
    from graph.config import TrainConfig
    from graph.forgotten import DEFAULT_FORGOTTEN_PATH

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="train_job.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--events", help="canonical events file (Parquet or CSV); default: built-in data")
    g.add_argument("--items", help="canonical items file (Parquet or CSV); required with --events")
    g.add_argument("--max-users", type=int, help="train on a seeded sample of this many users")
    g.add_argument("--split-at", type=datetime.fromisoformat,
                   help="test split (ISO date); default 2017-12-01 for the built-in data, "
                        "else the last 10%% of the time span")
    g.add_argument("--val-days", type=float, default=28.0,
                   help="validation window before the split (the LightGBM ranker is fitted on it)")
    g.add_argument("--forgotten", metavar="PATH_OR_URI", default=None,
                   help="forgotten-users file that DELETE /v1/users/{id} writes "
                        "(<state_dir>/forgotten_users.txt); every event of those users is dropped "
                        "before anything is fitted or written. Default: "
                        f"{DEFAULT_FORGOTTEN_PATH}, the serving app's default, if it exists here; "
                        "a file given here must exist")
    g.add_argument("--online-events", metavar="WAL_URI", default=None,
                   help="the serving app's session log (session.wal_uri): its accepted events are "
                        "exported to --online-export (canonical Parquet) and added to the "
                        "training data (not to validation or test)")
    g.add_argument("--online-export", metavar="PATH", default="online_events.parquet",
                   help="where --online-events writes the exported events")
    g = p.add_argument_group("training")
    g.add_argument("--workers", type=int, default=d.num_workers,
                   help="Ray Train workers (DDP); each propagates the whole graph, so on one "
                        "node '--workers 1 --batch-size 16384' is faster (README: Workers and "
                        "cores)")
    g.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker,
                   help="cores (torch threads) per worker; default: the free CPUs shared among "
                        "the workers, as many as fit on a node each")
    g.add_argument("--gpus", action="store_true", help="one GPU per worker (use_gpu=True)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--dim", type=int, default=d.dim, help="embedding size")
    g.add_argument("--layers", type=int, default=d.num_layers, help="LightGCN layers")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--text-input", choices=("auto", "on", "off"), default=d.text_input,
                   help="the items' text vectors in the GNN's layer 0 (auto: when at least half "
                   "of the items have titles of their own, not only category paths)")
    g.add_argument("--release-freed-memory", action="store_true",
                   help="let glibc return each step's freed tensors to the kernel (less memory "
                   "per CPU worker, slower epochs above 32 MB per tensor: at --dim 128 about "
                   "twice as slow)")
    g.add_argument("--storage", default="checkpoints",
                   help="checkpoint storage: a local folder or a pyarrow URI such as s3://bucket/ckpt")
    g.add_argument("--run-name", default=None,
                   help="Ray Train run name; re-using one resumes from its latest checkpoint "
                        "(default: a new name per run)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--output", default="artifacts", help="artifact root (folder or pyarrow URI)")
    g.add_argument("--eval-max-users", type=int, help="cap users per next-basket task")
    g.add_argument("--eval-max-baskets", type=int, help="cap baskets per in-session task")
    g.add_argument("--skip-eval", action="store_true", help="publish without the evaluation table")
    g.add_argument("--eval-workers", type=int, default=None,
                   help="Ray actors that rank the evaluation's requests, one CPU each (default: "
                        "one per free CPU of the cluster; 1: in this process)")
    g.add_argument("--ablations", action="store_true",
                   help="also fit rankers without the GNN, session and context features and "
                        "print their table (about 3x the ranker's fitting time)")
    g.add_argument("--anonymous-twins", type=float, default=0.0, metavar="SHARE",
                   help="also fit the ranker on this share of the next-basket and in-session "
                        "validation requests asked without their shopper (e.g. 0.2): better "
                        "anonymous sessions and cold starts, a little lower search recall")
    g.add_argument("--require-lead", type=float, nargs="?", const=0.0, default=None,
                   metavar="MARGIN",
                   help="publish gate: move LATEST only if intentrec's recall@20 beats every "
                        "baseline's by more than MARGIN (default 0) in every task; otherwise the "
                        "version is written but not made current, and the job exits 3 naming the "
                        "tasks")
    g.add_argument("--require-no-regression", type=float, nargs="?", const=0.0, default=None,
                   metavar="TOLERANCE",
                   help="publish gate: also evaluate the version LATEST names (the one serving) "
                        "on this run's requests, and move LATEST only if the new model's "
                        "recall@20 is at most TOLERANCE (default 0) below it in every task; "
                        "otherwise as --require-lead")
    g.add_argument("--address", default=None,
                   help="Ray cluster to use: 'auto' joins the `ray start` cluster on this machine, "
                        "or ray://host:port / host:port. Default: RAY_ADDRESS (set by `ray job "
                        "submit`), else a new local Ray on 127.0.0.1")
    return p


def forgotten_file(given: str | None) -> str | None:
    """The forgotten-users file to read: ``--forgotten`` as given, else the serving app's default
    (``state/forgotten_users.txt``) when it exists; relative paths are under the cluster's
    ``INTENTREC_STORAGE`` when it is set, else in the working directory."""
    import pyarrow.fs as pafs

    from graph.forgotten import DEFAULT_FORGOTTEN_PATH
    from graph.storage import filesystem, place, shared_root

    root = shared_root()
    if given is None:
        default = place(DEFAULT_FORGOTTEN_PATH, root)
        fs, path = filesystem(default)
        return default if fs.get_file_info(path).type != pafs.FileType.NotFound else None
    return place(given, root)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    from graph.config import TrainConfig
    from graph.pipeline import PipelineConfig

    run_name = args.run_name or f"intentrec-{datetime.now():%Y%m%d-%H%M%S}"
    from graph.storage import place, shared_root

    root = shared_root()  # a cluster's shared storage: relative locations go under it
    storage = place(args.storage, root)
    train = TrainConfig(
        num_workers=args.workers, cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpus,
        epochs=args.epochs, dim=args.dim, num_layers=args.layers, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed,
        storage_path=storage, run_name=run_name, text_input=args.text_input,
        retain_freed_memory=not args.release_freed_memory,
    )
    return PipelineConfig(
        events=args.events, items=args.items, max_users=args.max_users, split_at=args.split_at,
        val_days=args.val_days, output=place(args.output, root), eval_max_users=args.eval_max_users,
        eval_max_baskets=args.eval_max_baskets, skip_eval=args.skip_eval,
        eval_workers=args.eval_workers, ablations=args.ablations,
        anonymous_twins=args.anonymous_twins, require_lead=args.require_lead,
        require_no_regression=args.require_no_regression,
        forgotten=forgotten_file(args.forgotten), train=train,
        online_events=None if args.online_events is None else os.path.abspath(args.online_export),
    )


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = os.path.dirname(os.path.abspath(__file__))
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # `ray job submit` sets RAY_ADDRESS; `--address auto` joins a `ray start` cluster
        ray.init(address=address, runtime_env=env)
        print(f"[ray] connected to {ray.get_runtime_context().gcs_address}")
        return
    # Default: a private local cluster on 127.0.0.1. Joining whatever cluster happens to run on
    # the machine would make a plain `python train_job.py` depend on someone else's resources.
    # Worker logs are not streamed: progress comes back through Ray Train's report callback.
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env=env, log_to_driver=False)
    print(f"[ray] started a local Ray with {int(ray.cluster_resources().get('CPU', 0))} CPUs")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from graph.errors import IntentrecError
    from graph.pipeline import prepare_data, run_pipeline

    try:
        cfg = config_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            print(f"error: {loc}: {msg}" if loc else f"error: {msg}", file=sys.stderr)
        return 2
    try:
        if args.online_events is not None:
            from actors.session_export import export_online_events

            report = export_online_events(args.online_events, args.online_export)
            print(f"[online] exported {report.describe()} to {args.online_export}")
        # Data first: bad input fails in seconds, before a Ray cluster is started or joined.
        data = prepare_data(cfg)
        init_ray(args.address)
        result = run_pipeline(cfg, data=data)
    except IntentrecError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print()
    print(result.table)
    print()
    t = result.timings
    took = (f"(train {t.get('train_s', 0):.0f}s, ranker {t.get('ranker_s', 0):.0f}s, "
            f"eval {t.get('eval_s', 0):.0f}s, total {t.get('total_s', 0):.0f}s)")
    if not result.published:
        print(f"model version {result.version} written under {result.output} but NOT published "
              f"{took}", file=sys.stderr)
        flags = " ".join(f"{flag} {value}" for flag, value in (
            ("--require-lead", args.require_lead),
            ("--require-no-regression", args.require_no_regression)) if value is not None)
        print(f"error: the publish gate ({flags}) is not met, so LATEST was not moved to this "
              "version and serving does not switch to it:", file=sys.stderr)
        for line in result.shortfalls:
            print(f"  - {line}", file=sys.stderr)
        print(f"Serve it anyway by name (POST /v1/admin/reload with {{\"version\": "
              f"\"{result.version}\"}}), or retrain without the gate's flags.", file=sys.stderr)
        return GATE_EXIT
    print(f"model version {result.version} published under {result.output}  {took}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
