"""The protocol's ranking tasks, built from a history window and a later target window.

The same builders make the test tasks (history = training events, targets = after the split) and
their validation twins (history = events before the validation cut, targets = the validation
window), which the learned ranker is fitted on. Nothing here reads anything but the two windows it
is given.

- ``next_basket_all``: every user with purchases in both windows; relevant = the distinct items
  bought in the target window; the request time is the cut; no session, no context.
- ``next_basket_discovery``: relevant = those items the user never bought before; the user's
  previously bought items are excluded for every model.
- ``in_session``: every target-window basket with at least :data:`MIN_BASKET` distinct items; a
  seeded random half (``n // 2`` items) is revealed as ``add_to_cart`` events at the basket's
  time, the rest is relevant; revealed items are excluded; the context is the basket's time.
- ``in_session_blind``: the same baskets, exclusions and targets with the session signal off.
- ``search``: the ``in_session`` baskets with a simulated search (:mod:`graph.queries`): one
  hidden item of the basket is drawn (seeded) and the query is made from its category or title
  words; relevant = the hidden items of that item's category path. No data set we ship has
  searches: every number of this task is measured on simulated queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from graph import schema as S
from graph.interactions import Interactions
from graph.queries import simulate_query
from graph.ranking import ContextSignal, SessionSignal, session_signal
from graph.recommend import Request
from graph.signals import attribute_value, to_unix_seconds

MIN_BASKET = 4
SessionEvents = tuple[tuple[int, str, float], ...]


@dataclass
class QueryBatch:
    """Labelled requests of one task.

    Shapes:
        - **users** ``[B]`` int64 (``-1`` = unknown user); **times** ``[B]`` unix seconds.
        - **events**, **contexts**, **exclude**, **targets**: ``B`` entries each; ``targets[b]``
          holds the relevant item indices of request ``b`` (never empty).
    """

    name: str
    users: np.ndarray
    events: list[SessionEvents]
    contexts: list[ContextSignal | None]
    times: np.ndarray
    exclude: list[np.ndarray | None]
    targets: list[np.ndarray]
    queries: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.users)

    @property
    def sessions(self) -> list[SessionSignal | None]:
        """The session signal of each request (None without session events)."""
        return [session_signal(list(ev), float(t)) if ev else None
                for ev, t in zip(self.events, self.times, strict=True)]

    def requests(self, k: int = S.TOP_K) -> list[Request]:
        """The requests as the recommender takes them."""
        queries = self.queries if self.queries is not None else [None] * len(self)
        return [
            Request(user=None if u < 0 else int(u), item_events=ev, context=c, now=float(t),
                    exclude=ex, k=k, query=qt)
            for u, ev, c, t, ex, qt in zip(self.users.tolist(), self.events, self.contexts,
                                           self.times.tolist(), self.exclude, queries, strict=True)
        ]

    def take(self, idx: np.ndarray, name: str | None = None) -> QueryBatch:
        """The requests at ``idx``."""
        def pick(xs: list[Any]) -> list[Any]:
            return [xs[i] for i in idx.tolist()]
        return QueryBatch(name or self.name, self.users[idx], pick(self.events),
                          pick(self.contexts), self.times[idx], pick(self.exclude),
                          pick(self.targets),
                          None if self.queries is None else pick(self.queries))


def bought(events: pd.DataFrame, inter: Interactions) -> pd.DataFrame:
    """Purchases (or, for data without any, positive item events) as (u, i, s, ts) codes, and
    the events' context columns (``device``, ``region``) where they have them.

    ``u`` is -1 for users outside ``inter.user_ids``; items outside the catalogue are dropped.
    """
    ev = events[events[S.ITEM_COL].notna()]
    if (ev[S.EVENT_COL] == S.PURCHASE).any():
        ev = ev[ev[S.EVENT_COL] == S.PURCHASE]
    else:
        ev = ev[ev[S.EVENT_COL].map(S.EVENT_WEIGHTS).fillna(0.0) > 0]
    out = pd.DataFrame({
        "u": pd.Index(inter.user_ids).get_indexer(ev[S.USER_COL].astype(str)),
        "i": pd.Index(inter.item_ids).get_indexer(ev[S.ITEM_COL].astype(str)),
        "s": ev[S.SESSION_COL].astype(str).to_numpy(),
        "ts": ev[S.TS_COL].to_numpy(),
    })
    for col in S.CONTEXT_ATTRIBUTES:
        if col in ev.columns:
            out[col] = ev[col].to_numpy(dtype=object)
    return out[out["i"] >= 0]


def _item_sets(df: pd.DataFrame, key: str) -> dict[Any, np.ndarray]:
    return {k: np.unique(g.to_numpy()) for k, g in df.groupby(key, sort=True)["i"]}


def next_basket_tasks(
    history: pd.DataFrame,
    targets: pd.DataFrame,
    inter: Interactions,
    cut: pd.Timestamp,
    *,
    seed: int = 0,
    max_users: int | None = None,
) -> tuple[QueryBatch, QueryBatch]:
    """``next_basket_all`` and ``next_basket_discovery``, asked at time ``cut``.

    Users: those with purchases in both windows (and in ``inter``); a seeded sample of
    ``max_users`` of them when given (the same for every model).
    """
    hist = _item_sets(bought(history, inter).query("u >= 0"), "u")
    future = _item_sets(bought(targets, inter).query("u >= 0"), "u")
    users = np.array(sorted(u for u in future if u in hist), dtype=np.int64)
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    now = to_unix_seconds(pd.Timestamp(cut))
    b = len(users)
    nb_all = QueryBatch("next_basket_all", users, [()] * b, [None] * b, np.full(b, now),
                        [None] * b, [future[u] for u in users])
    disc = [(u, np.setdiff1d(future[u], hist[u])) for u in users]
    disc = [(u, new) for u, new in disc if len(new)]
    d = len(disc)
    nb_disc = QueryBatch("next_basket_discovery", np.array([u for u, _ in disc], dtype=np.int64),
                         [()] * d, [None] * d, np.full(d, now), [hist[u] for u, _ in disc],
                         [new for _, new in disc])
    return nb_all, nb_disc


def in_session_tasks(
    targets: pd.DataFrame,
    inter: Interactions,
    *,
    country: str = "US",
    seed: int = 0,
    max_baskets: int | None = None,
) -> tuple[QueryBatch, QueryBatch]:
    """``in_session`` and ``in_session_blind`` over baskets of >= 4 distinct items.

    Baskets are taken in session-id order; a seeded sample of ``max_baskets`` when given; each
    basket's items are shuffled by the same seeded generator and the first ``n // 2`` revealed.
    """
    b = bought(targets, inter)
    attrs = [c for c in S.CONTEXT_ATTRIBUTES if c in b.columns]
    meta = b.groupby("s", sort=True).agg(u=("u", "first"), ts=("ts", "max"),
                                         **{c: (c, "first") for c in attrs})
    items = _item_sets(b, "s")
    meta = meta[np.array([len(items[s]) >= MIN_BASKET for s in meta.index], dtype=bool)]
    rng = np.random.default_rng(seed)
    if max_baskets is not None and len(meta) > max_baskets:
        meta = meta.iloc[np.sort(rng.choice(len(meta), max_baskets, replace=False))]
    events: list[SessionEvents] = []
    contexts: list[ContextSignal | None] = []
    times: list[float] = []
    exclude: list[np.ndarray | None] = []
    relevant: list[np.ndarray] = []
    # The basket's device and region (its first event's with a value), as its request would send.
    where = {c: meta[c].to_numpy(dtype=object) for c in attrs}
    for j, (s, ts) in enumerate(zip(meta.index, pd.to_datetime(meta["ts"]), strict=True)):
        its = rng.permutation(items[s])
        half = len(its) // 2
        now = to_unix_seconds(ts)
        events.append(tuple((int(i), S.ADD_TO_CART, now) for i in its[:half]))
        contexts.append(ContextSignal.from_timestamp(
            ts, country, **{c: attribute_value(where[c][j]) for c in attrs}))
        times.append(now)
        exclude.append(np.sort(its[:half]))
        relevant.append(np.sort(its[half:]))
    u = meta["u"].to_numpy(dtype=np.int64)
    t = np.asarray(times, dtype=np.float64)
    ins = QueryBatch("in_session", u, events, contexts, t, exclude, relevant)
    blind = QueryBatch("in_session_blind", u, [()] * len(u), list(contexts), t.copy(),
                       list(exclude), relevant)
    return ins, blind


def search_task(ins: QueryBatch, categories: np.ndarray, titles: np.ndarray, *, seed: int = 0,
                ) -> QueryBatch:
    """``search``: each ``in_session`` basket with a simulated query about one of its hidden items.

    Args:
        ins: The ``in_session`` task (revealed items, exclusions and hidden items are kept).
        categories: Category path of each item index.
        titles: Title of each item index.
        seed: Seed of the drawn item and the query words.

    Returns:
        The task; relevant = the hidden items whose category path is the drawn item's. Baskets
        whose drawn item has no usable query word are left out.
    """
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    queries: list[str | None] = []
    targets: list[np.ndarray] = []
    for b, hidden in enumerate(ins.targets):
        item = int(rng.choice(hidden))
        text = simulate_query(str(categories[item]), str(titles[item]), rng)
        if text is None:
            continue
        keep.append(b)
        queries.append(text)
        targets.append(hidden[categories[hidden] == categories[item]])
    out = ins.take(np.asarray(keep, dtype=np.int64), name="search")
    out.queries, out.targets = queries, targets
    return out
