"""Read-only views of a model version's catalogue for browsing: departments with their
categories (``GET /v1/catalogue``) and a sample of the shoppers the model knows
(``GET /v1/catalogue/shoppers``).

Both are computed once per model version (:func:`catalogue_listing` is cheap enough for the
built-in 92k items, about 50 ms) and cached by the ranker with the version.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container
from typing import TYPE_CHECKING, Any

from graph import schema as S

if TYPE_CHECKING:
    from actors.loaded_model import LoadedModel

SHOPPER_SAMPLE = 50


def catalogue_listing(m: LoadedModel) -> dict[str, Any]:
    """Departments, most items first, each with its categories (the session-intent level,
    ``DEPARTMENT > CATEGORY``) and how many items they hold.

    A category's ``category`` is the value to send as ``category`` in ``POST
    /v1/recommendations`` to browse it (a case-insensitive path prefix).
    """
    counts = Counter(str(label) for label in m.intent_labels.tolist())
    sep = S.CATEGORY_SEP.strip()
    departments: dict[str, list[tuple[str, int]]] = {}
    for label, n in counts.items():
        dept = label.split(sep)[0].strip()
        departments.setdefault(dept, []).append((label, n))
    out: list[dict[str, Any]] = []
    for dept, cats in departments.items():
        cats.sort(key=lambda c: (-c[1], c[0]))
        out.append({"department": dept, "items": sum(n for _, n in cats),
                    "categories": [{"category": c, "items": n} for c, n in cats]})
    out.sort(key=lambda d: (-int(d["items"]), str(d["department"])))
    return {"model_version": m.version, "num_items": m.num_items, "departments": out}


def shopper_sample(m: LoadedModel, forgotten: Container[str] | None = None,
                   k: int = SHOPPER_SAMPLE) -> list[str]:
    """Up to ``k`` user ids the model knows (the first of the model's user table, forgotten
    users left out): shoppers a demo or a test can ask for by name."""
    out: list[str] = []
    for user in m.user_index:
        if forgotten is None or user not in forgotten:
            out.append(user)
        if len(out) >= k:
            break
    return out
