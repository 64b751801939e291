"""The search-query simulator: no data set we ship has searches, so queries are made up, seeded,
from the catalogue text of an item the shopper went on to buy.

One query (:func:`simulate_query`): pick one of the item's *query sources* — the second level of
its category path (``SOFT DRINKS``), the last level (``SOFT DRINKS 12/18&15PK CAN CAR``), and its
title when the title is more than the path (real product names) — then its first one to three
words (letters only, three or more of them, lower case). Never the item id,
never the size or the brand of the built-in titles. Every number measured with these queries says
so (the ranker's training requests, the ``search`` task).
"""

from __future__ import annotations

import re

import numpy as np

from graph import schema as S

MAX_WORDS = 3
_WORD_RE = re.compile(r"[a-z]{3,}")


def query_sources(category: str, title: str) -> list[str]:
    """The texts a query about this item may be taken from."""
    levels = [p.strip() for p in category.split(S.CATEGORY_SEP.strip())]
    out = [lv for lv in levels[1:] if lv] or [lv for lv in levels if lv]
    if title and not title.startswith(category):
        out.append(title)
    return out


def simulate_query(category: str, title: str, rng: np.random.Generator) -> str | None:
    """A seeded query about one item (None when its text has no usable word)."""
    sources = [w for w in (_WORD_RE.findall(s.lower()) for s in query_sources(category, title)) if w]
    if not sources:
        return None
    words = sources[int(rng.integers(len(sources)))]
    n = int(rng.integers(1, min(MAX_WORDS, len(words)) + 1))
    return " ".join(words[:n])
