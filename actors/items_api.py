"""Request and response models of ``PUT /v1/items/{item_id}``: add or update a catalogue item
without retraining (:mod:`graph.new_items` says how the item is embedded and served)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.api import MAX_CATEGORY_LEN
from graph import schema as S
from graph.new_items import NewItem

MAX_TITLE_LEN = 256
MAX_BRAND_LEN = 128
MAX_PRICE = 1_000_000.0


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
                       brand=self.brand, price=self.price)


class ItemUpsertResponse(BaseModel):
    """What ``PUT /v1/items/{item_id}`` did."""

    model_config = ConfigDict(extra="forbid")

    item_id: str
    created: bool = Field(description="true: a new item; false: an item the catalogue had "
                          "(its attributes are replaced)")
    model_version: str = Field(description="the model version that embedded it")
    num_items: int = Field(description="items in the catalogue served now")
    added_items: int = Field(description="items added without a retrain, this one included")
