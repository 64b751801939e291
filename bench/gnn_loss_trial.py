"""GNN-only trial: train on events before the validation cut, report embedding recall@20 on all
validation users (next_basket_all twin) per epoch and at the end (also discovery)."""
import json, sys, time, os
sys.path.insert(0, "/work/main")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import numpy as np, torch
import train_job
from graph.config import TrainConfig
from graph.pipeline import PipelineConfig, prepare_data
from graph.train_loop import fit, format_progress
from graph.validation import validation_sample, embedding_recall, ValidationSample
from graph.tasks import next_basket_tasks

name = sys.argv[1]
over = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
d = prepare_data(PipelineConfig(), progress=lambda m: None)
val = validation_sample(d.fit_part, d.val_part, d.inter_fit, d.val_cut, seed=0, max_users=5000)
train_job.init_ray(None)
cfg = TrainConfig(storage_path=f"/tmp/gnn/ckpt_{name}", **over)
t0 = time.time()
res = fit(d.inter_fit, cfg, progress=lambda m: print("[train] " + format_progress(m), flush=True), validation=val)
u, i = res.user_emb, res.item_emb
nb, disc = next_basket_tasks(d.fit_part, d.val_part, d.inter_fit, d.val_cut, seed=0, max_users=5000)
def rec(q, excl):
    U = torch.from_numpy(u); I = torch.from_numpy(i)
    out = []
    for b in range(0, len(q.users), 256):
        s = U[q.users[b:b+256]] @ I.T
        if excl:
            for j, ex in enumerate(q.exclude[b:b+256]):
                s[j, torch.from_numpy(ex)] = -1e9
        top = s.topk(20, dim=1).indices.numpy()
        for j, t in enumerate(q.targets[b:b+256]):
            out.append(len(np.intersect1d(top[j], t)) / len(t))
    return float(np.mean(out))
r = {"name": name, "over": over, "nb": rec(nb, False), "disc": rec(disc, True),
     "hist": [h.get("val_recall@20") for h in res.history], "s": time.time() - t0}
print("RESULT", json.dumps(r), flush=True)
open("/tmp/gnn/results.jsonl", "a").write(json.dumps(r) + "\n")
if over.get("loss") == "cosine":
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-9)
    i = i / np.maximum(np.linalg.norm(i, axis=1, keepdims=True), 1e-9)
    r2 = {"name": name + "_normed", "nb": rec(nb, False), "disc": rec(disc, True)}
    print("RESULT", json.dumps(r2), flush=True)
    open("/tmp/gnn/results.jsonl", "a").write(json.dumps(r2) + "\n")
