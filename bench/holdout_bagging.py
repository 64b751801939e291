"""Experiment: average of K LightGBM rankers (different LightGBM seeds, same rows), one merged booster."""
import sys, json, re, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
import numpy as np
import lightgbm as lgb
from ranker_holdout import embeddings, HELD_OUT_SHARE
from graph import ranker_fit
from graph.evaluate import recommender_rankings, validation_tasks
from graph.features import item_features
from graph.ltr import fit_ranker, LearnedRanker
from graph.metrics import summarize
from graph.pipeline import PipelineConfig, prepare_data
from graph.ranking import Ranker
from graph.recommend import Recommender
from graph.signals import fit_signals
from graph.text import ItemText

def merge(models):
    k = len(models)
    strs = [m.booster.model_to_string() for m in models]
    head = strs[0][:strs[0].index("Tree=0")]
    head = "\n".join(l for l in head.split("\n") if not l.startswith("tree_sizes="))
    trees, n = [], 0
    for s in strs:
        body = s[s.index("Tree=0"):s.index("end of trees")]
        for t in re.split(r"\n(?=Tree=\d+\n)", body.strip()):
            lines = t.split("\n")
            lines[0] = f"Tree={n}"; n += 1
            for i, l in enumerate(lines):
                for key in ("leaf_value=", "internal_value="):
                    if l.startswith(key):
                        vals = [float(v) / k for v in l[len(key):].split()]
                        lines[i] = key + " ".join(repr(v) for v in vals)
            trees.append("\n".join(lines))
    tail = strs[0][strs[0].index("end of trees"):]
    text = head + "\n" + "\n\n".join(trees) + "\n\n" + tail
    b = lgb.Booster(model_str=text)
    return LearnedRanker(b, models[0].features, models[0].sources, {"rounds": n})

seeds = [int(a) for a in sys.argv[1:]]
d = prepare_data(PipelineConfig())
fit_emb = embeddings(d, REPO / ".holdout" / "fit_emb.pkl", None)
text = ItemText.build(d.ds.items, progress=lambda m: None)
ranker = Ranker(*fit_emb, fit_signals(d.fit_part, d.inter_full))
static = item_features(d.fit_part, d.ds.items, ranker)
for seed in seeds:
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
    tr, va = ranker_fit.fit_sets(rec, requests, targets, rng)
    singles = [fit_ranker(tr.data, va.data, seed=seed + 1000 * j, progress=print) for j in range(3)]
    models = {"single0": singles[0], "single1": singles[1], "single2": singles[2], "bag3": merge(singles)}
    out = {}
    for name, lr in models.items():
        row = {}
        for q in eval_b:
            ranked, rep = recommender_rankings(rec, q, {name: lr}, 20)
            row[q.name] = summarize(ranked[name], q.targets, 20)["recall@20"]
        out[name] = {"rounds": lr.info["rounds"], "recall@20": row}
        print(seed, name, lr.info["rounds"], " ".join(f"{v:.4f}" for v in row.values()), flush=True)
    json.dump({"seed": seed, "models": out}, open(REPO / f"bench/results/ranker_holdout_bag3_seed{seed}.json", "w"), indent=1)
