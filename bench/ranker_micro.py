import os, sys, time
for v in ("OMP_NUM_THREADS","MKL_NUM_THREADS","OPENBLAS_NUM_THREADS"): os.environ[v]="1"
sys.path.insert(0, "/work/main")
import numpy as np, scipy.sparse as sp
from actors.ranker import RankerService, _limit_threads
from graph.ranking import SessionSignal, repeat_scores, basket_scores, _dense
_limit_threads()
svc = RankerService("/tmp/full13/artifacts"); m = svc.model; r = m.ranker
items = np.array(sorted(m.catalogue.popular[:3]), dtype=np.int64)
sess = SessionSignal(items, np.array([1.0, 0.5, 0.8], np.float32))
top = np.array(m.catalogue.popular[10:30], dtype=np.int64)
cand = np.unique(np.array(m.catalogue.popular[:450], dtype=np.int64))
users = np.array([5])
def t(name, f, n=2000):
    f(); c=time.process_time()
    for _ in range(n): f()
    print(f"{name}: {(time.process_time()-c)/n*1e6:.1f} us")
t("session_matrix", lambda: r._session_matrix([sess]))
smat = r._session_matrix([sess])
t("item_sim[rows][:, top].toarray", lambda: r.signals.item_sim[sess.items][:, top].toarray())
t("repeat_scores", lambda: repeat_scores(r.signals, users))
rs = repeat_scores(r.signals, users)
t("_dense(repeat)", lambda: _dense(rs, cand))
t("basket_scores", lambda: basket_scores(r.signals, users, smat))
t("np.full 92k", lambda: np.full(r.num_items, -1, dtype=np.int64))
