"""Candidate generation: the few hundred to couple of thousand items one request scores.

Sources, each bounded: inner-product neighbours (faiss, exact) of the user's long-term embedding
and of the session embedding, the user's buy-again items, item-to-item neighbours of the latest
session items, popular items overall, in the departments the request's context favours and in the
session's top intent categories, and items matching the search text. Candidates only decide what
gets scored; the order is the shared ``graph.ranking.Ranker``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from graph import schema as S

if TYPE_CHECKING:  # torch stays out of processes that only pass requests
    from actors.loaded_model import LoadedModel
    from graph.ranking import ContextSignal, Ranker, SessionSignal

# Per source, how many candidates to take.
ANN_K = 100
CONTEXT_DEPTS = 3
COOC_RECENT_ITEMS = 10
COOC_PER_ITEM = 50
BUY_AGAIN_K = 200
QUERY_K = 200
CATEGORY_K = 200
INTENT_PER_CATEGORY = 30


def candidates(
    m: LoadedModel, user: int | None, session: SessionSignal | None,
    item_events: list[tuple[int, str, float]], context: ContextSignal | None,
    tokens: list[str], category: str | None, intent: Sequence[str] = (),
) -> np.ndarray:
    """The items one request scores: the union of every source that applies to it.

    Args:
        m: The model.
        user: The user's row, if known (and not forgotten).
        session: The session signal, if the session has catalogue items.
        item_events: ``(item index, event, ts)`` of the session, oldest first.
        context: The request's context signal.
        tokens: Search words (the request's query and the session's latest search).
        category: Category-path prefix the request asks for.
        intent: The session's top intent categories.

    Returns:
        Sorted unique item indices. Shapes: ``[n_candidates]``.
    """
    r = m.ranker
    parts: list[np.ndarray] = [m.popular]
    queries = []
    if user is not None:
        queries.append(r.user_emb[user])
        parts.append(buy_again(r, user))
    if session is not None and not session.is_empty:
        w = session.weights.astype(np.float32)
        queries.append((w / max(float(np.abs(w).sum()), 1e-12)) @ r.item_emb[session.items])
        recent: list[int] = []
        for i, ev, _ in reversed(item_events):
            if ev != S.REMOVE_FROM_CART and i not in recent:
                recent.append(i)
            if len(recent) >= COOC_RECENT_ITEMS:
                break
        sim = r.signals.item_sim
        for i in recent:
            row = slice(sim.indptr[i], sim.indptr[i + 1])
            nb, val = sim.indices[row], sim.data[row]
            if len(nb) > COOC_PER_ITEM:
                nb = nb[np.argpartition(-val, COOC_PER_ITEM - 1)[:COOC_PER_ITEM]]
            parts.append(nb.astype(np.int64))
    if queries:
        _, ann = m.index.search(np.stack(queries).astype(np.float32), ANN_K)
        parts.append(ann[ann >= 0].astype(np.int64))
    if context is not None:
        lift = r.signals.context_lift[context.weekday, context.hour]
        if context.is_holiday:
            lift = lift + r.signals.holiday_lift
        for d in np.argsort(-lift)[:CONTEXT_DEPTS]:
            parts.append(m.dept_popular.get(int(d), np.zeros(0, dtype=np.int64)))
    if tokens:
        parts.append(m.tokens.candidates(tokens, m.popularity, QUERY_K))
    if category:
        parts.append(m.category_items(category)[:CATEGORY_K])
    for label in intent:
        parts.append(m.category_items(label)[:INTENT_PER_CATEGORY])
    return np.unique(np.concatenate(parts).astype(np.int64))


def exclusions(
    m: LoadedModel, exclude_items: Iterable[str], item_events: list[tuple[int, str, float]]
) -> np.ndarray:
    """Requested exclusions (unknown ids ignored) plus what the session's cart holds."""
    out = {m.item_index[x] for x in exclude_items if x in m.item_index}
    cart: dict[int, int] = {}
    for i, ev, _ in item_events:
        if ev in (S.ADD_TO_CART, S.PURCHASE):
            cart[i] = cart.get(i, 0) + 1
        elif ev == S.REMOVE_FROM_CART:
            cart[i] = cart.get(i, 0) - 1
    out |= {i for i, n in cart.items() if n > 0}
    return np.fromiter(out, dtype=np.int64, count=len(out))


def buy_again(r: Ranker, user: int) -> np.ndarray:
    """The user's most repeated purchases (up to :data:`BUY_AGAIN_K`)."""
    sig = r.signals
    lo, hi = sig.hist_indptr[user], sig.hist_indptr[user + 1]
    items = sig.hist_indices[lo:hi].astype(np.int64)
    if len(items) > BUY_AGAIN_K:
        items = items[np.argpartition(-sig.hist_weight[lo:hi], BUY_AGAIN_K - 1)[:BUY_AGAIN_K]]
    return items
