"""Column names, event types and node types: the one place they are spelled.

Every module that touches events, items or artifacts imports its names from here
(after Microsoft Recommenders' ``utils/constants.py``).
"""

from __future__ import annotations

from typing import Final

# --- canonical events table -------------------------------------------------------------
USER_COL: Final = "user_id"
ITEM_COL: Final = "item_id"
TS_COL: Final = "ts"
EVENT_COL: Final = "event"
SESSION_COL: Final = "session_id"
QUERY_COL: Final = "query"
QTY_COL: Final = "qty"
PRICE_COL: Final = "price"
# Optional context columns of an event (the request's ``context.device`` / ``context.region``
# online). Where the events carry them, the ranker's context lift uses them too.
DEVICE_COL: Final = "device"
REGION_COL: Final = "region"
CONTEXT_ATTRIBUTES: Final[tuple[str, ...]] = (DEVICE_COL, REGION_COL)
# The devices a request's context.device (and an online event's device) can name.
DEVICES: Final[tuple[str, ...]] = ("desktop", "mobile", "tablet", "app", "other")

# --- canonical items table --------------------------------------------------------------
TITLE_COL: Final = "title"
CATEGORY_COL: Final = "category"
BRAND_COL: Final = "brand"
# Derived from the category path ("A > B > C"): its first level.
DEPARTMENT_COL: Final = "department"
CATEGORY_SEP: Final = " > "

# --- event types ------------------------------------------------------------------------
VIEW: Final = "view"
CLICK: Final = "click"
ADD_TO_CART: Final = "add_to_cart"
REMOVE_FROM_CART: Final = "remove_from_cart"
PURCHASE: Final = "purchase"
SEARCH: Final = "search"
EVENT_TYPES: Final[tuple[str, ...]] = (VIEW, CLICK, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE, SEARCH)

# Strength of an interaction as evidence of preference, used for graph edge weights
# (offline) and for session weighting (online). purchase > add_to_cart > click > view.
# remove_from_cart is a negative signal in sessions and adds no graph edge; search has no item.
EVENT_WEIGHTS: Final[dict[str, float]] = {
    PURCHASE: 1.0,
    ADD_TO_CART: 0.7,
    CLICK: 0.4,
    VIEW: 0.2,
    REMOVE_FROM_CART: -0.5,
    SEARCH: 0.0,
}

# --- graph node types (PyG HeteroData vocabulary) ---------------------------------------
USER_NODE: Final = "user"
ITEM_NODE: Final = "item"

# --- evaluation -------------------------------------------------------------------------
TOP_K: Final = 20
# Reported by every training epoch (graph.validation) and plotted in the training curve.
VAL_METRIC: Final = f"val_recall@{TOP_K}"
TASKS: Final[tuple[str, ...]] = (
    "next_basket_all",
    "next_basket_discovery",
    "in_session",
    "in_session_blind",
)
METRICS: Final[tuple[str, ...]] = ("recall@20", "ndcg@20", "hit@20")
MODEL_NAMES: Final[tuple[str, ...]] = ("popularity", "buy_again", "itemknn", "intentrec")
# Rows of the ablation table (metrics.json["ablations"]), on a seeded sample of each task.
ABLATION_NAMES: Final[tuple[str, ...]] = (
    "intentrec_no_gnn", "intentrec_no_session", "intentrec_no_context", "intentrec",
)
