"""Experiment: per-call CPU of the ranker steps rewritten without scipy constructors (session matrix,
candidate columns of a sparse component, Reasons.build), for the code tree given as argv[1].

    python bench/ranker_steps_micro.py /path/to/tree   # model in /tmp/full13/artifacts
"""
import os, sys, time
for v in ("OMP_NUM_THREADS","MKL_NUM_THREADS","OPENBLAS_NUM_THREADS"): os.environ[v]="1"
sys.path.insert(0, sys.argv[1])
import numpy as np
from actors.ranker import RankerService, _limit_threads
from actors.explain import Reasons
from graph.ranking import SessionSignal, repeat_scores, _dense
_limit_threads()
svc = RankerService("/tmp/full13/artifacts"); m = svc.model; r = m.ranker
items = np.array(sorted(m.catalogue.popular[:3]), dtype=np.int64)
sess = SessionSignal(items, np.array([1.0, 0.5, 0.8], np.float32))
top = np.array(m.catalogue.popular[10:30], dtype=np.int64)
cand = np.unique(np.array(m.catalogue.popular[:450], dtype=np.int64))
users = np.array([5])
def t(name, f, n=3000):
    f(); best=1e9
    for _ in range(3):
        c=time.process_time()
        for _ in range(n): f()
        best=min(best,(time.process_time()-c)/n*1e6)
    print(f"{name}: {best:.1f} us")
t("session_matrix", lambda: r._session_matrix([sess]))
rs = repeat_scores(r.signals, users)
t("_dense(repeat)", lambda: _dense(rs, cand))
t("Reasons.build", lambda: Reasons.build(m, 5, sess, [], None, None, top))
