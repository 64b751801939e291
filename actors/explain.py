"""Explanations: an item's per-component score contributions → sentences a shopper can read.

:class:`Reasons` turns what the ranker's TreeSHAP contributions
(:meth:`graph.ltr.LearnedRanker.contributions`) say carried an item ("cooc",
"repeat", "context", ...) into sentences — "because you added X to your cart", "you buy this every
week", "because you are shopping for YOGURT", "popular on Saturday mornings" — naming the
session item behind a "because you ..." reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from actors.context import WEEKDAYS
from graph import schema as S

if TYPE_CHECKING:  # torch stays out of processes that only pass requests
    from actors.loaded_model import LoadedModel
    from graph.ranking import ContextSignal, SessionSignal

# A component is given as a reason when it carries at least this share of an item's positive score.
REASON_SHARE = 0.15
MAX_REASONS = 3


def short_title(title: str) -> str:
    """The readable end of a title: ``"GROCERY > CEREAL > KIDS CEREAL, 12 OZ"`` → ``"KIDS CEREAL,
    12 OZ"``."""
    return title.rsplit(S.CATEGORY_SEP, 1)[-1].strip() or title


def day_part(hour: int) -> str:
    """``mornings`` (5–11), ``afternoons`` (12–16), ``evenings`` (17–21) or ``nights``."""
    if 5 <= hour < 12:
        return "mornings"
    if 12 <= hour < 17:
        return "afternoons"
    if 17 <= hour < 22:
        return "evenings"
    return "nights"


def cadence_text(count: float, first: float, last: float) -> str:
    """Human wording of a purchase rhythm from the user's history of one item."""
    n = round(count)
    if n < 2:
        return "you bought this before"
    days = (last - first) / 86400.0 / (n - 1)
    if days <= 10:
        return "you buy this every week"
    if days <= 18:
        return "you buy this every couple of weeks"
    if days <= 40:
        return "you buy this every month"
    return f"you have bought this {n} times"


_VERB = {
    S.ADD_TO_CART: "added {t} to your cart",
    S.PURCHASE: "bought {t}",
    S.CLICK: "looked at {t}",
    S.VIEW: "viewed {t}",
}


@dataclass
class Reasons:
    """Turns an item's component contributions into sentences, for one request.

    The session item behind a "because you ..." reason is found for all top items at once: the
    session item with the largest weighted co-occurrence (``cooc``) or embedding affinity
    (``session``) with the recommended item; so is each top item's place in the shopper's
    purchase history (``history``: its position in the history arrays, None if never bought).
    """

    m: LoadedModel
    user: int | None
    context: ContextSignal | None
    query: str | None
    item_events: list[tuple[int, str, float]]
    cooc_src: dict[int, int] = field(default_factory=dict)
    session_src: dict[int, int] = field(default_factory=dict)
    history: dict[int, int | None] = field(default_factory=dict)

    @classmethod
    def build(
        cls, m: LoadedModel, user: int | None, session: SessionSignal | None,
        item_events: list[tuple[int, str, float]], context: ContextSignal | None,
        query: str | None, top: np.ndarray,
    ) -> Reasons:
        out = cls(m, user, context, query, item_events)
        if user is not None and len(top):
            out.history.update(zip(top.tolist(), out._history_positions(top), strict=True))
        if session is None or session.is_empty or len(top) == 0:
            return out
        from graph.ranking import csr_block  # here: the ranker replica has torch loaded

        w = np.maximum(session.weights.astype(np.float32), 0.0)[:, None]
        r = m.ranker
        co = csr_block(r.signals.item_sim, session.items, top) * w
        em = (r.item_emb[session.items] @ r.item_emb[top].T) * w
        for strength, dest in ((co, out.cooc_src), (em, out.session_src)):
            best = strength.argmax(axis=0)
            ok = strength[best, np.arange(len(top))] > 0
            dest.update({int(t): int(session.items[b])
                         for t, b, good in zip(top.tolist(), best.tolist(), ok.tolist(),
                                               strict=True) if good})
        return out

    def for_item(self, it: int, contrib: dict[str, float]) -> list[str]:
        """Sentences for the components that carried the item (largest first).

        Args:
            it: The item.
            contrib: Its per-component score contributions
                (:meth:`graph.ltr.LearnedRanker.contributions`); ``base``, the model's expected
                score, is no reason.
        """
        positive = {c: v for c, v in contrib.items() if v > 0 and c != "base"}
        total = sum(positive.values())
        out: list[str] = []
        for comp, v in sorted(positive.items(), key=lambda cv: -cv[1]):
            if total > 0 and v / total < REASON_SHARE:
                break
            text = self.text(comp, it)
            if text and text not in out:
                out.append(text)
            if len(out) >= MAX_REASONS:
                break
        return out or ["popular with shoppers"]

    def _history_positions(self, items: np.ndarray) -> list[int | None]:
        """Each item's position in the shopper's purchase history arrays (None: never bought);
        the history row is sorted by item (``graph.signals`` builds it from a sorted groupby)."""
        sig = self.m.ranker.signals
        if self.user is None:
            return [None] * len(items)
        lo, hi = int(sig.hist_indptr[self.user]), int(sig.hist_indptr[self.user + 1])
        if hi <= lo:
            return [None] * len(items)
        pos = lo + np.searchsorted(sig.hist_indices[lo:hi], items)
        found = sig.hist_indices[np.minimum(pos, hi - 1)] == items
        return [int(p) if ok and p < hi else None
                for p, ok in zip(pos.tolist(), found.tolist(), strict=True)]

    def text(self, comp: str, it: int) -> str | None:
        """The sentence for one component of one item (None: nothing true to say)."""
        m = self.m
        if comp in ("repeat", "explore") and self.user is not None:
            # "repeat" tells the rhythm of an item the shopper bought; "explore" (how often they
            # try new items) speaks only for one they never bought. Otherwise nothing is true.
            sig = m.ranker.signals
            p = (self.history[it] if it in self.history
                 else self._history_positions(np.array([it]))[0])
            if comp == "repeat" and p is not None:
                return cadence_text(float(sig.hist_count[p]), float(sig.hist_first[p]),
                                    float(sig.hist_last[p]))
            if comp == "explore" and p is None:
                return "something new to try: you often pick new items"
            return None
        if comp in ("cooc", "session"):
            src = (self.cooc_src if comp == "cooc" else self.session_src).get(it)
            if src is None:
                return None
            event = _strongest_event(src, self.item_events)
            return "because you " + _VERB.get(event, _VERB[S.VIEW]).format(
                t=short_title(str(m.titles[src])))
        if comp == "intent" and self.item_events:
            return f"because you are shopping for {short_title(str(m.intent_labels[it]))}"
        if comp == "line" and self.item_events:
            return f"more {short_title(str(m.intent_labels[it]))} from the brand you picked"
        if comp == "gnn":
            return "picked for you from your shopping history"
        if comp == "peers" and self.user is not None:
            return "shoppers who buy what you buy also buy this"
        if comp == "ease" and self.user is not None:
            return "goes with what you usually buy"
        if comp == "pop":
            return "popular with shoppers"
        if comp == "context" and self.context is not None:
            if self.context.is_holiday:
                return "popular on public holidays"
            return f"popular on {WEEKDAYS[self.context.weekday]} {day_part(self.context.hour)}"
        if comp == "query" and self.query:
            return f"matches your search “{self.query}”"
        return None


def _strongest_event(item: int, item_events: list[tuple[int, str, float]]) -> str:
    best, best_w = S.VIEW, -1.0
    for i, ev, _ in item_events:
        if i == item and S.EVENT_WEIGHTS.get(ev, 0.0) > best_w:
            best, best_w = ev, S.EVENT_WEIGHTS[ev]
    return best

