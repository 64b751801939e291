"""What training-serving skew (PSI, graph.skew) a healthy deployment shows: a model version's
feature profile against the requests of the month after its training data.

A serving replica reports each ranker feature's PSI against the profile the training job kept
(README, "Training-serving skew"). How large is it when nothing is wrong? The profile is of the
validation window's requests, ranked with the embeddings and signals of the events before it;
served requests are ranked with those of all training events, and come later. This bench asks the
version the test month's requests of the protocol's four tasks (``graph.evaluate.protocol_tasks``,
as ``train_job.py`` evaluates them), drawn in the shares of the ranker's own training requests,
with simulated searches and anonymous twins (if it was trained with them) on the same shares of
requests (``graph.ranker_fit.validation_requests``), bins every candidate of every request
(:class:`graph.skew.SkewMonitor`, every request) and prints each feature's PSI: what a month of
drift and the refit signals give, on the request mix the ranker was trained on.

    python bench/skew_offline.py --artifacts artifacts
    python bench/skew_offline.py --artifacts /tmp/a --max-users 300   # a version of a sliced run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(artifacts: str, version: str = "latest", requests: int = 4000, seed: int = 0,
            max_users: int | None = None) -> dict[str, Any]:
    import numpy as np

    from actors.loaded_model import LoadedModel
    from graph import schema as S
    from graph.artifacts import read_artifact
    from graph.evaluate import IndexMap, protocol_tasks, validation_tasks
    from graph.features import FEATURES
    from graph.pipeline import PipelineConfig, prepare_data
    from graph.ranker_fit import validation_requests
    from graph.skew import SkewMonitor

    t0 = time.perf_counter()
    art = read_artifact(artifacts, version)
    profile = art.learned.profile
    if profile is None:
        raise SystemExit(f"model version {art.version} has no feature profile (trained by an "
                         "older release): retrain with `python train_job.py`")
    rec = LoadedModel.build(art).rec
    d = prepare_data(PipelineConfig(max_users=max_users), progress=lambda _line: None)
    country = rec.ranker.signals.params.country
    index = IndexMap.between(d.inter_full.user_ids, d.inter_full.item_ids, art.user_ids,
                             art.items[S.ITEM_COL].to_numpy())
    # The ranker's training requests per task (what train_job.py fitted it on).
    val = {q.name: len(q) for q in validation_tasks(d.fit_part, d.val_part, d.inter_full,
                                                    d.val_cut, country=country, seed=seed)}
    total = sum(val.values())
    rng = np.random.default_rng(seed)
    mon = SkewMonitor(profile, [FEATURES.index(f) for f in profile.features], every=1)
    per_task: dict[str, int] = {}
    batches = []
    for q in protocol_tasks(d.train, d.test, d.inter_full, d.split_at, country=country,
                            seed=seed):
        n = min(len(q), round(requests * val.get(q.name, 0) / max(total, 1)))
        if n == 0:
            continue
        batches.append(index.to_theirs(q.take(np.sort(rng.choice(len(q), n, replace=False)))))
        per_task[q.name] = n
    # Searches and anonymous twins as the ranker's training requests had them.
    v = validation_requests(batches, rec.catalogue.categories, rec.catalogue.titles, rng,
                            float(art.manifest.get("config", {}).get("anonymous_twins", 0.0)))
    for r in v.requests:
        p = rec.prepare(r)
        mon.observe(p.x, user=r.user is not None, session=bool(r.item_events),
                    query=r.query is not None or r.session_query is not None)
    report = mon.report(top=10)
    return {"version": art.version, "requests": per_task, "anonymous_twins": v.twins,
            "validation_requests": val,
            "seconds": round(time.perf_counter() - t0, 1), **report}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--version", default="latest")
    p.add_argument("--requests", type=int, default=4000,
                   help="test-month requests in all, split across the tasks as the training ones")
    p.add_argument("--max-users", type=int, default=None,
                   help="the --max-users of the run that trained the version (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "skew_offline.json"))
    opts = p.parse_args(argv)
    res = measure(opts.artifacts, opts.version, opts.requests, opts.seed, opts.max_users)
    res["command"] = "python bench/skew_offline.py " + " ".join(argv or sys.argv[1:])
    print(f"model {res['version']}: {sum(res['requests'].values())} test-month requests "
          f"({', '.join(f'{k} {v}' for k, v in res['requests'].items())}) and "
          f"{res['anonymous_twins']} anonymous twins, "
          f"{res['candidates_binned']:,} candidates, {res['seconds']:.0f}s")
    print(f"status {res['status']}, largest PSI {res['max_psi']:.3f}")
    print(f"{'feature':<20}{'PSI':>8}")
    for f, v in res["psi"].items():
        print(f"{f:<20}{v:>8.3f}")
    print("request mix (training / test month): " + ", ".join(
        f"{k} {v['training']:.0%} / {v['live']:.0%}" for k, v in res["request_mix"].items()))
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
