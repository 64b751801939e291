"""Experiment: one ranker for requests with a session, another for those without."""
import sys, json, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1])); sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from pathlib import Path
import numpy as np
from ranker_holdout import embeddings, HELD_OUT_SHARE
from graph import ranker_fit
from graph.evaluate import recommender_rankings, validation_tasks
from graph.features import item_features
from graph.ltr import fit_ranker
from graph.metrics import summarize
from graph.pipeline import PipelineConfig, prepare_data
from graph.ranking import Ranker
from graph.recommend import Recommender
from graph.signals import fit_signals
from graph.text import ItemText

seed = int(sys.argv[1])
d = prepare_data(PipelineConfig())
fit_emb = embeddings(d, Path(".holdout/fit_emb.pkl"), None)
text = ItemText.build(d.ds.items, progress=lambda m: None)
ranker = Ranker(*fit_emb, fit_signals(d.fit_part, d.inter_full))
static = item_features(d.fit_part, d.ds.items, ranker)
tasks = validation_tasks(d.fit_part, d.val_part, d.inter_full, d.val_cut,
                         country=ranker.signals.params.country, seed=seed)
users = np.unique(np.concatenate([q.users for q in tasks]))
held = np.random.default_rng(seed + 7).choice(users, int(len(users) * HELD_OUT_SHARE), replace=False)
fit_b = [q.take(np.flatnonzero(~np.isin(q.users, held))) for q in tasks]
eval_b = [q.take(np.flatnonzero(np.isin(q.users, held))) for q in tasks]
rec = Recommender.build(d.ds.items, ranker, static, text=text)
rng = np.random.default_rng(seed)
requests, targets = [], []
for q in fit_b:
    reqs = q.requests()
    if q.name == "in_session":
        reqs = ranker_fit.simulate_queries(reqs, q.targets, rec.catalogue.categories, rec.catalogue.titles, rng)
    requests += reqs
    targets += q.targets
tr, va = ranker_fit.fit_sets(rec, requests, targets, rng, progress=print)
# recover the split used by fit_sets: redo it identically
rng2 = np.random.default_rng(seed)
for q in fit_b:
    if q.name == "in_session":
        ranker_fit.simulate_queries(q.requests(), q.targets, rec.catalogue.categories, rec.catalogue.titles, rng2)
ranker_fit.label(rec, requests, targets, rng2)
tr_idx, va_idx = ranker_fit.split_requests(requests, rng2)
has = np.array([bool(r.item_events) for r in requests])
out = {}
models = {}
for name, want in (("sess", True), ("nosess", False)):
    a = np.flatnonzero(has[tr_idx] == want); b = np.flatnonzero(has[va_idx] == want)
    models[name] = fit_ranker(tr.data.subset(a), va.data.subset(b), seed=seed, progress=print)
for q in eval_b:
    name = "sess" if q.name == "in_session" else "nosess"
    ranked, rep = recommender_rankings(rec, q, {name: models[name]}, 20)
    m = summarize(ranked[name], q.targets, 20)
    out[q.name] = m["recall@20"]
    print(q.name, name, round(m["recall@20"], 4))
json.dump({"seed": seed, "recall@20": out, "rounds": {k: v.info["rounds"] for k, v in models.items()}},
          open(f"bench/results/ranker_holdout_split_models_seed{seed}.json", "w"), indent=1)
