"""IntentGNN, its adjacency, loss, sampler and the in-process epoch loop on tiny graphs.

No Ray: ``graph.training`` (set-up, ``train_epoch``, checkpoints) is the code the Ray workers
run; ``graph.train_loop`` only wires it into Ray Train.
"""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from graph.config import TrainConfig
from graph.errors import ConfigError, DataError, UnavailableError
from graph.interactions import Interactions
from graph.model import (
    IntentGNN,
    NegativeSampler,
    bpr_loss,
    build_adjacency,
    export_embeddings,
)
from graph.train_loop import TrainResult, embed, fit, worker_cpus
from graph.training import (
    build_graph_adjacency,
    build_model,
    check_compatible,
    epoch_batches,
    graph_payload,
    load_meta,
    load_state,
    make_optimizer,
    make_payload,
    model_args,
    save_state,
    setup_worker,
    train_epoch,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def random_payload(
    num_users: int = 7, num_items: int = 11, num_edges: int = 25, seed: int = 0
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    keys = rng.choice(num_users * num_items, size=num_edges, replace=False)
    edge_index = np.stack([keys // num_items, keys % num_items]).astype(np.int64)
    cards = [4, 3]
    feats = np.stack([rng.integers(0, c, num_items) for c in cards], axis=1).astype(np.int64)
    return {
        "edge_index": edge_index,
        "edge_weight": rng.uniform(0.5, 5.0, num_edges).astype(np.float32),
        "item_features": feats,
        "feature_cardinalities": cards,
        "num_users": num_users,
        "num_items": num_items,
    }


def clustered_payload(
    groups: int = 3, users_per: int = 6, warm_per: int = 8, cold_per: int = 2, seed: int = 0
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Users buy items of their own group; each group also has cold items (no edges).

    Feature 0 is the group (so it carries the signal), feature 1 is noise. Cold items are
    the last ``groups * cold_per`` items. Returns (payload, user_group, item_group).
    """
    rng = np.random.default_rng(seed)
    num_users, num_warm = groups * users_per, groups * warm_per
    num_items = num_warm + groups * cold_per
    user_group = np.repeat(np.arange(groups), users_per)
    item_group = np.concatenate(
        [np.repeat(np.arange(groups), warm_per), np.repeat(np.arange(groups), cold_per)]
    )
    pairs = [
        (u, i)
        for u in range(num_users)
        for i in range(num_warm)
        if item_group[i] == user_group[u] and rng.random() < 0.6
    ]
    edge_index = np.array(pairs, dtype=np.int64).T
    feats = np.stack([item_group + 1, rng.integers(1, 4, num_items)], axis=1).astype(np.int64)
    payload = {
        "edge_index": edge_index,
        "edge_weight": np.ones(edge_index.shape[1], dtype=np.float32),
        "item_features": feats,
        "feature_cardinalities": [groups + 1, 4],
        "num_users": num_users,
        "num_items": num_items,
    }
    return payload, user_group, item_group


def small_cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "dim": 16,
        "num_layers": 2,
        "batch_size": 16,
        "lr": 0.05,
        "reg": 1e-4,
        "id_dropout": 0.3,
        "storage_path": "/tmp/intentrec-unit-unused",
        "num_workers": 1,
    }
    base.update(kw)
    return TrainConfig(**base)


def run_epochs(
    payload: dict[str, Any], cfg: TrainConfig, epochs: range
) -> tuple[IntentGNN, torch.optim.Optimizer, list[float]]:
    model = build_model(payload, cfg)
    optimizer = make_optimizer(model, cfg)
    adj = build_graph_adjacency(payload)
    sampler = NegativeSampler(payload["edge_index"], payload["num_items"])
    losses = [
        train_epoch(model, optimizer, adj, payload["edge_index"], sampler, cfg, e).loss
        for e in epochs
    ]
    return model, optimizer, losses


# --- adjacency ------------------------------------------------------------------------


def test_adjacency_is_symmetric_normalised_and_in_bounds() -> None:
    p = random_payload()
    num_users, num_items = p["num_users"], p["num_items"]
    ei = torch.from_numpy(p["edge_index"])
    w = torch.from_numpy(p["edge_weight"])
    adj = build_adjacency(ei, w, num_users, num_items)
    n = num_users + num_items
    assert adj.layout == torch.sparse_csr
    assert adj.shape == (n, n)
    assert adj._nnz() == 2 * ei.size(1)
    dense = adj.to_dense()
    assert torch.allclose(dense, dense.T)
    # No user-user or item-item block, no self loops.
    assert dense[:num_users, :num_users].abs().sum() == 0
    assert dense[num_users:, num_users:].abs().sum() == 0
    # D^-1/2 A D^-1/2 with log1p-compressed weights, computed densely.
    a = torch.zeros(n, n)
    a[ei[0], ei[1] + num_users] = torch.log1p(w)
    a = a + a.T
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    assert torch.allclose(dense, inv[:, None] * a * inv[None, :], atol=1e-6)


def test_adjacency_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        build_adjacency(torch.zeros(3, 4, dtype=torch.long), None, 2, 2)


# --- model ----------------------------------------------------------------------------


def test_forward_shapes_and_finite() -> None:
    p = random_payload()
    model = build_model(p, small_cfg())
    user_emb, item_emb = model(build_graph_adjacency(p))
    assert user_emb.shape == (p["num_users"], 16)
    assert item_emb.shape == (p["num_items"], 16)
    assert torch.isfinite(user_emb).all() and torch.isfinite(item_emb).all()


def test_propagation_matches_dense_lightgcn() -> None:
    p = random_payload()
    model = build_model(p, small_cfg(num_layers=3))
    adj = build_graph_adjacency(p)
    user_emb, item_emb = model(adj)
    x = model.layer0()
    dense = adj.to_dense()
    layers = [x]
    for _ in range(3):
        layers.append(dense @ layers[-1])
    expected = torch.stack(layers).mean(0)
    assert torch.allclose(torch.cat([user_emb, item_emb]), expected, atol=1e-5)


def test_symmetric_backward_matches_dense_gradient() -> None:
    p = random_payload()
    model = build_model(p, small_cfg())
    adj = build_graph_adjacency(p)
    user_emb, item_emb = model(adj)
    (user_emb.sum() + item_emb.pow(2).sum()).backward()
    grad_sparse = model.item_emb.weight.grad.clone()

    model.zero_grad()
    dense = adj.to_dense()
    x = model.layer0()
    layers = [x]
    for _ in range(model.num_layers):
        layers.append(dense @ layers[-1])
    out = torch.stack(layers).mean(0)
    (out[: p["num_users"]].sum() + out[p["num_users"] :].pow(2).sum()).backward()
    assert torch.allclose(grad_sparse, model.item_emb.weight.grad, atol=1e-6)


def test_same_seed_same_model_different_seed_differs() -> None:
    p = random_payload()
    adj = build_graph_adjacency(p)
    a = build_model(p, small_cfg(seed=3))(adj)
    b = build_model(p, small_cfg(seed=3))(adj)
    c = build_model(p, small_cfg(seed=4))(adj)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_feature_codes_out_of_range_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"feature_cardinalities\[0\] is 3"):
        IntentGNN(2, 3, [3], item_features=torch.tensor([[0], [1], [3]]))
    with pytest.raises(ValueError, match="2 feature_cardinalities"):
        IntentGNN(2, 3, [3, 3], item_features=torch.zeros(3, 1, dtype=torch.long))


def test_id_dropout_mask_zeroes_only_the_id_part() -> None:
    p = random_payload()
    model = build_model(p, small_cfg())
    mask = torch.zeros(p["num_items"], dtype=torch.bool)
    mask[2] = True
    x0 = model.layer0(mask)
    u = p["num_users"]
    assert torch.allclose(x0[u + 2], model.item_feature_embedding()[2])
    assert torch.allclose(x0[u + 3], model.item_emb.weight[3] + model.item_feature_embedding()[3])


# --- loss -----------------------------------------------------------------------------


def test_bpr_loss_values() -> None:
    u = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[2.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0]])
    expected = -torch.nn.functional.logsigmoid(torch.tensor(2.0))
    assert torch.allclose(bpr_loss(u, pos, neg, reg=0.0), expected)
    # reg * (|u|^2 + |p|^2 + |n|^2) / 2B
    assert torch.allclose(bpr_loss(u, pos, neg, reg=0.1), expected + 0.1 * (1 + 4 + 1) / 2)
    # K negatives: [B, K, d] averages over K.
    negs = torch.stack([neg, pos], dim=1)
    two = bpr_loss(u, pos, negs, reg=0.0)
    one_each = (expected - torch.nn.functional.logsigmoid(torch.tensor(0.0))) / 2
    assert torch.allclose(two, one_each)


# --- negative sampling ----------------------------------------------------------------


def test_negative_sampler_never_returns_a_positive() -> None:
    # Dense graph: each user has ~80% of the items, so most raw draws are positives.
    rng = np.random.default_rng(1)
    num_users, num_items = 20, 10
    dense = rng.random((num_users, num_items)) < 0.8
    dense[:, 0] = False  # every user keeps at least one negative
    users, items = np.nonzero(dense)
    sampler = NegativeSampler(np.stack([users, items]), num_items)
    batch_users = rng.integers(0, num_users, 5000)
    neg = sampler.sample(batch_users, 3, np.random.default_rng(2))
    assert neg.shape == (5000, 3)
    assert neg.min() >= 0 and neg.max() < num_items
    assert not dense[batch_users[:, None], neg].any()
    assert sampler.is_positive(users, items).all()


def test_negative_sampler_rejects_user_with_every_item() -> None:
    with pytest.raises(ValueError, match="all 3 items"):
        NegativeSampler(np.array([[0, 0, 0, 1], [0, 1, 2, 0]]), 3)


# --- batching -------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_batches_partition_edges_with_equal_step_counts(world_size: int) -> None:
    per_rank = [epoch_batches(101, 16, epoch=4, seed=7, rank=r, world_size=world_size)
                for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1  # DDP: same number of steps on every rank
    # batch_size is per rank: more workers, fewer steps.
    assert len(per_rank[0]) == {1: 7, 2: 4, 3: 3}[world_size]
    assert max(len(batch) for b in per_rank for batch in b) <= 17
    flat = np.concatenate([np.concatenate(b) for b in per_rank])
    assert sorted(flat.tolist()) == list(range(101))
    assert all(len(batch) > 0 for b in per_rank for batch in b)
    again = epoch_batches(101, 16, epoch=4, seed=7, rank=0, world_size=world_size)
    other = epoch_batches(101, 16, epoch=5, seed=7, rank=0, world_size=world_size)
    assert all(np.array_equal(x, y) for x, y in zip(again, per_rank[0], strict=True))
    assert not np.array_equal(np.concatenate(other), np.concatenate(again))


# --- training -------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (``from graph import x`` gives
    ``graph.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "graph":
                found.update(f"graph.{alias.name}" for alias in node.names)
    return found


def test_training_code_does_not_import_ray() -> None:
    # bench/gpu_check.py runs graph.training on machines where Ray is not installed: walk the
    # project modules it reaches (statically: a subprocess that imports torch takes seconds).
    todo = [REPO_ROOT / "bench" / "gpu_check.py", REPO_ROOT / "graph" / "training.py"]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        imports = _imports(path)
        assert not {m for m in imports if m == "ray" or m.startswith("ray.")}, path
        todo += [REPO_ROOT / f"{m.replace('.', '/')}.py" for m in imports
                 if m.startswith("graph.") and (REPO_ROOT / f"{m.replace('.', '/')}.py").is_file()]
    assert REPO_ROOT / "graph" / "model.py" in seen and REPO_ROOT / "graph" / "config.py" in seen


def test_setup_worker_builds_the_same_model_on_every_rank() -> None:
    p = random_payload()
    cfg = small_cfg(seed=3)
    threads = torch.get_num_threads()
    try:  # on the CPU, setup_worker sets the process's torch threads
        ranks = [setup_worker(p, cfg, torch.device("cpu"), rank=r) for r in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    first, second = (w.model.state_dict() for w in ranks)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    w = ranks[0]
    assert torch.equal(w.adj.to_dense(), build_graph_adjacency(p).to_dense())
    assert w.edge_index.dtype == np.int64 and np.array_equal(w.edge_index, p["edge_index"])
    assert w.sampler.num_items == p["num_items"]
    assert w.sampler.is_positive(p["edge_index"][0], p["edge_index"][1]).all()


def test_training_is_deterministic_under_a_seed() -> None:
    p, _, _ = clustered_payload()
    _, _, first = run_epochs(p, small_cfg(seed=5), range(1, 4))
    _, _, second = run_epochs(p, small_cfg(seed=5), range(1, 4))
    _, _, other = run_epochs(p, small_cfg(seed=6), range(1, 4))
    assert first == second
    assert first != other


def test_loss_decreases_and_structure_is_learned() -> None:
    p, user_group, item_group = clustered_payload()
    model, _, losses = run_epochs(p, small_cfg(), range(1, 21))
    assert np.mean(losses[-3:]) < 0.5 * losses[0]
    has_edges = np.bincount(p["edge_index"][1], minlength=p["num_items"]) > 0
    user_emb, item_emb = export_embeddings(model, build_graph_adjacency(p), has_edges)
    scores = user_emb @ item_emb.T
    same = user_group[:, None] == item_group[None, :]
    warm = has_edges[None, :]
    assert scores[same & warm].mean() > scores[~same & warm].mean() + 0.5
    # Cold items (no edges) are placed by their features alone.
    cold = ~has_edges[None, :]
    assert scores[same & cold].mean() > scores[~same & cold].mean() + 0.5


def test_cold_items_get_feature_only_embeddings() -> None:
    p, _, _ = clustered_payload()
    model, _, _ = run_epochs(p, small_cfg(), range(1, 3))
    adj = build_graph_adjacency(p)
    has_edges = np.bincount(p["edge_index"][1], minlength=p["num_items"]) > 0
    cold = np.flatnonzero(~has_edges)
    assert cold.size > 0
    _, item_emb = export_embeddings(model, adj, has_edges)
    with torch.no_grad():
        feature_part = model.item_feature_embedding()[cold] / (model.num_layers + 1)
    # A cold item has no neighbours: its embedding is its layer-0 vector over L+1 layers,
    # and that vector is the features alone (the untrained id embedding is zeroed).
    assert np.allclose(item_emb[cold], feature_part.numpy(), atol=1e-6)
    assert (np.abs(item_emb[cold]).sum(1) > 0).all()
    with torch.no_grad():
        model.item_emb.weight[cold] += 100.0
    _, again = export_embeddings(model, adj, has_edges)
    assert np.allclose(again[cold], item_emb[cold], atol=1e-6)
    with pytest.raises(ValueError, match="item_has_edges"):
        export_embeddings(model, adj, has_edges[:-1])


def test_checkpoint_resume_reproduces_uninterrupted_training() -> None:
    p, _, _ = clustered_payload()
    cfg = small_cfg(seed=2)
    straight, _, straight_losses = run_epochs(p, cfg, range(1, 4))

    first, optimizer, first_losses = run_epochs(p, cfg, range(1, 3))
    with tempfile.TemporaryDirectory() as tmp:
        meta = {"model_args": model_args(p, cfg), "seed": cfg.seed}
        save_state(tmp, first, optimizer, 2, [{"epoch": 1}, {"epoch": 2}], meta)
        state, saved_meta = load_state(tmp), load_meta(tmp)
    assert saved_meta["epoch"] == 2 and len(saved_meta["history"]) == 2
    resumed = build_model(p, cfg)
    resumed.load_state_dict(state["model"])
    opt = make_optimizer(resumed, cfg)
    opt.load_state_dict(state["optimizer"])
    adj = build_graph_adjacency(p)
    sampler = NegativeSampler(p["edge_index"], p["num_items"])
    last = train_epoch(resumed, opt, adj, p["edge_index"], sampler, cfg, 3).loss
    assert [*first_losses, last] == straight_losses
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_incompatible_checkpoint_is_a_config_error() -> None:
    p = random_payload()
    saved = {"model_args": model_args(p, small_cfg(dim=16)), "graph_fingerprint": "abc"}
    check_compatible(saved, model_args(p, small_cfg(dim=16)), "abc", "here")
    with pytest.raises(ConfigError, match=r"dim=16 \(now 32\).*new run_name"):
        check_compatible(saved, model_args(p, small_cfg(dim=32)), "abc", "here")
    with pytest.raises(ConfigError, match="another graph"):
        check_compatible(saved, model_args(p, small_cfg(dim=16)), "def", "here")


# --- driver-side checks (no cluster needed) ------------------------------------------


def to_interactions(p: dict[str, Any]) -> Interactions:
    return Interactions(
        user_ids=np.array([f"u{i}" for i in range(p["num_users"])]),
        item_ids=np.array([f"i{i}" for i in range(p["num_items"])]),
        edge_index=torch.from_numpy(p["edge_index"]),
        edge_weight=torch.from_numpy(p["edge_weight"]),
        item_features=torch.from_numpy(p["item_features"]),
        feature_names=["a", "b"],
        feature_cardinalities=list(p["feature_cardinalities"]),
    )


def test_fit_refuses_to_start_ray(monkeypatch: Any) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(UnavailableError, match=r"call ray.init\(\)"):
        fit(to_interactions(random_payload()), small_cfg())


def test_graph_payload_validates_and_fingerprints() -> None:
    p = random_payload()
    inter = to_interactions(p)
    payload = graph_payload(inter)
    assert payload["fingerprint"] == graph_payload(to_interactions(p))["fingerprint"]
    inter.edge_weight = inter.edge_weight * 2
    assert graph_payload(inter)["fingerprint"] != payload["fingerprint"]
    inter.edge_index = inter.edge_index.clone()
    inter.edge_index[1, 0] = p["num_items"]
    with pytest.raises(DataError, match=r"item indices in \[0, 11\)"):
        graph_payload(inter)
    bad = to_interactions(p)
    bad.item_features = bad.item_features.clone()
    bad.item_features[0, 1] = 3
    with pytest.raises(DataError, match="feature_cardinalities"):
        graph_payload(bad)


def test_make_payload_fingerprint_ignores_storage_dtypes() -> None:
    # bench/gpu_check.py stores indices as int32 and must get the training payload back.
    p = random_payload()
    ref = graph_payload(to_interactions(p))
    small = make_payload(
        p["edge_index"].astype(np.int32), p["edge_weight"], p["item_features"].astype(np.int32),
        p["feature_cardinalities"], p["num_users"], p["num_items"],
    )
    assert small["fingerprint"] == ref["fingerprint"]
    assert small["edge_index"].dtype == np.int64 and small["item_features"].dtype == np.int64
    too_few = int(p["edge_index"][0].max())  # the last user index is out of range
    with pytest.raises(DataError, match=rf"user indices in \[0, {too_few}\)"):
        make_payload(p["edge_index"], p["edge_weight"], p["item_features"],
                     p["feature_cardinalities"], too_few, p["num_items"])


def test_gpu_check_payload_file_round_trips_text_vectors(tmp_path: Any) -> None:
    # The GPU check's payload file carries the layer-0 text vectors (catalogues with titles)
    # with int32 indices, and load_payload gives the training payload back, fingerprint and all.
    from bench.gpu_check import load_payload, payload_blob

    p = random_payload()
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(4, 6)).astype(np.float32)
    rows = rng.integers(0, 4, p["num_items"])
    ref = make_payload(p["edge_index"], p["edge_weight"], p["item_features"],
                       p["feature_cardinalities"], p["num_users"], p["num_items"], vectors, rows)
    path = tmp_path / "payload.pt"
    torch.save(payload_blob(ref, {"name": "random"}), path)
    back, data = load_payload(path)
    assert data == {"name": "random"} and back["fingerprint"] == ref["fingerprint"]
    assert np.array_equal(back["text_vectors"], vectors) and np.array_equal(back["text_row"], rows)
    assert build_model(back, small_cfg()).text_dim == 6
    plain = make_payload(p["edge_index"], p["edge_weight"], p["item_features"],
                         p["feature_cardinalities"], p["num_users"], p["num_items"])
    torch.save(payload_blob(plain, {}), path)
    back, _ = load_payload(path)
    assert back["text_vectors"] is None and back["fingerprint"] == plain["fingerprint"]
    assert back["fingerprint"] != ref["fingerprint"]


def test_embed_propagates_over_a_newer_graph_and_zeroes_untrained_ids() -> None:
    p, _, _ = clustered_payload()
    cfg = small_cfg()
    model, _, _ = run_epochs(p, cfg, range(1, 3))
    users, items = (np.bincount(p["edge_index"][k], minlength=p[f"num_{n}"]) > 0
                    for k, n in ((0, "users"), (1, "items")))
    result = TrainResult(np.zeros(0), np.zeros(0), model=model, trained_users=users,
                         trained_items=items)
    same_u, same_i = embed(result, to_interactions(p))
    ref_u, ref_i = export_embeddings(model, build_graph_adjacency(p), items, users)
    assert np.allclose(same_u, ref_u, atol=1e-6) and np.allclose(same_i, ref_i, atol=1e-6)
    # A newer graph with an edge to a cold item: the item now gets a neighbour's signal,
    # but its untrained id embedding stays out.
    cold = int(np.flatnonzero(~items)[0])
    newer = dict(p)
    newer["edge_index"] = np.concatenate([p["edge_index"], [[0], [cold]]], axis=1)
    newer["edge_weight"] = np.concatenate([p["edge_weight"], [1.0]]).astype(np.float32)
    _, new_i = embed(result, to_interactions(newer))
    assert not np.allclose(new_i[cold], same_i[cold])
    with torch.no_grad():
        model.item_emb.weight[cold] += 100.0
    _, again = embed(result, to_interactions(newer))
    assert np.allclose(again[cold], new_i[cold], atol=1e-5)
    other = random_payload(num_users=p["num_users"], num_items=p["num_items"] + 1)
    with pytest.raises(DataError, match="same user_ids and items"):
        embed(result, to_interactions(other))


# --- configuration --------------------------------------------------------------------


def test_config_defaults_and_storage_path_made_absolute(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig()
    assert cfg.storage_path == str(tmp_path.resolve() / "checkpoints")
    assert TrainConfig(storage_path="rel/dir").storage_path == str(tmp_path.resolve() / "rel/dir")
    assert TrainConfig(storage_path="s3://bucket/prefix").storage_path == "s3://bucket/prefix"
    assert (cfg.dim, cfg.num_layers, cfg.num_workers, cfg.use_gpu, cfg.seed) == (64, 3, 2, False, 0)
    # Each worker's cores are chosen from the cluster at fit time.
    assert (cfg.cpus_per_worker, cfg.batch_size) == (None, 8192)


@pytest.mark.parametrize(
    ("workers", "free", "expected"),
    [
        (1, [2.0], 2),  # one worker takes the whole 2-core machine
        (2, [2.0], 1),  # two share it
        (1, [1.3], 1),  # serve replicas hold 0.7 of a core: the worker gets the 1 free
        (1, [8.0, 8.0], 8),  # never more than one node has free: Ray could not place it
        (1, [1.5, 1.5], 1),  # 3 free in all, but no node has 2
        (2, [8.0, 8.0], 8),  # one worker per node
        (3, [8.0, 8.0], 4),  # two on one node, one on the other
        (4, [2.0], 1),  # more workers than cores: 1 each, they wait for a core
        (1, [0.0], 1),  # a busy cluster: wait rather than fail
        (1, [], 1),
    ],
)
def test_worker_cpus_fit_every_worker_on_a_node(
    workers: int, free: list[float], expected: int
) -> None:
    assert worker_cpus(workers, free) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, r"dim \(0\) must be between 1 and 4096"),
        ({"lr": 0.0}, r"lr \(0.0\) must be > 0"),
        ({"id_dropout": 1.0}, r"id_dropout \(1.0\) must be >= 0 and < 1"),
        ({"num_workers": 0}, r"num_workers \(0\)"),
        ({"cpus_per_worker": 0}, r"cpus_per_worker \(0\) must be between 1 and 1024; .*unset"),
        ({"run_name": "a/b"}, r"run_name \('a/b'\)"),
        ({"storage_path": "s3://"}, r"storage_path \('s3://'\) names no bucket"),
        ({"storage_path": " "}, r"storage_path \(''\) must name a folder"),
        ({"epoch": 3}, r"epoch\s+Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_value_and_the_fix(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**kwargs)


def test_text_input_is_part_of_the_payload_model_and_checkpoint_shape() -> None:
    """Text vectors at layer 0: they enter the payload's fingerprint, the model gets a text
    projection, a checkpoint trained without text cannot be resumed with it (and a checkpoint
    written before ``text_dim`` existed still resumes a model without text)."""
    p = random_payload()
    inter = to_interactions(p)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, 5)).astype(np.float32)
    rows = rng.integers(0, 4, p["num_items"])
    from graph.text import ItemText

    text = ItemText(np.array([f"t{j}" for j in range(4)], dtype=object), vectors, rows)
    with_text = graph_payload(inter, text)
    assert with_text["fingerprint"] != graph_payload(inter)["fingerprint"]
    model = build_model(with_text, small_cfg())
    assert model.text_dim == 5 and build_model(graph_payload(inter), small_cfg()).text_dim == 0
    users, items = model(build_graph_adjacency(with_text))
    assert torch.isfinite(items).all() and users.shape[0] == p["num_users"]
    before = {"model_args": model_args(graph_payload(inter), small_cfg()), "graph_fingerprint": "a"}
    with pytest.raises(ConfigError, match=r"text_dim=0 \(now 5\)"):
        check_compatible(before, model_args(with_text, small_cfg()), "a", "here")
    older = {"model_args": {k: v for k, v in before["model_args"].items() if k != "text_dim"},
             "graph_fingerprint": "a"}
    check_compatible(older, model_args(graph_payload(inter), small_cfg()), "a", "here")
    with pytest.raises(DataError, match="text_row must hold rows"):
        make_payload(p["edge_index"], p["edge_weight"], p["item_features"],
                     p["feature_cardinalities"], p["num_users"], p["num_items"],
                     text_vectors=vectors, text_row=rows + 4)
    # embed() propagates a text model over another graph with its text input.
    has = np.ones(p["num_items"], dtype=bool)
    result = TrainResult(np.zeros(0), np.zeros(0), model=model, trained_items=has)
    _, got = embed(result, inter)
    _, ref = export_embeddings(model, build_graph_adjacency(with_text), has)
    assert np.allclose(got, ref, atol=1e-6)


def test_building_the_gnn_leaves_no_generated_source_in_the_temporary_folder(tmp_path: Path) -> None:
    """PyG writes each message-passing class's ``propagate`` to a temporary file it never removes;
    a fresh process (PyG generates it once per process) that builds and runs the GNN leaves none."""
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom graph.model import SymmetricLGConv\n"
            "conv = SymmetricLGConv()\n"
            "x = torch.ones(3, 2)\n"
            "out = conv(x, torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]))\n"
            "assert out.shape == (3, 2)\n")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.glob("*.py")), sorted(p.name for p in tmp_path.iterdir())
