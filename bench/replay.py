"""Online/offline parity: replay held-out in-session baskets over real HTTP and compare recall.

For a seeded sample of the test window's in-session baskets (the protocol's ``in_session`` task,
same seed and sampling as ``train_job.py``), each basket's revealed half is posted to a running
endpoint as ``add_to_cart`` events of a fresh session, then ``POST /v1/recommendations`` asks for
20 items at the basket's time (``context.ts``). Recall@20 of what the endpoint returned is
compared with the offline figure on the same baskets, computed in this process by
:meth:`graph.recommend.Recommender.recommend` on the same model version. They must agree within
0.005 (they are the same function; the difference measures the online path's translation).

    python bench/replay.py --url http://127.0.0.1:8000 --artifacts artifacts --baskets 300

Events are posted without ``ts``, so the server stamps them with its own clock: a session event
is never older than the request time, as offline (the in-session task reveals items at the
basket's time). The data are rebuilt from the version's manifest (its data set and sampling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def replay(url: str, artifacts: str, *, version: str = "latest", baskets: int = 300,
           seed: int = 0, api_key: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Run the parity check; returns the offline and online recall@20 and their difference."""
    import httpx
    import numpy as np
    import pandas as pd

    from graph.artifacts import read_artifact
    from graph.metrics import recall_at_k
    from graph.pipeline import PipelineConfig, prepare_data
    from graph.ranking import Ranker
    from graph.recommend import Recommender
    from graph.tasks import in_session_tasks

    art = read_artifact(artifacts, version)
    cfg = PipelineConfig.model_validate(art.manifest["config"])
    d = prepare_data(cfg, progress=lambda _line: None)
    if list(d.inter_full.item_ids) != art.items["item_id"].astype(str).tolist():
        raise SystemExit("the artifact's catalogue differs from the data its manifest names")
    rec = Recommender.build(art.items, Ranker(art.user_emb, art.item_emb, art.signals),
                            art.item_static, art.learned, text=art.text)
    ins, _ = in_session_tasks(d.test, d.inter_full, country=art.signals.params.country,
                              seed=seed, max_baskets=baskets)
    item_ids = art.items["item_id"].astype(str).to_numpy()
    user_ids = art.user_ids
    headers = {"X-API-Key": api_key} if api_key else {}
    offline = np.full((len(ins), 20), -1, dtype=np.int64)
    online = np.full((len(ins), 20), -1, dtype=np.int64)
    index = {it: i for i, it in enumerate(item_ids.tolist())}
    t0 = time.perf_counter()
    with httpx.Client(timeout=timeout, headers=headers) as client:
        for b, req in enumerate(ins.requests(20)):
            top = rec.recommend(req, explain=False).items
            offline[b, : len(top)] = top
            sid = f"replay-{uuid.uuid4().hex[:12]}"
            user = None if req.user is None else str(user_ids[req.user])
            # The basket's device and region, where the data has them: on its events and its
            # request, as a shop's client would send them.
            where = {} if req.context is None else {
                k: v for k, v in (("device", req.context.device), ("region", req.context.region))
                if v}
            events = [{"session_id": sid, "event": ev, "item_id": str(item_ids[i]), **where,
                       **({"user_id": user} if user else {})} for i, ev, _ in req.item_events]
            r = client.post(f"{url}/v1/events", json={"events": events})
            r.raise_for_status()
            ts = pd.Timestamp(req.now, unit="s").isoformat()
            body = {"session_id": sid, "k": 20, "context": {"ts": ts, **where},
                    **({"user_id": user} if user else {})}
            r = client.post(f"{url}/v1/recommendations", json=body)
            r.raise_for_status()
            got = [index[it["item_id"]] for it in r.json()["items"]]
            online[b, : len(got)] = got
    off = float(recall_at_k(offline, ins.targets, 20).mean()) if len(ins) else float("nan")
    on = float(recall_at_k(online, ins.targets, 20).mean()) if len(ins) else float("nan")
    same = float(np.mean([set(a[a >= 0].tolist()) == set(o[o >= 0].tolist())
                          for a, o in zip(offline, online, strict=True)])) if len(ins) else 0.0
    return {"version": art.version, "baskets": len(ins), "seed": seed,
            "offline_recall@20": off, "online_recall@20": on, "abs_difference": abs(on - off),
            "identical_top20_share": same, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--artifacts", default="artifacts", help="artifact root the endpoint serves")
    p.add_argument("--version", default="latest")
    p.add_argument("--baskets", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="client key when the endpoint requires one")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "replay.json"))
    opts = p.parse_args(argv)
    res = replay(opts.url, opts.artifacts, version=opts.version, baskets=opts.baskets,
                 seed=opts.seed, api_key=opts.api_key)
    res["command"] = "python bench/replay.py " + " ".join(argv or sys.argv[1:])
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k.ljust(width)}  {v:.4f}" if isinstance(v, float) else f"{k.ljust(width)}  {v}")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(res, indent=2))
    ok = res["abs_difference"] <= 0.005
    print("parity: " + ("OK" if ok else "FAILED") + " (|online - offline| <= 0.005)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
