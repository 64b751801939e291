"""GNN trial: BPR on user-item edges plus a basket-completion term (a session-aware objective).

Trains the job's IntentGNN in one process (two torch threads, the job's global batch of
2 x 8,192) on the events before the validation cut, with an added BPR term over item pairs of
the same basket: ``w * BPR(item_a . item_b  >  item_a . item_neg)``, where ``b`` was bought in
the same basket as ``a`` and ``neg`` is a uniform item. ``w = 0`` is the job's objective.

Measures, from the embeddings alone, over the validation window: next-basket recall@20 (all
and discovery: every validation shopper) and in-session recall@20 (the mean vector of a basket's
revealed half ranking the catalogue, revealed items excluded). Writes the embeddings as a
pickle for ``bench/ranker_holdout.py --emb-cache`` and appends a JSON line to
``bench/results/gnn_basket_trials.jsonl``.

    python bench/gnn_basket_trial.py NAME WEIGHT [EPOCHS]
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graph import schema as S  # noqa: E402
from graph.config import TrainConfig  # noqa: E402
from graph.model import bpr_loss, export_embeddings  # noqa: E402
from graph.pipeline import PipelineConfig, prepare_data  # noqa: E402
from graph.tasks import in_session_tasks, next_basket_tasks  # noqa: E402
from graph.training import (  # noqa: E402
    epoch_batches,
    graph_payload,
    has_edges,
    make_optimizer,
    seed_everything,
    setup_worker,
)

PAIRS_PER_BASKET = 30


def basket_pairs(fit_part, inter, rng) -> np.ndarray:
    """Ordered (a, b) item-index pairs of the same basket, up to PAIRS_PER_BASKET per basket."""
    idx = inter.item_index()
    ev = fit_part[fit_part[S.EVENT_COL] == S.PURCHASE] if S.EVENT_COL in fit_part else fit_part
    items = ev[S.ITEM_COL].map(idx)
    ok = items.notna().to_numpy()
    sess = ev[S.SESSION_COL].to_numpy()[ok]
    items = items.to_numpy()[ok].astype(np.int64)
    order = np.argsort(sess, kind="stable")
    sess, items = sess[order], items[order]
    bounds = np.flatnonzero(np.r_[True, sess[1:] != sess[:-1], True])
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        its = np.unique(items[lo:hi])
        n = len(its)
        if n < 2:
            continue
        m = min(PAIRS_PER_BASKET, n * (n - 1))
        a = rng.integers(0, n, m)
        b = (a + rng.integers(1, n, m)) % n
        out.append(np.stack([its[a], its[b]]))
    return np.concatenate(out, axis=1)


def main() -> None:
    name, weight = sys.argv[1], float(sys.argv[2])
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    torch.set_num_threads(2)
    d = prepare_data(PipelineConfig(), progress=lambda m: None)
    inter = d.inter_fit
    cfg = TrainConfig(batch_size=16384, epochs=epochs, storage_path="/tmp/gnn_basket")
    payload = graph_payload(inter)
    w = setup_worker(payload, cfg, torch.device("cpu"), 0)
    model, adj, edge_index, sampler = w.model, w.adj, w.edge_index, w.sampler
    opt = make_optimizer(model, cfg)
    rng = np.random.default_rng([cfg.seed, 99])
    pairs = basket_pairs(d.fit_part, inter, rng) if weight > 0 else np.zeros((2, 0), np.int64)
    print(f"[{name}] {edge_index.shape[1]:,} edges, {pairs.shape[1]:,} basket pairs, w={weight}",
          flush=True)
    t0 = time.time()
    seed_everything(cfg.seed)
    for epoch in range(1, cfg.epochs + 1):
        te = time.time()
        erng = np.random.default_rng([cfg.seed, epoch, 1, 0])
        model.train()
        tot, seen = 0.0, 0
        for batch in epoch_batches(edge_index.shape[1], cfg.batch_size, epoch, cfg.seed):
            users, pos = edge_index[0, batch], edge_index[1, batch]
            neg = sampler.sample(users, cfg.num_negatives, erng)
            mask = torch.from_numpy(erng.random(inter.num_items) < cfg.id_dropout)
            ue, ie = model(adj, id_dropout_mask=mask)
            loss = bpr_loss(ue[torch.from_numpy(users)], ie[torch.from_numpy(pos)],
                            ie[torch.from_numpy(neg)], cfg.reg)
            if weight > 0:
                pick = erng.integers(0, pairs.shape[1], len(batch))
                a, b = pairs[0, pick], pairs[1, pick]
                n = erng.integers(0, inter.num_items, len(batch))
                loss = loss + weight * bpr_loss(ie[torch.from_numpy(a)], ie[torch.from_numpy(b)],
                                                ie[torch.from_numpy(n)], cfg.reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(batch)
            seen += len(batch)
        print(f"[{name}] epoch {epoch}/{cfg.epochs} loss {tot / seen:.4f} "
              f"{time.time() - te:.1f}s", flush=True)
    users_trained, items_trained = has_edges(payload)
    u, i = export_embeddings(model, adj, items_trained, users_trained)
    train_s = time.time() - t0

    nb, disc = next_basket_tasks(d.fit_part, d.val_part, inter, d.val_cut, seed=0, max_users=5000)
    ins, _ = in_session_tasks(d.val_part, inter, seed=0)
    U, Iv = torch.from_numpy(u), torch.from_numpy(i)

    def recall(q, vecs: torch.Tensor) -> float:
        out = []
        for lo in range(0, len(q.targets), 256):
            s = vecs[lo:lo + 256] @ Iv.T
            for j, ex in enumerate(q.exclude[lo:lo + 256]):
                if ex is not None and len(ex):
                    s[j, torch.from_numpy(np.asarray(ex, np.int64))] = -1e9
            top = s.topk(20, dim=1).indices.numpy()
            for j, t in enumerate(q.targets[lo:lo + 256]):
                out.append(len(np.intersect1d(top[j], t)) / len(t))
        return float(np.mean(out))

    sess = torch.stack([Iv[torch.tensor([e[0] for e in evs])].mean(0) for evs in ins.events])
    r = {"name": name, "weight": weight, "epochs": epochs,
         "next_basket_all": recall(nb, U[torch.from_numpy(nb.users)]),
         "discovery": recall(disc, U[torch.from_numpy(disc.users)]),
         "in_session_emb": recall(ins, sess), "train_s": round(train_s, 1)}
    print("RESULT", json.dumps(r), flush=True)
    with (REPO / "bench" / "results" / "gnn_basket_trials.jsonl").open("a") as f:
        f.write(json.dumps(r) + "\n")
    out = REPO / ".holdout" / f"fit_emb_{name}.pkl"
    with out.open("wb") as f:
        pickle.dump((u, i), f)
    print(f"[{name}] embeddings -> {out}", flush=True)


if __name__ == "__main__":
    main()
