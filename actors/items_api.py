"""Request and response models of ``PUT /v1/items/{item_id}`` and ``PUT /v1/items``: add or
update catalogue items without retraining, one or a batch (:mod:`graph.new_items` says how an item
is embedded and served)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.api import MAX_CATEGORY_LEN, Id
from graph import schema as S
from graph.new_items import NewItem

MAX_TITLE_LEN = 256
MAX_BRAND_LEN = 128
MAX_PRICE = 1_000_000.0
MAX_BATCH_ITEMS = 1000
"""Items in one ``PUT /v1/items``: a thousand typical items are about 200 kB, well within the
default body limit, and cost one catalogue rebuild."""


class ItemUpsert(BaseModel):
    """A catalogue item's attributes. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    title: str = Field(min_length=1, max_length=MAX_TITLE_LEN,
                       description="what the shopper sees and searches, e.g. 'Sparkling yuzu "
                       "lemonade 12 oz'")
    category: str = Field(min_length=1, max_length=MAX_CATEGORY_LEN, description=(
        "category path, levels separated by ' > ', most general first, e.g. "
        "'GROCERY > SOFT DRINKS > SPARKLING WATER'; GET /v1/catalogue lists the known ones"))
    brand: str | None = Field(default=None, min_length=1, max_length=MAX_BRAND_LEN)
    price: float | None = Field(default=None, ge=0.0, le=MAX_PRICE,
                                description="unit price in the catalogue's currency")
    available: bool = Field(default=True, description=(
        "false: out of stock or discontinued; the item stays in the catalogue (past events "
        "that name it still count) but is never recommended, found by a search or listed as "
        "similar, until a PUT with true"))

    @field_validator("category")
    @classmethod
    def _path(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(S.CATEGORY_SEP.strip())]
        if any(not p for p in parts):
            raise ValueError(f"category {v!r} has an empty level: write the path as levels "
                             f"separated by '{S.CATEGORY_SEP.strip()}', e.g. 'GROCERY > SOFT DRINKS'")
        return S.CATEGORY_SEP.join(parts)

    @field_validator("price")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"price must be a finite number, got {v}")
        return v

    def to_item(self, item_id: str) -> NewItem:
        return NewItem(item_id=item_id, title=self.title, category=self.category,
                       brand=self.brand, price=self.price, available=self.available)


class ItemUpsertResponse(BaseModel):
    """What ``PUT /v1/items/{item_id}`` did."""

    model_config = ConfigDict(extra="forbid")

    item_id: str
    created: bool = Field(description="true: a new item; false: an item the catalogue had "
                          "(its attributes are replaced)")
    model_version: str = Field(description="the model version that embedded it")
    num_items: int = Field(description="items in the catalogue served now")
    added_items: int = Field(description="items added without a retrain, this one included")


class ItemBatchEntry(ItemUpsert):
    """One item of ``PUT /v1/items``: its id and attributes."""

    item_id: Id = Field(description="the catalogue's id of the item; an id the catalogue has "
                        "updates that item")


class ItemBatch(BaseModel):
    """``PUT /v1/items``: up to :data:`MAX_BATCH_ITEMS` items, ids unique."""

    model_config = ConfigDict(extra="forbid")

    items: list[ItemBatchEntry] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)

    @field_validator("items")
    @classmethod
    def _unique(cls, items: list[ItemBatchEntry]) -> list[ItemBatchEntry]:
        seen: dict[str, int] = {}
        for n, it in enumerate(items):
            if it.item_id in seen:
                raise ValueError(
                    f"items[{n}].item_id {it.item_id!r} repeats items[{seen[it.item_id]}]: send "
                    "each item once per request (the last one would win)")
            seen[it.item_id] = n
        return items

    def to_items(self) -> list[NewItem]:
        return [it.to_item(it.item_id) for it in self.items]


class ItemBatchResponse(BaseModel):
    """What ``PUT /v1/items`` did."""

    model_config = ConfigDict(extra="forbid")

    created: int = Field(description="items that are new to the catalogue")
    updated: int = Field(description="items the catalogue had (their attributes are replaced)")
    model_version: str = Field(description="the model version that embedded them")
    num_items: int = Field(description="items in the catalogue served now")
    added_items: int = Field(description="items added without a retrain, these included")
