"""Fitting the Ranker's fusion weights on labelled validation requests.

The weights of ``graph.ranking.Ranker`` (one set per mode, ``graph.signals.FusionWeights``) are the
only numbers of the ranker fitted against relevance labels, so they are fitted on a validation
window strictly before the test split: ``graph.evaluate.fit_validation_weights`` builds the
protocol's tasks on that window and calls :func:`fit_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from graph import schema as S
from graph.ranking import (
    SESSION_COMPONENTS,
    ContextSignal,
    Ranker,
    SessionSignal,
    top_k_from_scores,
)
from graph.signals import COMPONENTS, ComponentWeights, FusionWeights


@dataclass
class QueryBatch:
    """Labelled ranking requests: one task of the evaluation protocol or its validation twin.

    Shapes:
        - **users** ``[B]`` int64 (``-1`` = unknown user).
        - **sessions**, **contexts**, **exclude**, **targets**: ``B`` entries each; ``targets[b]``
          holds the relevant item indices of request ``b`` (never empty).
    """

    name: str
    users: np.ndarray
    sessions: list[SessionSignal | None]
    contexts: list[ContextSignal | None]
    exclude: list[np.ndarray | None]
    targets: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class _Pool:
    """Per-request candidate pool with component values, for fast weight search."""

    values: np.ndarray  # [C, R, P]
    relevant: np.ndarray  # [R, P] bool
    valid: np.ndarray  # [R, P] bool
    num_targets: np.ndarray  # [R]


def _build_pool(ranker: Ranker, q: QueryBatch, pool: int) -> _Pool:
    """Union of each component's top ``pool`` items per request (after exclusion)."""
    vals, rel, valid = [], [], []
    for s in range(0, len(q), ranker.chunk_size):
        sl = slice(s, s + ranker.chunk_size)
        comps = ranker.components(q.users[sl], q.sessions[sl], q.contexts[sl])
        ex = q.exclude[sl]
        per = [top_k_from_scores(comps[c], pool, ex)[0] for c in COMPONENTS]
        cand = np.sort(np.concatenate(per, axis=1), axis=1)
        ok = cand >= 0
        ok[:, 1:] &= cand[:, 1:] != cand[:, :-1]
        safe = np.where(ok, cand, 0)
        vals.append(np.stack([np.take_along_axis(comps[c], safe, axis=1) for c in COMPONENTS]))
        rel.append(np.stack([np.isin(safe[r], t) & ok[r]
                             for r, t in enumerate(q.targets[sl])]))
        valid.append(ok)
    return _Pool(
        values=np.concatenate(vals, axis=1),
        relevant=np.concatenate(rel),
        valid=np.concatenate(valid),
        num_targets=np.array([len(np.unique(t)) for t in q.targets], dtype=np.float64),
    )


def _pool_recall(p: _Pool, w: np.ndarray, k: int) -> float:
    score = np.tensordot(w, p.values, axes=1)
    score[~p.valid] = -np.inf
    kk = min(k, score.shape[1])
    top = np.argpartition(-score, kk - 1, axis=1)[:, :kk]
    hits = np.take_along_axis(p.relevant, top, axis=1).sum(axis=1)
    return float((hits / p.num_targets).mean())


GRID: tuple[float, ...] = (
    0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0,
)


def _coordinate_ascent(
    pools: list[_Pool], start: ComponentWeights, active: Sequence[str], k: int, rounds: int,
) -> tuple[ComponentWeights, float]:
    w = start.as_array()
    pos = [COMPONENTS.index(c) for c in active]

    def objective(v: np.ndarray) -> float:
        # Geometric mean over the batches: a relative gain counts the same in every task, so the
        # small recall of discovery is not drowned by the large recall of buy-again-heavy tasks.
        return float(np.exp(np.mean([np.log(max(_pool_recall(p, v, k), 1e-9)) for p in pools])))

    best = objective(w)
    for r in range(rounds + 1):
        improved = False
        for j in pos:
            # Coarse grid first; the last round refines around the current value.
            values = GRID if r < rounds else tuple(w[j] * f for f in (0.6, 0.8, 1.25, 1.6))
            for v in values:
                trial = w.copy()
                trial[j] = v
                if not np.any(trial[pos] > 0):
                    continue
                val = objective(trial)
                if val > best + 1e-6:
                    best, w, improved = val, trial, True
        if not improved and r < rounds:
            break
    return ComponentWeights(**{c: float(w[n]) for n, c in enumerate(COMPONENTS)}), best


def fit_weights(
    ranker: Ranker,
    no_session: Sequence[QueryBatch],
    session: Sequence[QueryBatch],
    *,
    k: int = S.TOP_K,
    pool: int = 100,
    rounds: int = 3,
    fitted_on: str = "validation window",
    progress: Callable[[str], None] | None = None,
) -> FusionWeights:
    """Fit the fusion weights maximising recall@k on labelled VALIDATION queries.

    Coordinate ascent over a log-spaced grid, then a local refinement. Each request's candidates
    are the union of the top ``pool`` items of every component (after exclusion) — an item outside
    all of them cannot reach the fused top ``k`` for any sensible weights — and a relevant item
    outside the pool counts as a miss, so the objective is the full-ranking recall up to that
    approximation. The ranker's signals and embeddings must come from data before the validation
    window, and the queries from inside it: never pass test queries here.

    Args:
        ranker: Ranker built on pre-validation embeddings and signals.
        no_session: Query batches of requests without session events; the objective of a mode
            is the geometric mean of its batches' recall@k, so every task weighs the same.
        session: Query batches of requests with session events.
        k: Cut-off of the recall being maximised.
        pool: Items per component in each request's candidate pool.
        rounds: Coarse coordinate-ascent rounds.
        fitted_on: Provenance text stored in the result.
        progress: Called with one line per mode.

    Returns:
        ``FusionWeights`` with the fitted weights and the validation recall each mode reached.
    """
    out = FusionWeights(fitted_on=fitted_on)
    start = ranker.weights
    for mode, batches, active in (
        ("no_session", no_session, tuple(c for c in COMPONENTS if c not in SESSION_COMPONENTS)),
        ("session", session, COMPONENTS),
    ):
        batches = [b for b in batches if len(b)]
        if not batches:
            continue
        pools = [_build_pool(ranker, b, pool) for b in batches]
        init = getattr(start, mode)
        w, best = _coordinate_ascent(pools, init, active, k, rounds)
        setattr(out, mode, w)
        for b, p in zip(batches, pools, strict=True):
            out.validation[f"{mode}/{b.name}/recall@{k}"] = _pool_recall(p, w.as_array(), k)
        if progress is not None:
            progress(f"fit_weights {mode}: recall@{k} (geometric mean over {len(pools)} tasks) "
                     f"{best:.4f} with {w.model_dump()}")
    return out

