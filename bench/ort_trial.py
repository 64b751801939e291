"""Experiment: ONNX Runtime against LightGBM for the cascade's three stages, on real candidate rows of
300 requests of the full default model (needs `pip install --target /tmp/ortpkgs onnxruntime onnxmltools onnx`).

    python bench/ort_trial.py   # artifacts in /tmp/full13/artifacts
"""
import os, sys, time
for v in ("OMP_NUM_THREADS","MKL_NUM_THREADS","OPENBLAS_NUM_THREADS"): os.environ[v]="1"
sys.path.insert(0, "/work/main"); sys.path.append("/tmp/ortpkgs")
import numpy as np
from actors.ranker import RankerService, RankQuery, _limit_threads
from graph.recommend import Request
_limit_threads()
svc = RankerService("/tmp/full13/artifacts")
m = svc.model; cat = m.catalogue
lr = m.rec.learned if hasattr(m.rec, "learned") else None
print([a for a in dir(m.rec) if not a.startswith("__")][:40])
lr = m.rec.learned
booster = lr.booster
trees = booster.num_trees()
print("trees", trees)
users = list(m.user_index)[:150]
popular = [int(i) for i in cat.popular[:50]]
rng = np.random.default_rng(0)
t0 = 1_512_000_000.0
X = []; G = []
for u in users:
    for cart in [(), tuple((popular[j], "add_to_cart", t0) for j in rng.choice(50, 3, replace=False))]:
        p = m.rec.prepare(Request(user=m.user_index[u], item_events=cart, context=None, now=t0, k=20))
        X.append(p.x if hasattr(p, "x") else p.features); G.append(len(X[-1]))
xs = [x[:, lr._cols].astype(np.float64) for x in X]
print("requests", len(xs), "mean rows", np.mean(G))
import lightgbm as lgb
stages = [(0, 20), (20, 80), (80, trees)]
keep = [None, 100, 50]
def lgb_run():
    for x in xs:
        a = booster.predict(x, start_iteration=0, num_iteration=20, pred_leaf=True)
        b = booster.predict(x[:100], start_iteration=20, num_iteration=60, pred_leaf=True)
        c = booster.predict(x[:50], start_iteration=80, num_iteration=trees-80, pred_leaf=True)
def lgb_raw():
    for x in xs:
        a = booster.predict(x, start_iteration=0, num_iteration=20, raw_score=True)
        b = booster.predict(x[:100], start_iteration=20, num_iteration=60, raw_score=True)
        c = booster.predict(x[:50], start_iteration=80, num_iteration=trees-80, raw_score=True)
import onnxmltools, onnxruntime as ort
from onnxmltools.convert.common.data_types import FloatTensorType
sess = []
for s, e in stages:
    b = lgb.Booster(model_str=booster.model_to_string(start_iteration=s, num_iteration=e - s))
    onx = onnxmltools.convert_lightgbm(b, initial_types=[("x", FloatTensorType([None, xs[0].shape[1]]))], target_opset=15, zipmap=False)
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    sess.append(ort.InferenceSession(onx.SerializeToString(), so, providers=["CPUExecutionProvider"]))
xf = [x.astype(np.float32) for x in xs]
def ort_run():
    for x in xf:
        a = sess[0].run(None, {"x": x}); b = sess[1].run(None, {"x": x[:100]}); c = sess[2].run(None, {"x": x[:50]})
# parity
full_l = booster.predict(xs[1], raw_score=True)
sc = sum(s.run(None, {"x": xf[1]})[0].ravel() for s in sess)
print("max diff onnx vs lgb raw", np.abs(sc - full_l).max())
for name, f in [("lgb pred_leaf", lgb_run), ("lgb raw", lgb_raw), ("ort", ort_run)]:
    best = 1e9
    for _ in range(3):
        c = time.process_time(); f(); best = min(best, time.process_time() - c)
    print(f"{name}: {best / len(xs) * 1000:.3f} ms per request")
def ort_plus_leaves():
    for x, x64 in zip(xf, xs):
        a = sess[0].run(None, {"x": x}); b = sess[1].run(None, {"x": x[:100]}); c = sess[2].run(None, {"x": x[:50]})
        d = booster.predict(x64[:20], pred_leaf=True)
for name, f in [("lgb pred_leaf", lgb_run), ("ort + top-20 leaves", ort_plus_leaves)]:
    best = 1e9
    for _ in range(3):
        c = time.process_time(); f(); best = min(best, time.process_time() - c)
    print(f"{name}: {best / len(xs) * 1000:.3f} ms per request")
