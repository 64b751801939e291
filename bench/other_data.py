"""Does intentrec's lead over the baselines hold on data shaped unlike the built-in data?

Quality is judged on data we do not ship. This bench derives retailers unlike the built-in one
from it, writes them as canonical files and runs the default job on each through the path any
other data takes (``train_job.py --events --items --split-at``): new columns missing, another
season, other shoppers. Nothing is tuned on them; the job runs with its defaults.

Variants (``--variant``, repeatable; default: all):

- ``minimal``: only the required columns. Events ``user_id, item_id, ts, event``: no basket ids
  (sessions come from inactivity gaps), no quantity, no price. Items ``item_id, category``: no
  title (the text is the category path), no brand, no price. March to September 2017, split at
  2017-09-01 (the test month is September, not December).
- ``half_summer``: a seeded half of the households with every canonical column, January to
  June 2017, split at 2017-06-01 (the test month is June).

For each variant the bench prints recall@20 of intentrec and of every baseline per task, the
session lift, and whether intentrec beats every baseline in every task, and writes
``bench/results/other_data.json``. Each variant is one default job: about 7 minutes on 2 cores.

    python bench/other_data.py
    python bench/other_data.py --variant minimal --work /tmp/other_data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graph import schema as S  # noqa: E402
from graph.data import Dataset, load_builtin  # noqa: E402


def minimal(ds: Dataset) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    ev = ds.events
    ev = ev[(ev[S.TS_COL] >= "2017-03-01") & (ev[S.TS_COL] < "2017-10-01")]
    ev = ev[[S.USER_COL, S.ITEM_COL, S.TS_COL, S.EVENT_COL]]
    items = ds.items[ds.items[S.ITEM_COL].isin(ev[S.ITEM_COL])][[S.ITEM_COL, S.CATEGORY_COL]]
    return ev, items, "2017-09-01"


def half_summer(ds: Dataset) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    users = np.sort(ds.events[S.USER_COL].unique())
    half = np.random.default_rng(11).choice(users, len(users) // 2, replace=False)
    ev = ds.events
    ev = ev[ev[S.USER_COL].isin(half) & (ev[S.TS_COL] < "2017-07-01")]
    items = ds.items[ds.items[S.ITEM_COL].isin(ev[S.ITEM_COL])]
    items = items.drop(columns=[S.DEPARTMENT_COL], errors="ignore")
    return ev, items, "2017-06-01"


VARIANTS: dict[str, Callable[[Dataset], tuple[pd.DataFrame, pd.DataFrame, str]]] = {
    "minimal": minimal, "half_summer": half_summer,
}
BASELINES = tuple(m for m in S.MODEL_NAMES if m != "intentrec")


def run_variant(name: str, ds: Dataset, work: Path) -> dict[str, Any]:
    """Write the variant's files, run the default job on them, return its recall@20 table."""
    ev, items, split = VARIANTS[name](ds)
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    ev.to_parquet(folder / "events.parquet", index=False)
    items.to_parquet(folder / "items.parquet", index=False)
    cmd = [sys.executable, str(REPO / "train_job.py"), "--events", str(folder / "events.parquet"),
           "--items", str(folder / "items.parquet"), "--split-at", split,
           "--output", str(folder / "artifacts"), "--storage", str(folder / "ckpt")]
    print(f"[{name}] {len(ev):,} events of {ev[S.USER_COL].nunique():,} users, "
          f"{len(items):,} items, columns {list(ev.columns)} / {list(items.columns)}, split {split}")
    print(f"[{name}] {' '.join(cmd[1:])}  (output in {folder / 'job.log'})", flush=True)
    t0 = time.perf_counter()
    with (folder / "job.log").open("w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        raise SystemExit(f"[{name}] train_job.py failed (exit {rc}); see {folder / 'job.log'}")
    version = (folder / "artifacts" / "LATEST").read_text().strip()
    metrics = json.loads((folder / "artifacts" / version / "metrics.json").read_text())
    recall = {m: {t: metrics[m][t]["recall@20"] for t in S.TASKS}
              for m in (*BASELINES, "intentrec")}
    beats = {t: all(recall["intentrec"][t] > recall[b][t] for b in BASELINES) for t in S.TASKS}
    lift = recall["intentrec"]["in_session"] / max(recall["intentrec"]["in_session_blind"], 1e-12)
    # 95% intervals of the lead over each task's best baseline (graph.evaluate.recall_uncertainty).
    lead = {t: {k: u[k] for k in ("best_baseline", "lead", "lead_ci95")}
            for t, u in metrics.get("uncertainty", {}).get("recall@20", {}).items()}
    return {"split_at": split, "events": len(ev), "users": int(ev[S.USER_COL].nunique()),
            "items": len(items), "event_columns": list(ev.columns),
            "item_columns": list(items.columns), "version": version,
            "seconds": round(time.perf_counter() - t0, 1), "recall@20": recall,
            "candidate_recall": {t: metrics["intentrec"][t].get("candidate_recall")
                                 for t in S.TASKS},
            "session_lift": lift - 1.0, "beats_every_baseline": beats, "lead": lead}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                   help="a variant to run (repeatable; default: all)")
    p.add_argument("--work", default="/tmp/intentrec_other_data",
                   help="folder for the variants' files, models and job logs")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "other_data.json"))
    opts = p.parse_args(argv)
    ds = load_builtin()
    res = {n: run_variant(n, ds, Path(opts.work)) for n in (opts.variant or list(VARIANTS))}
    for name, r in res.items():
        print(f"\n{name}: split {r['split_at']}, {r['events']:,} events, {r['users']:,} users, "
              f"{r['items']:,} items, {r['seconds']:.0f}s")
        print(f"{'recall@20':<12}" + "".join(f"{t:>24}" for t in S.TASKS))
        for m, row in r["recall@20"].items():
            print(f"{m:<12}" + "".join(f"{row[t]:>24.4f}" for t in S.TASKS))
        best = {t: max(r["recall@20"][b][t] for b in BASELINES) for t in S.TASKS}
        print(f"{'vs best base':<12}" + "".join(
            f"{r['recall@20']['intentrec'][t] / max(best[t], 1e-12) - 1:>+24.1%}" for t in S.TASKS))
        if r["lead"]:
            print(f"{'lead 95%':<12}" + "".join(
                f"{'[{:+.4f}, {:+.4f}]'.format(*r['lead'][t]['lead_ci95']):>24}" for t in S.TASKS))
        print(f"session lift {r['session_lift']:+.1%}; intentrec beats every baseline in every "
              f"task: {'yes' if all(r['beats_every_baseline'].values()) else 'NO'}")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"variants": res, "python": platform.python_version(),
                               "machine": platform.machine(), "cpus": os.cpu_count(),
                               "load_average": os.getloadavg()}, indent=2))
    print(f"\nwritten to {out}")
    return 0 if all(all(r["beats_every_baseline"].values()) for r in res.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
