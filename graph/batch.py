"""Batch recommendations: top-k for every known user of a model version, for email and push
campaigns, through Ray Data and the same :class:`graph.recommend.Recommender` that serving and
evaluation call.

    python -m graph.batch --output recs.parquet                   # LATEST under ./artifacts
    python -m graph.batch --artifacts s3://bucket/models --k 10 --output recs.parquet --workers 4

Each Ray Data actor loads the version once and answers batches of users with
:meth:`Recommender.prepare`, one batched :meth:`Recommender.score` and :meth:`Recommender.select`
per batch (the evaluation's path; serving's :meth:`Recommender.recommend` is the same three
steps for one request). A user gets what ``POST /v1/recommendations`` with only that ``user_id``
and no session would return at the time ``--at``: no context (a campaign has no device or
region), no session. Users forgotten through ``DELETE /v1/users/{id}`` (``--forgotten``, default
``state/forgotten_users.txt`` when it exists) are left out.

Output: one Parquet file, one row per (user, rank): ``user_id``, ``rank`` (1 = best),
``item_id``, ``score``, ``title``, ``category``, ``model_version``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from graph import schema as S

BATCH_USERS = 256
OUTPUT_COLUMNS = ("user_id", "rank", "item_id", "score", "title", "category", "model_version")


class BatchRecommender:
    """A Ray Data callable class: one model version, loaded once per actor.

    Args:
        root: Artifact root (folder or URI).
        version: Version name (resolved by the driver, so every actor loads the same one).
        k: Items per user.
        now: The recommendation time (unix seconds).
    """

    def __init__(self, root: str, version: str, k: int, now: float) -> None:
        from graph.artifacts import read_artifact
        from graph.ranking import Ranker
        from graph.recommend import Recommender

        art = read_artifact(root, version)
        self.version = art.version
        self.rec = Recommender.build(art.items, Ranker(art.user_emb, art.item_emb, art.signals),
                                     art.item_static, art.learned, text=art.text)
        self.user_index = art.user_index()
        self.k, self.now = k, now

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from graph.recommend import Request

        users = batch[S.USER_COL].astype(str).tolist()
        prepared = [self.rec.prepare(Request(user=self.user_index[u], now=self.now, k=self.k))
                    for u in users]
        scores = self.rec.score(prepared)
        cat = self.rec.catalogue
        cols: dict[str, list[Any]] = {c: [] for c in OUTPUT_COLUMNS}
        for u, p, s in zip(users, prepared, scores, strict=True):
            ranked = self.rec.select(p, s)
            items = ranked.items.tolist()
            cols["user_id"] += [u] * len(items)
            cols["rank"] += list(range(1, len(items) + 1))
            cols["item_id"] += [str(cat.item_ids[i]) for i in items]
            cols["score"] += [float(x) for x in ranked.scores.tolist()]
            cols["title"] += [str(cat.titles[i]) for i in items]
            cols["category"] += [str(cat.categories[i]) for i in items]
            cols["model_version"] += [self.version] * len(items)
        return pd.DataFrame(cols).astype({"rank": "int32", "score": "float32"})


def batch_recommend(root: str, output: str, *, version: str = "latest", k: int = S.TOP_K,
                    at: datetime | None = None, workers: int = 1, max_users: int | None = None,
                    forgotten: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Write top-``k`` for every known user (minus ``forgotten``) to ``output``. Ray must be
    initialised.

    Returns:
        ``{"version", "users", "rows", "seconds", "users_per_second", "output"}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from graph.artifacts import filesystem, read_artifact, resolve_version

    t0 = time.perf_counter()
    version = resolve_version(root, version)
    user_ids = read_artifact(root, version).user_ids.astype(str)
    users = [u for u in user_ids.tolist() if u not in forgotten]
    if max_users is not None:
        users = users[:max_users]
    now = (at or datetime.now(UTC)).timestamp()
    # Blocks made here, in the driver: a repartition would be a task needing a CPU that the
    # actors, one CPU each, may all hold.
    frame = pd.DataFrame({S.USER_COL: users})
    ds = ray.data.from_pandas([frame.iloc[i: i + BATCH_USERS]
                               for i in range(0, len(frame), BATCH_USERS)] or [frame])
    recs = ds.map_batches(BatchRecommender, fn_constructor_args=(root, version, k, now),
                          batch_size=BATCH_USERS, batch_format="pandas", concurrency=workers,
                          num_cpus=1)
    fs, path = filesystem(output)
    rows = 0
    with fs.open_output_stream(path) as sink:
        writer: pq.ParquetWriter | None = None
        for table in recs.iter_batches(batch_format="pyarrow", batch_size=None):
            t = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table)
            if writer is None:
                writer = pq.ParquetWriter(sink, t.schema)
            writer.write_table(t)
            rows += t.num_rows
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    return {"version": version, "users": len(users), "rows": rows, "seconds": round(seconds, 2),
            "users_per_second": round(len(users) / seconds, 1) if seconds else None,
            "output": output}


def main(argv: list[str] | None = None) -> int:
    from graph.errors import IntentrecError
    from graph.forgotten import DEFAULT_FORGOTTEN_PATH, read_forgotten

    p = argparse.ArgumentParser(prog="python -m graph.batch",
                                description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="Parquet file to write (path or pyarrow URI)")
    p.add_argument("--artifacts", default="artifacts", help="artifact root (folder or URI)")
    p.add_argument("--version", default="latest", help="model version, or latest")
    p.add_argument("--k", type=int, default=S.TOP_K, help="items per user (1..200)")
    p.add_argument("--at", type=datetime.fromisoformat, default=None,
                   help="recommendation time (ISO); default: now")
    p.add_argument("--workers", type=int, default=1, help="Ray Data actors, one CPU each")
    p.add_argument("--max-users", type=int, default=None, help="only the first N users (trials)")
    p.add_argument("--forgotten", default=None,
                   help=f"forgotten-users file; default {DEFAULT_FORGOTTEN_PATH} if it exists")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
    args = p.parse_args(argv)
    if not 1 <= args.k <= 200:
        p.error(f"--k ({args.k}) must be between 1 and 200")
    if args.workers < 1:
        p.error(f"--workers ({args.workers}) must be at least 1")
    try:
        path = args.forgotten or (DEFAULT_FORGOTTEN_PATH if os.path.isfile(DEFAULT_FORGOTTEN_PATH)
                                  else None)
        forgotten = read_forgotten(path) if path else frozenset()
        _init_ray(args.address)
        out = batch_recommend(os.path.abspath(args.artifacts) if "://" not in args.artifacts
                              else args.artifacts, args.output, version=args.version, k=args.k,
                              at=args.at, workers=args.workers, max_users=args.max_users,
                              forgotten=forgotten)
    except IntentrecError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"[batch] top-{args.k} for {out['users']:,} users of model {out['version']} "
          f"({len(forgotten):,} forgotten left out) in {out['seconds']:.1f}s "
          f"({out['users_per_second']} users/s, {args.workers} worker(s)) -> {out['output']}")
    return 0


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=env, log_to_driver=False)


if __name__ == "__main__":
    sys.exit(main())
